"""Recipe ablation on the toy base: each recipe option trained by the real trainer, scored by the edit it performs.

    python -m bench.recipe_ablation                          # 6 variants x seeds 42, 1 (~40 min on 2 idle cores)
    python -m bench.recipe_ablation --variants shift,weighted --seeds 42,1,7 --workers 2
    python -m bench.recipe_ablation --smoke                  # two variants, a few steps (CI)

The world is the toy base's (model/toy, docs/toy-base.md): a small FLUX.1-Kontext in the real diffusers classes
that performs brighter/darker/warmer/cooler but not the job's edit, "remove the coloured shape". Every run is a
real `kontext-lora train` run (in-process `run_training`) of the demo's recipe as tests/trainer/test_edit.py
trains it (10 generated pairs, one held out, 256 px, rank 16, learning rate 3e-3, 150 steps, fp32 on the CPU) and
the recipe before this ablation (timestepSampling shift 3.0: the baseline), with one option changed. The finished
LoRA is loaded into `FluxKontextPipeline` with `load_lora_weights`, as users load it, and run on four scenes no run
trained on (seeds 5000-5003); the edit score is the mean PSNR in dB of the output against the true "after" image
(20 inference steps, generator seed 0). The base model's score (no LoRA) is measured once.

Reported per variant: the mean and spread of the edit score over the training seeds, and the mean paired
difference from the baseline (same training seed: same LoRA initialisation, batch order and noise draws where the
option leaves them alone) with its standard error. Runs go to `--workers` processes of one thread each.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .harness import console, load_average, machine, write_result

TRIGGER = "RMV,"
EVALUATION_SEEDS = range(5000, 5004)  # scenes the training pairs (seeds 2024 + i) never use
SIZE = 256
INFERENCE_STEPS = 20
STEPS = 150
PAIRS = 10

# Every variant starts from the baseline, the recipe before this ablation (timestepSampling shift 3.0, no caption
# dropout, attention + MLP targets), and changes one thing: name -> (what it changes, the spec sections it sets).
BASELINE = "shift"
BASELINE_RECIPE: dict[str, dict[str, Any]] = {"training": {"timestepSampling": "shift", "timestepShift": 3.0}}
VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "shift": ("the baseline: timestepSampling shift 3.0, no caption dropout, attention + MLP targets", {}),
    "sigmoid": (
        "timestepSampling: sigmoid (ai-toolkit's default; the product's since this ablation)",
        {"training": {"timestepSampling": "sigmoid"}},
    ),
    "flux_shift": (
        "timestepSampling: flux_shift (the bucket's dynamic shift)",
        {"training": {"timestepSampling": "flux_shift"}},
    ),
    "weighted": (
        "timestepSampling: weighted (ai-toolkit's Kontext example)",
        {"training": {"timestepSampling": "weighted"}},
    ),
    "uniform": ("timestepSampling: uniform", {"training": {"timestepSampling": "uniform"}}),
    "caption_dropout": ("captionDropout: 0.05 (ai-toolkit's)", {"training": {"captionDropout": 0.05}}),
    "modulation": ("lora.modulation: true (AdaLN projections too)", {"lora": {"modulation": True}}),
    "lr_1e-3": ("learningRate: 1e-3", {"training": {"learningRate": 1.0e-3}}),
    "modulation_lr_1e-3": (
        "lora.modulation: true and learningRate: 1e-3",
        {"lora": {"modulation": True}, "training": {"learningRate": 1.0e-3}},
    ),
    "rank_32": ("lora.rank: 32", {"lora": {"rank": 32}}),
}
DEFAULT_VARIANTS = ("shift", "sigmoid", "flux_shift", "weighted", "caption_dropout", "modulation")


def job_document(name: str, model_dir: Path, pairs: Path, output: Path, steps: int, seed: int, variant: str) -> dict:
    spec: dict[str, dict[str, Any]] = {
        "model": {"base": str(model_dir), "dtype": "fp32"},
        "dataset": {
            "uri": pairs.as_uri() + "/",
            "triggerWord": TRIGGER,
            "defaultCaption": "remove the coloured shape",
            "resolution": SIZE,
            "heldOutPairs": 1,
        },
        "lora": {"rank": 16},
        "training": {"steps": steps, "learningRate": 3.0e-3, "gradientCheckpointing": False, "seed": seed},
        "checkpoints": {"saveEvery": steps, "keep": 1},
        "output": {"uri": output.as_uri() + "/", "name": "lora"},
    }
    for overrides in (BASELINE_RECIPE, VARIANTS[variant][1]):
        for section, values in overrides.items():
            spec[section] = {**spec[section], **values}
    return {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": name},
        "spec": spec,
    }


@dataclass(frozen=True)
class Scoring:
    scenes: tuple[int, ...] = tuple(EVALUATION_SEEDS)
    inference_steps: int = INFERENCE_STEPS


SMOKE_SCORING = Scoring(scenes=(EVALUATION_SEEDS[0],), inference_steps=2)


@dataclass(frozen=True)
class Task:
    variant: str
    seed: int
    steps: int
    model_dir: Path
    pairs: Path
    root: Path
    scoring: Scoring = Scoring()


def edit_score(model_dir: Path, lora: Path | None, scoring: Scoring = Scoring()) -> float:
    """Mean PSNR (dB) against the true "after" image of the pipeline's output on the evaluation scenes."""
    import numpy as np
    from diffusers import FluxKontextPipeline
    from kontext_trainer.data.synthetic import render_pair
    from kontext_trainer.image_metrics import psnr
    from kontext_trainer.model.toy.evaluate import run_edit

    pipeline = FluxKontextPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(str(lora), adapter_name="ablation")
    scores = []
    for seed in scoring.scenes:
        control, target, instruction = render_pair(seed, SIZE)
        scores.append(psnr(run_edit(pipeline, control, f"{TRIGGER} {instruction}", scoring.inference_steps), target))
    return float(np.mean(scores))


