"""The GPU speed options are correct on a CPU: each attention kernel and the compiled blocks give the eager loss and
LoRA gradients (their speed is measured by `bench.gpu_step --speed` where a GPU is lent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kontext_trainer import flux_math
from kontext_trainer.errors import InvalidInputError
from kontext_trainer.model.load import load_transformer
from kontext_trainer.model.lora import add_lora
from kontext_trainer.model.speed import configure_speed, require_supported_attention

from kontext_lora.api.spec import AttentionBackend, LoraSpec

from .helpers import random_inputs

# fp32 throughout: the kernels differ only in the order of their sums (flash's online softmax, fused kernels), so
# the loss and gradients agree to a few float32 ulps of their ~100-term reductions; 1e-5 relative is 100x that and
# still far below what a wrong kernel, a skipped LoRA or a lost gradient changes (order 1e-1 on this model).
RTOL, ATOL = 1e-5, 1e-7


def _loss_and_grads(model: Path, attention: AttentionBackend, compiled: bool) -> tuple[float, list[torch.Tensor]]:
    transformer = load_transformer(model, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    parameters = add_lora(transformer, LoraSpec(rank=8), 8)
    with torch.no_grad():  # a trained-looking LoRA: B = 0 would leave the A gradients zero
        for parameter in parameters:
            parameter.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(parameter.numel()))
    transformer.enable_gradient_checkpointing()
    # Inductor's C++ code generation takes minutes on two shared cores; aot_eager runs the same Dynamo capture and
    # AOT-autograd joint graph of the blocks (LoRA layers and checkpointing inside) with eager kernels.
    configure_speed(transformer, attention, compiled, **({"backend": "aot_eager"} if compiled else {}))
    generator = torch.Generator().manual_seed(3)
    inputs = random_inputs(transformer.config, 2, (16, 16), 7, generator)
    noise = torch.randn(inputs.target.shape, generator=generator)
    loss = flux_math.flow_matching_loss(transformer, inputs, noise, torch.tensor([0.3, 0.8]))
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in parameters]


def test_attention_kernels_and_compiled_blocks_give_the_eager_loss_and_gradients(tiny_model: Path) -> None:
    eager_loss, eager_grads = _loss_and_grads(tiny_model, AttentionBackend.auto, compiled=False)
    assert eager_loss > 0 and all(float(g.abs().sum()) > 0 for g in eager_grads)
    for attention, compiled in (
        (AttentionBackend.math, False),
        (AttentionBackend.flash, False),
        (AttentionBackend.auto, True),
    ):
        loss, grads = _loss_and_grads(tiny_model, attention, compiled)
        assert loss == pytest.approx(eager_loss, rel=RTOL), (attention, compiled)
        for grad, expected in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("attention", [AttentionBackend.efficient, AttentionBackend.cudnn])
def test_cuda_only_kernels_are_refused_on_a_cpu_naming_the_field(attention: AttentionBackend) -> None:
    with pytest.raises(InvalidInputError, match=f"spec.training.attentionBackend {attention.value} needs a CUDA GPU"):
        require_supported_attention(attention, cpu=True)
    require_supported_attention(AttentionBackend.flash, cpu=True)


def test_skipping_peft_input_casts_under_autocast_changes_no_number(tiny_model: Path) -> None:
    """add_lora turns off peft's cast of adapted layers' inputs to the fp32 adapter dtype (memory: bench.memory):
    under bf16 autocast the matmul casts back to bf16, so the loss and gradients are bit-identical either way."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    results = []
    for cast in (True, False):
        transformer = load_transformer(tiny_model, torch.bfloat16, torch.device("cpu"))
        torch.manual_seed(0)
        parameters = add_lora(transformer, LoraSpec(rank=8), 8)
        with torch.no_grad():
            for parameter in parameters:
                parameter.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(parameter.numel()))
        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer):
                assert module.cast_input_dtype_enabled is False
                module.cast_input_dtype_enabled = cast
        generator = torch.Generator().manual_seed(5)
        inputs = random_inputs(transformer.config, 1, (16, 16), 7, generator).to("cpu", torch.bfloat16)
        noise = torch.randn(inputs.target.shape, generator=generator).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = flux_math.flow_matching_loss(transformer, inputs, noise, torch.tensor([0.6]))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in parameters]))
    (cast_loss, cast_grads), (loss, grads) = results
    assert torch.equal(cast_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(cast_grads, grads, strict=True))
