"""`python -m bench.memory --table`: measure the grid the admission check interpolates and write it as a module.

The written file, kontext_lora/api/memory_table.py, holds only measured bytes (and the measurement's provenance);
kontext_lora/api/memory.py reads it. What is measured, with the trainer's code on the full-size meta model
(`bench.memory.MetaTrainer`):

- STEP: one optimizer step for every (resolution, checkpointing, target set, LoRA dropout on) at rank 8 and 128
  x batch 1 and 2 — fused attention, no modulation adapters, the VAE resident (previews on) — as two peaks:
  "activations", the highest point of forward and backward, and "optimizer", the highest point after them
  (gradients, AdamW's foreach temporaries: the batch's activations are gone). A step's peak is the larger; at 512²
  and rank 128 it is the optimizer's up to batch 2. Each peak is the maximum over the step's moments of bytes that
  grow linearly with the rank and the batch, so it is convex in each: interpolating between measured points errs
  high, never low. Past batch 2 kontext_lora.api.memory extends each row by the steeper rank's slope; the CHECKS
  at batches 4 and 16 (every resolution, rank and checkpointing, attention targets) hold it to measurements.
- MATH_EXTRA: what `attentionBackend: math` adds to the activations' peak per (resolution, checkpointing) at each
  batch (rank 8, default targets): the attention matrices, independent of the adapter.
- MODULATION_EXTRA: what `lora.modulation` adds per target set at rank 8 and 128: to both of a step's peaks
  (1024², checkpointing, batch 1) and to the state resident between steps (its adapters' weights, AdamW moments).
- PREVIEW and VAE_ENCODE per resolution at rank 8 and 128: the checkpoint's held-out loss + preview, and the VAE
  encoding a pair before each step when latents are not cached.
- FP32_SMALLEST: an fp32 base at the smallest job (512², rank 8, batch 1, checkpointing, attention targets).
- CHECKS: steps at points the grid does not contain, measured, beside what the interpolation predicts.
- CANARY: the smoke config's figures, re-measured by tests/bench/test_memory.py to tell when the table is stale.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import pprint
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import flux
from .harness import console, load_average
from .memory import (
    CANARY,
    FULL_VAE_CONFIG,
    GB,
    SMOKE_TEXT_TOKENS,
    SMOKE_TRANSFORMER,
    SMOKE_VAE,
    T5_TOKENS,
    Case,
    MetaTrainer,
)

RESOLUTIONS = (512, 768, 1024)
RANKS = (8, 128)
BATCHES = (1, 2)
TARGETS = ("attention", "default")
DROPOUT = 0.1  # any p > 0 costs the same: peft's Dropout saves its mask


def check_cases() -> list[Case]:
    return [
        Case(1024, 32),
        Case(1024, 64, batch_size=3),
        Case(1024, 128, batch_size=4),
        Case(768, 64, batch_size=4, targets="attention"),
        Case(512, 32, batch_size=4, checkpointing=False),
        Case(512, 16, batch_size=8),
        Case(768, 32, batch_size=2, modulation=True),
        Case(1024, 32, attention="math"),
        Case(512, 48, batch_size=3, dropout=DROPOUT, modulation=True),
        Case(512, 128, batch_size=6),  # the optimizer's peak at batch 1 and 2, the activations' beyond
        # past the grid's batches: where the interpolation extends the rows
        *(
            Case(resolution, rank, batch, checkpointing, "attention")
            for rank in RANKS
            for resolution in RESOLUTIONS
            for checkpointing in (True, False)
            for batch in (4, 16)
        ),
        Case(512, 8, batch_size=4, targets="attention", dropout=DROPOUT),
    ]


def measure_table(workdir: Path, smoke: bool = False, reuse: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every figure of the table; `smoke` measures the same grid on the tiny config (a dry run, seconds). `reuse`:
    the RUNS of an earlier table (its --json), whose training steps are taken instead of measured again — meta
    counts are deterministic for the same code and libraries, so only new grid points cost time."""
    began = time.perf_counter()
    known = {_case_key(run["case"]): run for run in reuse or []}
    runs: list[dict[str, Any]] = []
    if smoke:
        trainer = MetaTrainer(SMOKE_TRANSFORMER, SMOKE_VAE, SMOKE_TEXT_TOKENS, workdir)
    else:
        trainer = MetaTrainer(flux.FULL_CONFIG, FULL_VAE_CONFIG, T5_TOKENS, workdir)

    def phases(case: Case) -> dict[str, int]:
        if (run := known.get(_case_key(dataclasses.asdict(case)))) is not None:
            runs.append(run)
            return run
        measured = trainer.train_step(case)
        split = step_peaks(measured)
        console.print(
            f"  {case.label()}: {measured['peak'] / GB:.2f} GB (activations {split['activations'] / GB:.2f}, "
            f"optimizer {split['optimizer'] / GB:.2f}; {measured['seconds']:.0f} s)"
        )
        run = {"case": dataclasses.asdict(case), **split, "peak": measured["peak"], "static": measured["static"]}
        runs.append(run)
        return run

    def step(case: Case) -> int:
        return phases(case)["peak"]

    table: dict[str, Any] = {"STEP": {}, "MATH_EXTRA": {}, "MODULATION_EXTRA": {}, "PREVIEW": {}, "VAE_ENCODE": {}}
    corners: dict[tuple, dict[tuple[int, int], dict[str, int]]] = {}
    # Adapter outermost: the model and its LoRA are rebuilt only when they change.
    for targets in TARGETS:
        for dropout in (0.0, DROPOUT):
            for rank in RANKS:
                for resolution in RESOLUTIONS:
                    for checkpointing in (True, False):
                        for batch in BATCHES:
                            case = Case(resolution, rank, batch, checkpointing, targets, dropout=dropout)
                            key = (resolution, checkpointing, targets, dropout > 0)
                            corners.setdefault(key, {})[(rank, batch)] = phases(case)
    for key, values in corners.items():
        table["STEP"][key] = {
            part: tuple(tuple(values[(rank, batch)][part] for batch in BATCHES) for rank in RANKS)
            for part in ("activations", "optimizer")
        }
    for resolution in RESOLUTIONS:
        for checkpointing in (True, False):
            fused = corners[(resolution, checkpointing, "default", False)]
            table["MATH_EXTRA"][(resolution, checkpointing)] = tuple(
                phases(Case(resolution, RANKS[0], batch, checkpointing, attention="math"))["activations"]
                - fused[(RANKS[0], batch)]["activations"]
                for batch in BATCHES
            )
    for targets in TARGETS:
        extra: dict[str, list[int]] = {"activations": [], "optimizer": [], "resident": []}
        for rank in RANKS:
            plain = phases(Case(1024, rank, targets=targets))
            modulated = phases(Case(1024, rank, targets=targets, modulation=True))
            for part, field in (("activations", "activations"), ("optimizer", "optimizer"), ("resident", "static")):
                extra[part].append(modulated[field] - plain[field])
        table["MODULATION_EXTRA"][targets] = {part: tuple(values) for part, values in extra.items()}
    previews: dict[int, list[int]] = {r: [] for r in RESOLUTIONS}
    encodes: dict[int, list[int]] = {r: [] for r in RESOLUTIONS}
    for rank in RANKS:
        for resolution in RESOLUTIONS:
            previews[resolution].append(trainer.held_out(Case(resolution, rank))["peak"])
            encodes[resolution].append(trainer.vae_encode(Case(resolution, rank))["peak"])
            console.print(
                f"  {resolution}², rank {rank}: preview {previews[resolution][-1] / GB:.2f} GB, "
                f"VAE encode {encodes[resolution][-1] / GB:.2f} GB"
            )
    table["PREVIEW"] = {r: tuple(v) for r, v in previews.items()}
    table["VAE_ENCODE"] = {r: tuple(v) for r, v in encodes.items()}
    table["FP32_SMALLEST"] = step(Case(512, RANKS[0], targets="attention", base="fp32"))
    table["CHECKS"] = [{"case": dataclasses.asdict(case), "measured": step(case)} for case in check_cases()]
    with tempfile.TemporaryDirectory() as smoke_dir:
        table["CANARY"] = canary_figures(MetaTrainer(SMOKE_TRANSFORMER, SMOKE_VAE, SMOKE_TEXT_TOKENS, Path(smoke_dir)))
    table["MEASURED"] = provenance(time.perf_counter() - began)
    table["RUNS"] = runs  # every training step measured (for --reuse); not part of the written module
    return table


