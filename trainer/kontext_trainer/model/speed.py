"""The transformer's speed options: which scaled-dot-product-attention kernel it uses, and torch.compile of its blocks.

Both are settings of the loaded `FluxTransformer2DModel`, applied after the LoRA is added, so training, the held-out
loss and the previews all run with them. The attention kernel goes through diffusers' attention dispatcher
(`set_attention_backend`, its `_native_*` backends: `F.scaled_dot_product_attention` inside `sdpa_kernel(...)`);
`compile` is diffusers' regional compilation (`compile_repeated_blocks`: `torch.compile` of every double and single
block, one compiled graph shared by the 19 + 38 blocks of a kind instead of one graph of the whole model).

Only the kernel choice changes numbers (within float rounding); refusals that depend on the machine (a kernel this
device lacks) happen at start, before anything is downloaded.
"""

from __future__ import annotations

import logging

import torch

from kontext_lora.api.spec import AttentionBackend

from ..errors import InvalidInputError

log = logging.getLogger(__name__)

DIFFUSERS_BACKENDS = {
    AttentionBackend.flash: "_native_flash",
    AttentionBackend.efficient: "_native_efficient",
    AttentionBackend.cudnn: "_native_cudnn",
    AttentionBackend.math: "_native_math",
}
# PyTorch has flash and math SDPA kernels on the CPU, memory-efficient and cuDNN attention only on CUDA.
CUDA_ONLY = (AttentionBackend.efficient, AttentionBackend.cudnn)


def require_supported_attention(backend: AttentionBackend, cpu: bool = False) -> None:
    if backend in CUDA_ONLY and (cpu or not torch.cuda.is_available()):
        raise InvalidInputError(
            f"spec.training.attentionBackend {backend.value} needs a CUDA GPU; use auto, flash or math on a CPU"
        )


def configure_speed(
    transformer: torch.nn.Module, attention: AttentionBackend, compile_blocks: bool, **compile_options: object
) -> None:
    """Route the transformer's attention to `attention` and compile its blocks when asked (`compile_options` go to
    `torch.compile`: inductor by default)."""
    name = DIFFUSERS_BACKENDS.get(attention)
    if name is not None:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "attention backends are an experimental feature": known
        try:
            transformer.set_attention_backend(name)
        finally:
            diffusers_logging.set_verbosity(level)
    if compile_blocks:
        transformer.compile_repeated_blocks(**compile_options)
        log.info("transformer blocks compiled with torch.compile (the first steps include the compilation)")
