"""`python -m bench.gpu_step --speed`: the trainer's speed options side by side on one transformer.

Variants, all our `KontextTrainStep` on the same model and adapter, interleaved (A B C ... C B A ...):

- `eager`: `training.attentionBackend: auto`, no compile (the default);
- `compiled`: `training.compile: true` (diffusers' `compile_repeated_blocks`, inductor; `--smoke`: aot_eager, since
  inductor's CPU code generation takes minutes on two cores);
- one per explicit kernel: `flash`, `math`, and on CUDA `efficient`, `cudnn`.

They are switched before each step, untimed: the attention backend through `configure_speed`, compilation by
restoring or clearing each block's compiled call (`nn.Module.compile` keeps it in `_compiled_call_impl`). The first
(warm-up) steps of `compiled` include the compilation. Reported: seconds per step, the ratio eager/variant (> 1:
faster than eager) and, on a GPU, each variant's peak memory (`max_memory_allocated`, reset before one step of it).
That the options compute the same loss and gradients is tested on a CPU (tests/trainer/test_speed_options.py).
"""

from __future__ import annotations

from typing import Any

import torch

from . import flux
from .harness import Sample, interleaved, print_table


def speed_variants(device: torch.device) -> list[str]:
    names = ["eager", "compiled", "flash", "math"]
    return names + (["efficient", "cudnn"] if device.type == "cuda" else [])


def run_speed(
    transformer: torch.nn.Module, accelerator: Any, setup: Any, steps: int, warmup: int, smoke: bool
) -> dict[str, Any]:
    from kontext_trainer.model.lora import add_lora
    from kontext_trainer.model.speed import configure_speed
    from kontext_trainer.train_step import KontextTrainStep, build_lr_scheduler, build_optimizer

    from kontext_lora.api.spec import AttentionBackend, LoraSpec, TrainingSpec

    device = setup.device
    parameters = add_lora(transformer, LoraSpec(rank=setup.rank), setup.rank)
    if setup.checkpointing:
        transformer.enable_gradient_checkpointing()
    spec = TrainingSpec(steps=10_000)
    optimizer = build_optimizer(parameters, spec)
    lr_scheduler = build_lr_scheduler(optimizer, spec, 10_000)
    step_fn = KontextTrainStep(transformer, parameters, optimizer, lr_scheduler, accelerator)
    batch = flux.random_batch(setup.config, setup.resolution, setup.text_tokens, setup.batch_size, device, setup.dtype)
    inputs = batch.packed()

    configure_speed(transformer, AttentionBackend.auto, True, **({"backend": "aot_eager"} if smoke else {}))
    blocks = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    compiled = {block: block._compiled_call_impl for block in blocks}

    def use(name: str) -> None:
        attention = AttentionBackend.auto if name in ("eager", "compiled") else AttentionBackend(name)
        if attention is AttentionBackend.auto:
            transformer.set_attention_backend("native")
        else:
            configure_speed(transformer, attention, False)
        for block in blocks:
            block._compiled_call_impl = compiled[block] if name == "compiled" else None

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    losses: dict[str, list[float]] = {}

    def step(name: str) -> float:
        result = step_fn([inputs], [torch.Generator().manual_seed(len(losses.get(name, [])))])
        sync()
        losses.setdefault(name, []).append(result.loss)
        return result.loss

    names = speed_variants(device)
    samples = interleaved(
        {name: (lambda name=name: step(name)) for name in names},
        repeats=steps,
        warmup=warmup,
        prepare={name: (lambda name=name: use(name)) for name in names},
    )
    peaks: dict[str, float] = {}
    if device.type == "cuda":
        for name in names:
            use(name)
            torch.cuda.reset_peak_memory_stats(device)
            step(name)
            peaks[name] = torch.cuda.max_memory_allocated(device)
    eager = samples["eager"]
    for name, sample in samples.items():
        sample.extra["eager/this"] = eager.median / sample.median
        if name in peaks:
            sample.extra["peak GiB"] = peaks[name] / 2**30
    print_table(
        "speed options: seconds per training step",
        list(samples.values()),
        extra_columns=("eager/this", *(("peak GiB",) if peaks else ())),
    )
    return {
        "samples": {name: _sample(s) for name, s in samples.items()},
        "ratios": {name: eager.median / s.median for name, s in samples.items()},
        "peaks": peaks,
        "losses": losses,
    }


def _sample(sample: Sample) -> dict[str, Any]:
    return {"median": sample.median, "spread": sample.spread, "seconds": sample.seconds, **sample.extra}
