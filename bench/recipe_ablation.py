"""Recipe ablation: the same job trained under each timestep scheme, with and without caption dropout, over seeds.

    python -m bench.recipe_ablation                                  # the tiny model, the demo's pairs (~30 min)
    python -m bench.recipe_ablation --model DIR --steps 300 --seeds 5
    python -m bench.recipe_ablation --score mypackage.scores:edit_psnr   # a score of your own (repeatable)
    python -m bench.recipe_ablation --smoke                          # seconds (CI)

Every run is a real `kontext-lora train` run (in-process, `run_training`) of one job (default:
examples/local-demo.yaml on a given base model, default the tiny model) with `training.timestepSampling`,
`training.captionDropout` and `training.seed` set; everything else is the job's. Each finished LoRA is then loaded
into `FluxKontextPipeline` (`load_lora_weights`, as users load it) and scored on the run's held-out pairs.

Scores are pluggable: a callable `score(run: AblationRun) -> float`, with optional attributes `label` and
`higher_is_better` (default False). Built in, both measured on the held-out pairs with fixed noise, the same for
every scheme (the trainer's own held-out loss uses each scheme's timesteps, so it cannot compare schemes):

- `inference_loss`: the flow-matching loss at the sigmas FluxKontextPipeline denoises with (28 steps, the bucket's
  dynamic shift) — the error that sampling accumulates;
- `uniform_loss`: the same loss at 16 timesteps uniform in (0, 1).

An edit score (e.g. PSNR of the pipeline's output against the target) plugs in the same way: `AblationRun` has the
LoRA, the model folder, the job and the held-out pairs' files.

The table: per scheme and caption dropout, each score's mean ± standard deviation over the seeds, and the mean
paired difference from the default recipe (`shift`, no dropout) with its standard error — the seeds are shared, so
the comparison is paired (same LoRA init, batch order and held-out pairs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import console, load_average, machine, write_result

REPO = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO / "examples" / "local-demo.yaml"
SCHEMES = ("shift", "flux_shift", "sigmoid", "uniform", "weighted")
DROPOUTS = (0.0, 0.05)
BASELINE = ("shift", 0.0)


@dataclass
class AblationRun:
    """One finished run, what a score needs."""

    scheme: str
    caption_dropout: float
    seed: int
    lora: Path
    model_dir: Path
    job: Any  # kontext_lora.api.KontextLoRAJob as it ran
    work_dir: Path
    held_out_stems: list[str]
    validation_loss: float | None  # the trainer's own (scheme-specific) held-out loss
    scores: dict[str, float] = field(default_factory=dict)


Score = Callable[[AblationRun], float]


# ---- the built-in scores: held-out flow-matching loss at scheme-independent timesteps ---------------------------


def _held_out_losses(run: AblationRun, sigmas_for: Callable[[int], Any]) -> float:
    """Mean loss of the LoRA as diffusers loads it, over held-out pairs x `sigmas_for(target tokens)`."""
    import torch
    from kontext_trainer import flux_math
    from kontext_trainer.data.dataset import prepare_dataset
    from kontext_trainer.encoding import DatasetEncoder, batch_inputs
    from kontext_trainer.storage import LocalStorage, Location

    spec = run.job.spec
    storage = LocalStorage(Location.parse(spec.dataset.uri))
    pairs, _ = prepare_dataset(storage, spec.dataset, run.work_dir / "dataset", show_progress=False)
    held = [p for p in pairs if p.stem in run.held_out_stems]
    encoder = DatasetEncoder(run.model_dir, run.work_dir / "cache", torch.device("cpu"), torch.float32, torch.float32)
    encoded, _ = encoder.encode(held, cache_latents=True, keep_vae=False, show_progress=False)
    pipeline = _pipeline(run.model_dir)
    pipeline.load_lora_weights(str(run.lora), adapter_name="ablation")
    transformer = pipeline.transformer.eval()
    generator = torch.Generator().manual_seed(1234)  # the same noise for every run
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for item in encoded:
                inputs = batch_inputs([item], None)
                for sigma in sigmas_for(inputs.target.shape[1]):
                    noise = torch.randn(inputs.target.shape, generator=generator)
                    loss = flux_math.flow_matching_loss(
                        transformer, inputs, noise, torch.tensor([float(sigma)]), spec.training.guidance_scale
                    )
                    total, count = total + float(loss), count + 1
    finally:
        pipeline.unload_lora_weights()
    return total / count


_PIPELINES: dict[Path, Any] = {}


def _pipeline(model_dir: Path) -> Any:
    from diffusers import FluxKontextPipeline

    if model_dir not in _PIPELINES:
        _PIPELINES[model_dir] = FluxKontextPipeline.from_pretrained(model_dir)
        _PIPELINES[model_dir].set_progress_bar_config(disable=True)
    return _PIPELINES[model_dir]


def inference_loss(run: AblationRun) -> float:
    import torch
    from kontext_trainer import flux_math
    from kontext_trainer.model.load import load_scheduler

    dynamic = flux_math.DynamicShift.from_scheduler_config(load_scheduler(run.model_dir).config)
    steps = 28  # FluxKontextPipeline's default num_inference_steps
    linear = torch.linspace(1.0, 1 / steps, steps)
    return _held_out_losses(run, lambda tokens: flux_math.shift_timesteps(linear, dynamic.shift(tokens)))


inference_loss.label = "held-out loss at the pipeline's sigmas"  # type: ignore[attr-defined]


def uniform_loss(run: AblationRun) -> float:
    from kontext_trainer import flux_math

    return _held_out_losses(run, lambda _tokens: flux_math.stratified_sigmas(16, "uniform"))


uniform_loss.label = "held-out loss at uniform t"  # type: ignore[attr-defined]
BUILT_IN: dict[str, Score] = {"inference_loss": inference_loss, "uniform_loss": uniform_loss}


def load_score(name: str) -> Score:
    """A built-in score by name, or `package.module:function`."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, _, attribute = name.partition(":")
    if not attribute:
        raise SystemExit(f"--score {name!r}: expected one of {sorted(BUILT_IN)} or package.module:function")
    return getattr(importlib.import_module(module), attribute)


