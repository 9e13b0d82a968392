"""Will a job fit its GPU? The peak GPU memory of a spec, interpolated from measurements of the real model.

`memory_table.py` holds bytes that `python -m bench.memory --table` measured by running the trainer's own code on
the full-size FLUX.1-Kontext-dev transformer and VAE on the meta device (docs/benchmarks.md §6). This module only
interpolates them (no torch, so the operator and `kontext-lora validate` use it too):

- the training step: the four measured corners of its (resolution, gradient checkpointing, target set, LoRA
  dropout) cell — ranks 8 and 128 x batches 1 and 2, linear in between (each peak is convex in the rank and the
  batch, so this errs high) and past batch 2 extended by the steeper rank's slope (held to measurements at batches
  4 and 16) — for its two peaks apart: forward/backward and the optimizer's (which no batch moves), the larger
  counting; plus what `attentionBackend: math` and `lora.modulation` add, measured separately;
- the checkpoint's held-out loss and preview (FluxKontextPipeline + VAE decode, batch 1), linear in the rank;
- the VAE encoding a pair before each step when `cacheLatents: false`.

A job's peak is the largest of these over its training resolutions (256², below the smallest measured, as 512²).
Assumed, and erring high: AdamW's state (Adafactor keeps less), the VAE resident (previews keep it on the GPU;
0.17 GB less without them); fp16 weighs as bf16. `CHECKS` in the table are measured points that are not corners:
tests/bench/test_memory.py holds the interpolation to them. The measured peak is what
`torch.cuda.max_memory_allocated` would report; the 4 GB between the 44 GB budget and a 48 GB card are the CUDA
context, kernel workspaces and allocator fragmentation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from . import memory_table as table
from .spec import DEFAULT_BASE_MODEL, AttentionBackend, DType, GpuClass, KontextLoRAJobSpec

GB = 1e9
# What a 48 GB card leaves to PyTorch's allocator for this job (see the module doc).
GPU_BUDGET_BYTES: dict[GpuClass, float] = {GpuClass.L40S_48GB: 44 * GB, GpuClass.RTX4090_48GB: 44 * GB}
RESERVED_BYTES = 4 * GB  # the same allowance, for the trainer's check against a GPU's total memory


@dataclass(frozen=True)
class PeakEstimate:
    bytes: float
    what: str  # which moment of the run peaks, e.g. "the training step at 1024²"

    @property
    def gb(self) -> float:
        return self.bytes / GB


def _linear(values: tuple[float, ...], points: tuple[int, ...], x: float) -> float:
    """Piecewise-linear interpolation through (points, values); `x` within the measured range."""
    if not points[0] <= x <= points[-1]:
        raise ValueError(f"{x} is outside the measured range {points[0]}..{points[-1]}")
    for i in range(1, len(points)):
        if x <= points[i]:
            x0, x1, y0, y1 = points[i - 1], points[i], values[i - 1], values[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return values[-1]


def _last_slope(values: tuple[float, ...]) -> float:
    """Bytes per pair between the two largest measured batches."""
    (b0, b1), (y0, y1) = table.BATCHES[-2:], values[-2:]
    return (y1 - y0) / (b1 - b0)


def _in_batch(values: tuple[float, ...], batch: int, slope: float) -> float:
    """A row measured at `table.BATCHES`: interpolated inside; past the largest measured batch, extended by `slope`."""
    if batch <= table.BATCHES[-1]:
        return _linear(values, table.BATCHES, batch)
    return values[-1] + slope * (batch - table.BATCHES[-1])


def _bilinear(grid: tuple[tuple[int, ...], ...], rank: int, batch: int) -> float:
    """Through the measured batches at each measured rank, then linear in the rank between them. Past the largest
    measured batch each rank's row grows by the steeper of the two ranks' last slopes: a peak is the maximum of
    moments that each grow linearly with the batch, so where the moment that peaks at a small batch is not the one
    that grows fastest (at 512² and rank 128 the backward pass overtakes the forward pass only past batch 2), a
    rank's own slope would err low; measured at batches 4 and 16 this errs high by at most 1.6 % (CHECKS)."""
    slope = max(_last_slope(row) for row in grid)
    low, high = (_in_batch(grid[i], batch, slope) for i in range(2))
    return _linear((low, high), table.RANKS, rank)


def _step(resolution: int, spec: KontextLoRAJobSpec) -> float:
    """The larger of the step's two peaks: forward/backward (grows with the batch) and the optimizer's (does not)."""
    training, lora = spec.training, spec.lora
    cell = table.STEP[(resolution, training.gradient_checkpointing, lora.target_modules.value, lora.dropout > 0)]
    activations = _bilinear(cell["activations"], lora.rank, training.batch_size)
    optimizer = _bilinear(cell["optimizer"], lora.rank, training.batch_size)
    if training.attention_backend is AttentionBackend.math:
        math_extra = table.MATH_EXTRA[(resolution, training.gradient_checkpointing)]
        activations += _in_batch(math_extra, training.batch_size, _last_slope(math_extra))  # linear in the batch
    if lora.modulation:
        extra = table.MODULATION_EXTRA[lora.target_modules.value]
        activations += _linear(extra["activations"], table.RANKS, lora.rank)
        optimizer += _linear(extra["optimizer"], table.RANKS, lora.rank)
    return max(activations, optimizer)


def _resident_extra(spec: KontextLoRAJobSpec) -> float:
    if not spec.lora.modulation:
        return 0.0
    return _linear(table.MODULATION_EXTRA[spec.lora.target_modules.value]["resident"], table.RANKS, spec.lora.rank)