def run_task(task: Task) -> dict[str, Any]:
    """Train one (variant, seed) and score its LoRA; in a worker process of one thread."""
    import warnings

    import torch
    import yaml

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from kontext_trainer.errors import ExitCode
    from kontext_trainer.main import run_training
    from kontext_trainer.settings import TrainerSettings

    diffusers_logging.set_verbosity_error()
    name = f"{task.variant.replace('_', '-').lower()}-s{task.seed}"
    folder = task.root / name
    folder.mkdir(parents=True, exist_ok=True)
    job_file = folder / "job.yaml"
    document = job_document(name, task.model_dir, task.pairs, folder / "out", task.steps, task.seed, task.variant)
    job_file.write_text(yaml.safe_dump(document, sort_keys=False))
    settings = TrainerSettings(
        work_dir=folder / "work", base_dir=folder, model_cache=folder / "models", preview_steps=0, show_progress=False
    )
    began = time.perf_counter()
    code = run_training(job_file=job_file, settings=settings)
    if code != ExitCode.OK:
        raise RuntimeError(f"{name}: the training run failed with exit code {code}")
    trained = time.perf_counter() - began
    score = edit_score(task.model_dir, folder / "out" / "lora.safetensors", task.scoring)
    return {
        "variant": task.variant,
        "seed": task.seed,
        "edit_score": score,
        "train_seconds": trained,
        "score_seconds": time.perf_counter() - began - trained,
    }