def score_label(name: str, score: Score) -> str:
    return getattr(score, "label", name)


# ---- running ------------------------------------------------------------------------------------------------


def train(
    base_job: dict[str, Any], model_dir: Path, root: Path, scheme: str, dropout: float, seed: int, steps: int
) -> AblationRun:
    import yaml
    from kontext_trainer.errors import ExitCode
    from kontext_trainer.main import run_training
    from kontext_trainer.settings import TrainerSettings

    from kontext_lora.api import load_job_file

    name = f"{scheme.replace('_', '-')}-d{round(dropout * 100):02d}-s{seed}"
    folder = root / name
    document = json.loads(json.dumps(base_job))
    spec = document["spec"]
    spec.setdefault("model", {})["base"] = str(model_dir)
    spec.setdefault("training", {}).update(
        timestepSampling=scheme, captionDropout=dropout, seed=seed, steps=steps, gradientCheckpointing=False
    )
    spec["checkpoints"] = {"saveEvery": steps, "keep": 1}
    spec["output"] = {"uri": (folder / "out").as_uri() + "/", "name": "lora"}
    document["metadata"]["name"] = name
    folder.mkdir(parents=True, exist_ok=True)
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(document, sort_keys=False))
    # Every run encodes the same pairs with the same model: one shared encoding cache (keyed by model and pair).
    (folder / "work").mkdir(parents=True, exist_ok=True)
    (root / "cache").mkdir(exist_ok=True)
    if not (folder / "work" / "cache").exists():
        (folder / "work" / "cache").symlink_to(root / "cache", target_is_directory=True)
    settings = TrainerSettings(
        work_dir=folder / "work", base_dir=folder, model_cache=root / "models", preview_steps=0, show_progress=False
    )
    code = run_training(job_file=job_file, settings=settings)
    if code != ExitCode.OK:
        raise RuntimeError(f"{name}: the training run failed with exit code {code} (log above)")
    validation = json.loads(next((folder / "out" / "checkpoints").glob("step-*/validation.json")).read_text())
    return AblationRun(
        scheme=scheme,
        caption_dropout=dropout,
        seed=seed,
        lora=folder / "out" / "lora.safetensors",
        model_dir=model_dir,
        job=load_job_file(job_file),
        work_dir=folder / "work",
        held_out_stems=sorted(set(validation["heldOutPairs"])),
        validation_loss=validation["validationLoss"],
    )