def _preview(resolution: int, spec: KontextLoRAJobSpec) -> float:
    peak = _linear(table.PREVIEW[resolution], table.RANKS, spec.lora.rank) + _resident_extra(spec)
    if spec.training.attention_backend is AttentionBackend.math:  # bounded by a checkpointed batch-1 step's extra
        peak += table.MATH_EXTRA[(resolution, True)][0]
    return peak


def estimate_peak(spec: KontextLoRAJobSpec) -> PeakEstimate:
    """The highest GPU memory the job reaches, and when (a lower bound for an fp32 base, see `fits`)."""
    if spec.model.dtype is DType.fp32:
        return PeakEstimate(table.FP32_SMALLEST, "the smallest job (512², rank 8, batch 1, an fp32 base)")
    candidates: list[PeakEstimate] = []
    for wanted in spec.dataset.training_resolutions:
        resolution = measured_resolution(wanted)
        at = f"{wanted}²" + (f" (as {resolution}², the smallest measured)" if resolution != wanted else "")
        candidates.append(PeakEstimate(_step(resolution, spec), f"the training step at {at}"))
        if spec.dataset.held_out_pairs > 0:
            candidates.append(PeakEstimate(_preview(resolution, spec), f"the checkpoint preview at {at}"))
        if not spec.training.cache_latents:
            encode = _linear(table.VAE_ENCODE[resolution], table.RANKS, spec.lora.rank) + _resident_extra(spec)
            candidates.append(PeakEstimate(encode, f"the per-step VAE encoding at {at}"))
    return max(candidates, key=lambda c: c.bytes)


def measured_resolution(resolution: int) -> int:
    """The table's figures for `resolution`: its own, or the next larger measured one's — an upper bound, since every
    peak grows with the image (256², for small models like the demo's toy base, is bounded by 512²)."""
    measured = sorted(table.PREVIEW)
    return next((r for r in measured if r >= resolution), measured[-1])


def memory_problem(
    spec: KontextLoRAJobSpec, budget_bytes: float | None = None, gpu: str | None = None
) -> tuple[str, str] | None:
    """None when the job fits `budget_bytes` (default: its GPU class's), else (field, message) for the error."""
    budget = budget_bytes if budget_bytes is not None else GPU_BUDGET_BYTES[spec.resources.gpu]
    gpu = gpu or f"a {spec.resources.gpu.value} GPU"
    peak = estimate_peak(spec)
    if peak.bytes <= budget:
        return None
    training, lora, dataset = spec.training, spec.lora, spec.dataset
    measured = "measured on the full FLUX.1-Kontext-dev model, docs/benchmarks.md"
    over = f"more than the {budget / GB:.0f} GB {gpu} leaves for training"
    if spec.model.dtype is DType.fp32:
        return "model.dtype", (
            f"needs about {peak.gb:.1f} GB of GPU memory at its peak even for {peak.what} ({measured}), {over}: "
            "train in bf16 (the default), which halves the base weights"
        )
    setting = (
        f"resolution {'/'.join(map(str, dataset.training_resolutions))}, batchSize {training.batch_size}, "
        f"rank {lora.rank}, gradientCheckpointing {str(training.gradient_checkpointing).lower()}"
    )
    head = f"needs about {peak.gb:.1f} GB of GPU memory at its peak ({peak.what}, {setting}: {measured}), {over}"
    fixes = _fixes(spec, budget)
    field = (
        "training.gradientCheckpointing"
        if not training.gradient_checkpointing
        else "training.attentionBackend"
        if training.attention_backend is AttentionBackend.math
        else "training.batchSize"
        if training.batch_size > 1
        else "lora.rank"
    )
    return field, head + (f". What fits: {', or '.join(fixes)}" if fixes else "")


def _fixes(spec: KontextLoRAJobSpec, budget: float) -> list[str]:
    """Single changes that make the job fit, with their peaks: the largest batch, rank or resolution that does."""
    fixes: list[str] = []
    data = spec.model_dump()

    def attempt(description: str, section: str, **values: object) -> bool:
        changed = copy.deepcopy(data)
        changed[section].update(values)
        peak = estimate_peak(KontextLoRAJobSpec.model_validate(changed))
        if peak.bytes > budget:
            return False
        fixes.append(f"{description} ({peak.gb:.1f} GB)")
        return True

    training, resolutions = spec.training, spec.dataset.training_resolutions
    if not training.gradient_checkpointing:
        attempt("gradientCheckpointing: true", "training", gradient_checkpointing=True)
    if training.attention_backend is AttentionBackend.math:
        attempt("attentionBackend: auto", "training", attention_backend=AttentionBackend.auto)
    any(attempt(f"batchSize: {b}", "training", batch_size=b) for b in range(training.batch_size - 1, 0, -1))
    any(attempt(f"rank: {r}", "lora", rank=r) for r in range(spec.lora.rank - 8, 7, -8))
    if len(resolutions) > 1:
        kept = list(resolutions[:-1])
        attempt(f"resolutions: {kept}", "dataset", resolutions=kept, resolution=max(kept))
    else:
        smaller = [r for r in (768, 512) if r < resolutions[0]]
        any(attempt(f"resolution: {r}", "dataset", resolution=r) for r in smaller)
    return fixes


def fits(spec: KontextLoRAJobSpec, budget_bytes: float | None = None) -> bool:
    return memory_problem(spec, budget_bytes) is None


def admission_problem(spec: KontextLoRAJobSpec) -> str | None:
    """The error line (`spec.<field>: ...`) for a job on the hub's FLUX.1-Kontext-dev that its 48 GB GPU class cannot
    hold, else None. Jobs on other model sources are checked by the trainer at start, once their model is there."""
    if spec.model.base != DEFAULT_BASE_MODEL:
        return None
    problem = memory_problem(spec)
    return None if problem is None else f"spec.{problem[0]}: {problem[1]}"