def _case_key(case: dict[str, Any]) -> str:
    return json.dumps(case, sort_keys=True)


def step_peaks(measured: dict[str, Any]) -> dict[str, int]:
    """A step's two peaks: during forward and backward, and after them (clipping, the optimizer)."""
    activations = max(measured["phases"].get("forward", 0), measured["phases"].get("backward", 0))
    after = measured["peak"] if measured["peak"] > activations else measured["phases"].get("optimizer", 0)
    return {"activations": activations, "optimizer": after}


def canary_figures(trainer: MetaTrainer) -> dict[str, int]:
    case = Case(**CANARY)
    measured = trainer.train_step(case)
    return {"static": measured["static"], "peak": measured["peak"], "preview": trainer.held_out(case)["peak"]}


def provenance(seconds: float) -> dict[str, str]:
    import diffusers
    import peft
    import torch

    return {
        "command": "python -m bench.memory --table",
        "time": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "seconds": f"{seconds:.0f}",
        "load_average": load_average(),
    }


HEADER = '''"""Peak GPU memory of FLUX.1-Kontext-dev LoRA training, in bytes: measured, not estimated.

Generated by `python -m bench.memory --table` (bench/memory_table.py, which says what each table holds): the
trainer's code on the full-size model on the meta device, every allocation counted (bench/meta_memory.py). Do not
edit; re-measure. kontext_lora/api/memory.py interpolates it; tests/bench/test_memory.py re-measures CANARY and
fails when the figures went stale.
"""
'''


def render_table(table: dict[str, Any]) -> str:
    parts = [HEADER]
    for name in ("MEASURED", "STEP", "MATH_EXTRA", "MODULATION_EXTRA", "PREVIEW", "VAE_ENCODE", "FP32_SMALLEST"):
        parts.append(f"{name} = {pprint.pformat(table[name], width=118, sort_dicts=True)}\n")
    parts.append(f"RANKS = {RANKS!r}\nBATCHES = {BATCHES!r}\n")
    parts.append(f"CHECKS = {pprint.pformat(table['CHECKS'], width=118, sort_dicts=True)}\n")
    parts.append(f"CANARY = {pprint.pformat({**table['CANARY'], 'case': CANARY}, width=118, sort_dicts=True)}\n")
    return "\n".join(parts)


def write_table(table: dict[str, Any], path: Path) -> None:
    path.write_text(render_table(table))
    ruff = Path(sys.executable).with_name("ruff")
    if ruff.is_file():  # the repository's formatting, so `ruff format` leaves the generated file alone
        subprocess.run([str(ruff), "format", "--quiet", str(path)], check=True)