def summarise(runs: list[AblationRun], names: list[str]) -> list[dict[str, Any]]:
    """Per (scheme, dropout): mean ± std of each score, and the paired difference from the baseline recipe."""
    baseline = {r.seed: r for r in runs if (r.scheme, r.caption_dropout) == BASELINE}
    rows = []
    for key in dict.fromkeys((r.scheme, r.caption_dropout) for r in runs):
        group = [r for r in runs if (r.scheme, r.caption_dropout) == key]
        row: dict[str, Any] = {"scheme": key[0], "caption_dropout": key[1], "seeds": [r.seed for r in group]}
        for name in names:
            values = [r.scores[name] for r in group]
            differences = [r.scores[name] - baseline[r.seed].scores[name] for r in group if r.seed in baseline]
            row[name] = {
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "vs_baseline": statistics.fmean(differences) if differences else None,
                "vs_baseline_se": statistics.stdev(differences) / math.sqrt(len(differences))
                if len(differences) > 1
                else None,
            }
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], names: list[str], labels: dict[str, str], better: dict[str, bool]) -> None:
    from rich.table import Table

    table = Table(title="recipe ablation (mean ± std over seeds; Δ = paired difference from shift, no dropout ± s.e.)")
    table.add_column("timesteps")
    table.add_column("caption dropout", justify="right")
    for name in names:
        arrow = "↑" if better[name] else "↓"
        table.add_column(f"{labels[name]} {arrow}", justify="right")
        table.add_column("Δ", justify="right")
    for row in rows:
        cells = [row["scheme"], f"{row['caption_dropout']:g}"]
        for name in names:
            stat = row[name]
            cells.append(f"{stat['mean']:.4f} ± {stat['std']:.4f}")
            delta = stat["vs_baseline"]
            se = stat["vs_baseline_se"]
            if delta is None or (row["scheme"], row["caption_dropout"]) == BASELINE:
                cells.append("—")
            else:
                cells.append(f"{delta:+.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        table.add_row(*cells)
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Base model folder (default: the tiny model).")
    parser.add_argument("--job", type=Path, default=DEMO_JOB, help="The job to train (its dataset, rank, LR...).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default 200; smoke 4).")
    parser.add_argument("--seeds", type=int, default=None, help="Seeds per recipe (default 3; smoke 1).")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="Timestep schemes, comma-separated.")
    parser.add_argument(
        "--caption-dropout", default=",".join(f"{d:g}" for d in DROPOUTS), help="Caption-dropout values."
    )
    parser.add_argument("--score", action="append", default=None, help="Score (repeatable): a built-in or module:fn.")
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep the runs here (default: a temp folder).")
    parser.add_argument("--smoke", action="store_true", help="Two recipes, one seed, a few steps (CI).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import yaml
    from diffusers.utils import logging as diffusers_logging
    from kontext_trainer.data.synthetic import write_example_pairs
    from kontext_trainer.demo import ensure_example_pairs, ensure_tiny_model
    from kontext_trainer.storage import Location

    from kontext_lora.api import load_job_file

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    schemes = ["shift", "weighted"] if args.smoke else args.schemes.split(",")
    dropouts = [0.0, 0.5] if args.smoke else [float(d) for d in args.caption_dropout.split(",")]
    steps = args.steps or (2 if args.smoke else 200)
    seeds = list(range(args.seeds or (1 if args.smoke else 3)))
    names = args.score or ["inference_loss", "uniform_loss"]
    scores = {name: load_score(name) for name in names}
    labels = {name: score_label(name, score) for name, score in scores.items()}
    better = {name: bool(getattr(score, "higher_is_better", False)) for name, score in scores.items()}
    model_dir = (args.model or ensure_tiny_model()).resolve()
    job = load_job_file(args.job)
    base_job = yaml.safe_load(args.job.read_text())
    smoke_pairs = tempfile.TemporaryDirectory() if args.smoke else None
    if smoke_pairs is not None:  # three small pairs (two to train on, one held out): seconds per run
        pairs = write_example_pairs(Path(smoke_pairs.name) / "pairs", count=3)
        base_job["spec"]["dataset"].update(uri=pairs.as_uri() + "/", heldOutPairs=1)
    elif job.spec.dataset.uri.startswith("file://"):  # relative to the job file; the demo's pairs: made on first use
        pairs = Path(Location.parse(job.spec.dataset.uri, args.job.resolve().parent).prefix)
        if args.job.resolve() == DEMO_JOB:
            ensure_example_pairs(job, pairs)
        base_job["spec"]["dataset"]["uri"] = pairs.as_uri() + "/"
    console.print(
        f"[bold]recipe ablation[/] on {machine()}; load {load_average()}; model {model_dir}; job {args.job.name}; "
        f"{steps} steps; schemes {schemes}; caption dropout {dropouts}; seeds {seeds}; scores {list(labels.values())}"
    )
    began = time.perf_counter()
    runs: list[AblationRun] = []
    with tempfile.TemporaryDirectory() as temporary:
        root = args.work_dir or Path(temporary)
        for seed in seeds:
            for scheme in schemes:
                for dropout in dropouts:
                    started = time.perf_counter()
                    run = train(base_job, model_dir, root, scheme, dropout, seed, steps)
                    run.scores = {name: float(score(run)) for name, score in scores.items()}
                    runs.append(run)
                    console.print(
                        f"  {scheme:10s} dropout {dropout:<4g} seed {seed}: "
                        + ", ".join(f"{labels[n]} {v:.4f}" for n, v in run.scores.items())
                        + f" ({time.perf_counter() - started:.0f} s)"
                    )
    rows = summarise(runs, names)
    print_table(rows, names, labels, better)
    seconds = time.perf_counter() - began
    console.print(f"{len(runs)} runs in {seconds:.0f} s; load {load_average()}")
    write_result(
        args.json,
        {
            "model": str(model_dir),
            "job": str(args.job),
            "steps": steps,
            "scores": labels,
            "rows": rows,
            "runs": [
                {
                    "scheme": r.scheme,
                    "caption_dropout": r.caption_dropout,
                    "seed": r.seed,
                    "scores": r.scores,
                    "validation_loss": r.validation_loss,
                    "held_out": r.held_out_stems,
                }
                for r in runs
            ],
            "seconds": seconds,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
