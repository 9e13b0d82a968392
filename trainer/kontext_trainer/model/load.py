"""Loading the parts of a diffusers-format FLUX.1-Kontext folder, each when it is needed.

Text encoders and the VAE come first (to encode the dataset once), the transformer after they have left
memory. Every failure names the part and the folder (exit code 2: a model that does not load).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

from kontext_lora.api.spec import DType

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

TORCH_DTYPES = {DType.bf16: torch.bfloat16, DType.fp16: torch.float16, DType.fp32: torch.float32}
T = TypeVar("T")


def _load(part: str, directory: Path, loader: Callable[[], T]) -> T:
    try:
        return loader()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load the {part} from {directory}/: {error}") from None


def load_text_pipeline(directory: Path, dtype: torch.dtype, device: torch.device) -> FluxKontextPipeline:
    """A FluxKontextPipeline with only the CLIP and T5 encoders and tokenizers: `encode_prompt` as at inference."""
    pipeline = _load(
        "text encoders",
        directory,
        lambda: FluxKontextPipeline.from_pretrained(directory, transformer=None, vae=None, dtype=dtype),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_vae(directory: Path, dtype: torch.dtype, device: torch.device) -> AutoencoderKL:
    vae = _load("VAE", directory, lambda: AutoencoderKL.from_pretrained(directory, subfolder="vae", dtype=dtype))
    return vae.requires_grad_(False).eval().to(device)


def load_transformer(directory: Path, dtype: torch.dtype, device: torch.device) -> FluxTransformer2DModel:
    transformer = _load(
        "transformer",
        directory,
        lambda: FluxTransformer2DModel.from_pretrained(directory, subfolder="transformer", dtype=dtype),
    )
    return transformer.to(device)


def load_scheduler(directory: Path) -> FlowMatchEulerDiscreteScheduler:
    return _load(
        "scheduler",
        directory,
        lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler"),
    )
