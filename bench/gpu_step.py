"""GPU training-step benchmark at the real model size: our `KontextTrainStep` against the diffusers-style loop.

    python -m bench.gpu_step                      # one CUDA GPU: full FLUX.1-Kontext-dev transformer, random weights
    python -m bench.gpu_step --quantize int8      # base weights int8 (optimum-quanto), LoRA trained on top
    python -m bench.gpu_step --only ours          # one variant alone: its exact peak memory
    python -m bench.gpu_step --speed              # torch.compile and the attention kernels, side by side
    python -m bench.gpu_step --smoke              # CPU, tiny config, same code path (CI)

Full size: 19 double + 38 single blocks, hidden 3072 (~11.9B parameters), bf16 weights built directly on the GPU
with random values (no download), LoRA rank 32 on the trainer's target modules, gradient checkpointing, batch 1,
a 1024² target + 1024² control (4096 + 4096 image tokens) and 512 T5 tokens: 8704 tokens per sample.

Reported per variant: seconds per step (median ± IQR/2, interleaved), peak memory (`torch.cuda.max_memory_allocated`,
reset before each variant), achieved TFLOP/s and MFU. Model FLOPs are counted once with
`torch.utils.flop_counter.FlopCounterMode` on the meta device (no memory): one forward + backward *without* the
recomputation that gradient checkpointing adds (that is counted separately as hardware FLOPs, HFU). MFU divides by
the detected GPU's dense bf16 peak (`PEAK_TFLOPS`, or `--peak-tflops`). The expected peak memory is also estimated
analytically before anything is allocated, so the 48 GB-card claim is argued without a GPU too.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import flux
from .harness import Sample, console, interleaved, load_average, machine, ratio, write_result

GIB = 1024**3
# Dense (no sparsity) bf16 tensor-core peaks with fp32 accumulation, TFLOP/s, from NVIDIA's datasheets.
# Matched against torch.cuda.get_device_name() in order: the first substring that matches wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("L40S", 362.05),
    ("RTX 4090", 165.2),  # also the 48 GB boards: same AD102 chip
    ("A100", 312.0),
    ("L40", 181.05),
    ("A6000", 154.8),
)
SMOKE_CONFIG: dict[str, Any] = {
    **flux.FULL_CONFIG,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
# Layers left unquantized: the small embedders and the final projection (as quantized-Flux trainers do).
QUANTIZE_EXCLUDE = ["x_embedder", "context_embedder", "time_text_embed*", "norm_out*", "proj_out"]


@dataclass(frozen=True)
class Setup:
    config: dict[str, Any]
    resolution: int
    text_tokens: int
    rank: int
    batch_size: int
    checkpointing: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def image_tokens(self) -> int:
        return 2 * (self.resolution // flux.VAE_SCALE // 2) ** 2  # target + control

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


# ---- FLOPs ---------------------------------------------------------------------------------------------------


def count_flops(setup: Setup) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one training step's model call, counted on the meta device."""
    from kontext_trainer import flux_math
    from kontext_trainer.model.lora import add_lora
    from torch.utils.flop_counter import FlopCounterMode

    from kontext_lora.api.spec import LoraSpec

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = flux.FluxTransformer2DModel(**setup.config).to(setup.dtype)
    add_lora(model, LoraSpec(rank=setup.rank), setup.rank)
    batch = flux.random_batch(setup.config, setup.resolution, setup.text_tokens, setup.batch_size, "meta", setup.dtype)
    inputs = batch.packed()
    noise = torch.empty_like(inputs.target)
    sigmas = torch.full((setup.batch_size,), 0.5, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss = flux_math.flow_matching_loss(model, inputs, noise, sigmas)
        forward = counter.get_total_flops()
        loss.backward()
    return float(forward), float(counter.get_total_flops())


def analytic_forward_flops(setup: Setup) -> float:
    """Matmul FLOPs of one forward, by hand: a cross-check of the counter (projections + attention + LoRA)."""
    c = setup.config
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    mlp = 4 * hidden
    image, text, total = setup.image_tokens, setup.text_tokens, setup.tokens
    per_token_double = 4 * hidden * hidden + 2 * hidden * mlp  # qkv + out, MLP (per stream)
    per_token_single = 3 * hidden * hidden + hidden * mlp + (hidden + mlp) * hidden  # qkv, proj_mlp, proj_out
    projections = (
        c["num_layers"] * per_token_double * (image + text) + c["num_single_layers"] * per_token_single * total
    )
    attention = (c["num_layers"] + c["num_single_layers"]) * 2 * total * total * hidden  # QK^T and PV
    embed = image * c["in_channels"] * hidden + text * c["joint_attention_dim"] * hidden
    final = image * hidden * c["in_channels"]
    r = setup.rank
    # Every token passes r * (in + out) per adapter: 4 attention + 2 MLP adapters per stream in a double block.
    lora_double = r * (8 * hidden + 2 * (hidden + mlp))
    lora_single = r * (6 * hidden + (hidden + mlp) + (2 * hidden + mlp))
    lora = c["num_layers"] * lora_double * (image + text) + c["num_single_layers"] * lora_single * total
    return 2.0 * setup.batch_size * (projections + attention + embed + final + lora)


# ---- memory estimate -------------------------------------------------------------------------------------------


def lora_parameter_count(setup: Setup) -> int:
    c = setup.config
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    mlp = 4 * hidden
    double = 8 * (hidden + hidden) + 2 * ((hidden + mlp) + (mlp + hidden))
    single = 3 * (hidden + hidden) + (hidden + mlp) + (hidden + mlp + hidden)
    return setup.rank * (c["num_layers"] * double + c["num_single_layers"] * single)


def memory_estimate(setup: Setup, quantize: str | None) -> dict[str, dict[str, float]]:
    """Expected peak bytes per variant, by part (weights, adapter state, saved activations, one block's working set)."""
    c = setup.config
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    b, n, element = setup.batch_size, setup.tokens, 2
    weights = flux.parameter_count(c) * (1.02 if quantize else 2)  # int8/fp8 + per-channel scales
    lora = lora_parameter_count(setup)
    layers = c["num_layers"] + c["num_single_layers"]
    if setup.checkpointing:
        saved = layers * b * n * hidden * element  # each block's input hidden states, kept for its recomputation
        # One single block recomputed + its backward: norm, q/k/v (+ fp32 rotary copies of q/k), attention out,
        # the MLP before/after GELU, the concatenation for proj_out, and the gradients flowing back (~x1.5).
        working = b * n * (hidden * (1 + 3 + 4 + 1 + 1) + 4 * hidden * 2 + 5 * hidden) * element * 2.5
    else:
        saved = layers * b * n * (hidden * 16) * element
        working = 0.0
    estimates = {}
    for name, bytes_per_lora in (("ours", 4 + 4 + 8), ("reference", 2 + 2 + 4)):  # param + grad + Adam m, v
        parts = {
            "base weights": weights,
            "LoRA + grads + AdamW": lora * bytes_per_lora,
            "checkpointed block inputs": saved,
            "one block's recompute + backward": working,
        }
        parts["allocator slack (10%)"] = 0.10 * sum(parts.values())
        parts["total"] = sum(parts.values())
        estimates[name] = parts
    return estimates


# ---- building --------------------------------------------------------------------------------------------------


def quantize_base(transformer: torch.nn.Module, kind: str) -> None:
    """Quantize the frozen base weights with optimum-quanto (the `quantize` extra); LoRA then trains on top."""
    try:
        from optimum.quanto import freeze, qfloat8, qint8, quantize
    except ImportError:
        raise SystemExit("--quantize needs optimum-quanto: pip install 'kontext-lora[quantize]'") from None
    quantize(transformer, weights={"fp8": qfloat8, "int8": qint8}[kind], exclude=QUANTIZE_EXCLUDE)
    freeze(transformer)


def quiet_libraries() -> None:
    """diffusers logs a float32-modules notice on every dtype cast of the model; not news here."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    for key, value in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value, f"{value:g} TFLOP/s dense bf16 ({key} datasheet)"
    return None, "unknown for this device: MFU not computed (pass --peak-tflops)"


def synchronizer(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def measure_peaks(variants: flux.Variants, steps: dict, prepare: dict, device: torch.device) -> dict[str, dict]:
    """Peak memory of one step per variant, the allocator's peak reset before each."""
    peaks: dict[str, dict] = {}
    for name in steps:
        prepare[name]()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        steps[name]()
        if device.type != "cuda":
            peaks[name] = {}
            continue
        measured = torch.cuda.max_memory_allocated(device)
        other = [n for n in steps if n != name]
        held_by_other = sum(variants.state_bytes(n) for n in other)
        peaks[name] = {
            "peak_allocated": measured,
            "peak_reserved": torch.cuda.max_memory_reserved(device),
            "other_variant_state": held_by_other,
            "peak_alone": measured - held_by_other,
        }
    return peaks


# ---- main ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, same code path (CI).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per variant (default 10; smoke 2).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps per variant first (default 2).")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=None, help="Target and control side in pixels (1024).")
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 sequence length (512).")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true", help="Disable gradient checkpointing.")
    parser.add_argument("--quantize", choices=("fp8", "int8"), default=None, help="Quantize the base (quanto).")
    parser.add_argument("--only", choices=("ours", "reference"), default=None, help="Run one variant alone.")
    parser.add_argument(
        "--speed", action="store_true", help="The speed options side by side instead (compile, attention kernels)."
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak for MFU (overrides table).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    warnings.filterwarnings("ignore", message=".*(peft_config|kept in float32|torchvision).*")
    if args.smoke:
        device, config = torch.device("cpu"), SMOKE_CONFIG
        resolution, text_tokens = args.resolution or 128, args.text_tokens or 32
        steps, warmup = args.steps or 2, 1 if args.warmup is None else args.warmup
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run on a GPU machine, or use --smoke for the CPU check", file=sys.stderr)
            return 2
        device, config = torch.device("cuda", torch.cuda.current_device()), flux.FULL_CONFIG
        resolution, text_tokens = args.resolution or 1024, args.text_tokens or flux.T5_TOKENS
        steps, warmup = args.steps or 10, 2 if args.warmup is None else args.warmup
    setup = Setup(
        config=config,
        resolution=resolution,
        text_tokens=text_tokens,
        rank=args.rank,
        batch_size=args.batch_size,
        checkpointing=not args.no_checkpointing,
        device=device,
        dtype=torch.bfloat16,
    )
    name = device_name(device)
    peak, peak_note = peak_tflops(name, args.peak_tflops) if device.type == "cuda" else (None, "CPU: no MFU")
    params = flux.parameter_count(config)
    console.print(
        f"[bold]GPU step benchmark[/] on {name}; {machine()}; load {load_average()}\n"
        f"transformer: {config['num_layers']} double + {config['num_single_layers']} single blocks, hidden "
        f"{config['num_attention_heads'] * config['attention_head_dim']}, {_count(params)} parameters, bf16"
        f"{f', base quantized {args.quantize} (optimum-quanto)' if args.quantize else ''}; LoRA rank {args.rank} "
        f"({_count(lora_parameter_count(setup))} parameters); batch {args.batch_size}; {resolution}² target + "
        f"{resolution}² control + {text_tokens} text tokens = {setup.tokens} tokens; gradient checkpointing "
        f"{'on' if setup.checkpointing else 'off'}"
    )

    began = time.perf_counter()
    forward_flops, model_flops = count_flops(setup)
    analytic = analytic_forward_flops(setup)
    hardware_flops = model_flops + (forward_flops if setup.checkpointing else 0.0)
    console.print(
        f"model FLOPs per step (FlopCounterMode on meta, {time.perf_counter() - began:.0f}s): forward "
        f"{_flops(forward_flops)} (analytic cross-check {_flops(analytic)}), forward + backward "
        f"{_flops(model_flops)}; with checkpoint recomputation {_flops(hardware_flops)} "
        f"(hardware FLOPs, not in MFU). Peak for MFU: {peak_note}"
    )
    estimate = memory_estimate(setup, args.quantize)
    console.print("expected peak memory (analytic, GiB): " + _estimate_text(estimate))

    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = flux.build_transformer(config, device, setup.dtype)
        if args.quantize:
            quantize_base(transformer, args.quantize)
    sync = synchronizer(device)
    sync()
    init_seconds = time.perf_counter() - began
    after_init = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    from kontext_trainer.train_step import make_accelerator

    from kontext_lora.api.spec import DType

    accelerator = make_accelerator(DType.bf16, 1, cpu=device.type == "cpu")
    if args.speed:
        from .speed_options import run_speed

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            speed = run_speed(transformer, accelerator, setup, steps, warmup, smoke=args.smoke)
        write_result(args.json, {"device": name, "speed": speed, "resolution": resolution, "rank": args.rank})
        return 0
    include = (args.only,) if args.only else ("ours", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = flux.build_variants(
            transformer, accelerator, args.rank, setup.dtype, setup.checkpointing, include=include
        )
    batch = flux.random_batch(config, resolution, text_tokens, args.batch_size, device, setup.dtype)
    step_fns, prepare = flux.step_callables(variants, batch, sync)
    console.print(
        f"built in {init_seconds:.1f}s"
        + (f"; base weights on the GPU: {after_init / GIB:.2f} GiB" if after_init is not None else "")
    )

    losses: dict[str, list[float]] = {n: [] for n in step_fns}
    samples = interleaved(
        step_fns, repeats=steps, warmup=warmup, prepare=prepare, on_result=lambda n, v: losses[n].append(float(v))
    )
    peaks = measure_peaks(variants, step_fns, prepare, device)
    rate_unit, rate_scale = ("TFLOP/s", 1e12) if model_flops >= 1e12 else ("GFLOP/s", 1e9)
    for sample in samples.values():
        seconds = sample.median
        sample.extra[rate_unit] = model_flops / seconds / rate_scale
        if peak:
            sample.extra["MFU %"] = 100 * model_flops / seconds / 1e12 / peak
            sample.extra["HFU %"] = 100 * hardware_flops / seconds / 1e12 / peak
        if peaks[sample.name]:
            sample.extra["peak GiB"] = peaks[sample.name]["peak_allocated"] / GIB
            sample.extra["peak GiB alone"] = peaks[sample.name]["peak_alone"] / GIB
            sample.extra["est. GiB"] = estimate[sample.name]["total"] / GIB
    _print_table(samples, rate_unit, peak is not None, bool(peaks and next(iter(peaks.values()))))
    result: dict[str, Any] = {
        "device": name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": params,
        "setup": {
            "resolution": resolution,
            "text_tokens": text_tokens,
            "tokens": setup.tokens,
            "rank": args.rank,
            "batch_size": args.batch_size,
            "gradient_checkpointing": setup.checkpointing,
            "quantize": args.quantize,
        },
        "flops": {"forward": forward_flops, "model": model_flops, "hardware": hardware_flops, "analytic": analytic},
        "peak_tflops": peak,
        "estimate_bytes": estimate,
        "peaks": peaks,
        "samples": samples,
        "losses": losses,
    }
    if len(samples) == 2:
        value = ratio(samples["reference"], samples["ours"])
        result["ratio"] = value
        console.print(f"[bold]ratio reference/ours (step time): {value:.3f}[/] (>1: ours faster)")
    for name_, found in peaks.items():
        if found:
            console.print(
                f"{name_}: peak allocated {found['peak_allocated'] / GIB:.2f} GiB (reserved "
                f"{found['peak_reserved'] / GIB:.2f}); minus the other variant's adapter/optimizer state "
                f"{found['other_variant_state'] / GIB:.2f} GiB = {found['peak_alone'] / GIB:.2f} GiB alone "
                f"({'within' if found['peak_alone'] <= 44e9 else 'OVER'} the 44 GB goal)"
            )
    write_result(args.json, result)
    return 0


def _estimate_text(estimate: dict[str, dict[str, float]]) -> str:
    parts = []
    for name, values in estimate.items():
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in values.items() if k != "total")
        parts.append(f"{name} {_gib(values['total'])} ({detail})")
    return "; ".join(parts)


def _count(value: float) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.2f}M"


def _flops(value: float) -> str:
    return f"{value / 1e12:.2f} TFLOP" if value >= 1e12 else f"{value / 1e9:.3f} GFLOP"


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}" if value >= 0.1 * GIB else f"{value / GIB:.4f}"


def _print_table(samples: dict[str, Sample], rate_unit: str, mfu: bool, memory: bool) -> None:
    from .harness import print_table

    columns = [rate_unit]
    if mfu:
        columns += ["MFU %", "HFU %"]
    if memory:
        columns += ["peak GiB", "peak GiB alone", "est. GiB"]
    print_table("seconds per training step", list(samples.values()), extra_columns=tuple(columns))


if __name__ == "__main__":
    sys.exit(main())