def summarise(runs: list[dict[str, Any]], base_score: float) -> list[dict[str, Any]]:
    """Per variant: mean ± std over seeds, and the paired difference from the baseline ± its standard error."""
    baseline = {r["seed"]: r["edit_score"] for r in runs if r["variant"] == BASELINE}
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == variant]
        values = [r["edit_score"] for r in group]
        differences = [r["edit_score"] - baseline[r["seed"]] for r in group if r["seed"] in baseline]
        rows.append(
            {
                "variant": variant,
                "change": VARIANTS[variant][0],
                "seeds": [r["seed"] for r in group],
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "over_base": statistics.fmean(values) - base_score,
                "vs_baseline": statistics.fmean(differences) if differences and variant != BASELINE else None,
                "vs_baseline_se": statistics.stdev(differences) / math.sqrt(len(differences))
                if len(differences) > 1 and variant != BASELINE
                else None,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], base_score: float) -> None:
    from rich.table import Table

    table = Table(
        title=f"recipe ablation on the toy base: edit score, PSNR dB vs target (base model {base_score:.2f} dB)"
    )
    for column in ("variant", "change", "seeds", "edit score (mean ± std)", "over base", "Δ vs baseline (± s.e.)"):
        table.add_column(column, justify="left" if column in ("variant", "change") else "right")
    for row in rows:
        delta = row["vs_baseline"]
        table.add_row(
            row["variant"],
            row["change"],
            ",".join(map(str, row["seeds"])),
            f"{row['mean']:.2f} ± {row['std']:.2f}",
            f"{row['over_base']:+.2f}",
            "—"
            if delta is None
            else f"{delta:+.2f}" + (f" ± {row['vs_baseline_se']:.2f}" if row["vs_baseline_se"] is not None else ""),
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"Comma-separated, of {list(VARIANTS)}.")
    parser.add_argument("--seeds", default="42,1", help="Training seeds (spec.training.seed), comma-separated.")
    parser.add_argument("--steps", type=int, default=None, help=f"Steps per run (default {STEPS}; smoke 2).")
    parser.add_argument("--workers", type=int, default=1, help="Runs at once, one thread each.")
    parser.add_argument("--model", type=Path, default=None, help="Base model folder (default: the toy base).")
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep the runs here (default: a temp folder).")
    parser.add_argument(
        "--smoke", action="store_true", help="shift and weighted, one seed, 2 steps, one scene at 2 steps (CI)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kontext_trainer.data.synthetic import write_example_pairs
    from kontext_trainer.demo import ensure_toy_base

    variants = [BASELINE, "weighted"] if args.smoke else args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds = [42] if args.smoke else [int(s) for s in args.seeds.split(",")]
    steps = args.steps or (2 if args.smoke else STEPS)
    model_dir = (args.model or ensure_toy_base()).resolve()
    console.print(
        f"[bold]recipe ablation[/] on {machine()}; load {load_average()}; model {model_dir}; {steps} steps; "
        f"variants {variants}; seeds {seeds}; {args.workers} worker(s)"
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        root = (args.work_dir or Path(temporary)).resolve()
        pairs = write_example_pairs(root / "pairs", count=PAIRS)
        scoring = SMOKE_SCORING if args.smoke else Scoring()
        tasks = [Task(v, s, steps, model_dir, pairs, root, scoring) for s in seeds for v in variants]
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        runs: list[dict[str, Any]] = []
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            scored = pool.submit(edit_score, model_dir, None, scoring)
            for run in pool.map(run_task, tasks):
                runs.append(run)
                console.print(
                    f"  {run['variant']:16s} seed {run['seed']:3d}: edit score {run['edit_score']:.2f} dB "
                    f"(train {run['train_seconds']:.0f} s, score {run['score_seconds']:.0f} s; load {load_average()})"
                )
            base_score = scored.result()
    rows = summarise(runs, base_score)
    print_table(rows, base_score)
    seconds = time.perf_counter() - began
    console.print(f"{len(runs)} runs in {seconds:.0f} s; load {load_average()}")
    write_result(
        args.json,
        {
            "model": str(model_dir),
            "steps": steps,
            "base_score": base_score,
            "rows": rows,
            "runs": runs,
            "seconds": seconds,
            "load": load_average(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
