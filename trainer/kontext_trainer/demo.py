"""`kontext-lora demo`: the README's first command — a real LoRA training run on CPU, no cluster, no downloads.

It trains `examples/local-demo.yaml` ("remove the coloured shape") on the example pairs (generated on first use)
on the toy base (model/toy: a small FLUX.1-Kontext that knows other edits, never this one; built once and cached),
shows the progress bar, writes and rotates checkpoints with held-out loss, edit score and preview grids, and prints
the edit score of the base model and of each kept checkpoint, and where the LoRA is. Its output goes to
`<work dir>/lora/` (`runs/demo/lora/` by default, as the job file says); each demo run starts fresh there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from kontext_lora.api import KontextLoRAJob, load_job_file

from .data.synthetic import write_example_pairs
from .errors import ExitCode
from .logs import setup_logging
from .main import configure_torch, execute
from .model.tiny import save_tiny_model
from .model.toy import TOY_BASE_NAME, save_toy_base
from .settings import TrainerSettings
from .storage import Location

REPO = Path(__file__).resolve().parents[2]
DEMO_JOB = REPO / "examples" / "local-demo.yaml"
TINY_MODEL = "tiny-flux-kontext-v2"  # bump whenever the weights or tokenizers a seed gives change
EXAMPLE_PAIRS = 12


def cache_dir() -> Path:
    return Path(os.environ.get("KONTEXT_LORA_CACHE", Path.home() / ".cache" / "kontext-lora"))


def _build_once(destination: Path, build) -> Path:
    """Build into a temporary sibling folder and rename it into place: concurrent builders never see halves."""
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        build(scratch)
        try:
            scratch.rename(destination)
        except OSError:
            if not destination.is_dir():  # lost a race to another builder: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return destination


def ensure_tiny_model() -> Path:
    """The tiny random-initialised model (fast machinery tests)."""
    return _build_once(cache_dir() / "models" / TINY_MODEL, lambda path: save_tiny_model(path, seed=0))


def ensure_toy_base() -> Path:
    """The toy base that can edit (the demo's base), built once (about a minute) into the cache."""
    return _build_once(cache_dir() / "models" / TOY_BASE_NAME, lambda path: save_toy_base(path, seed=0))


def ensure_example_pairs(job: KontextLoRAJob, root: Path) -> Path:
    spec = job.spec.dataset
    return _build_once(
        root,
        lambda path: write_example_pairs(
            path, count=EXAMPLE_PAIRS, control_dir=spec.control_dir, target_dir=spec.target_dir
        ),
    )


def run_demo(work_dir: Path, job_file: Path = DEMO_JOB) -> int:
    console = Console(highlight=False)  # the summary goes to stdout; logs and progress bars to stderr
    if not job_file.is_file():
        console.print(f"[red]error:[/] {job_file} not found: run the demo from a clone of the repository")
        return ExitCode.INVALID_INPUT
    work_dir = work_dir.resolve()
    settings = TrainerSettings.resolve(
        work_dir=work_dir,
        metrics_port=None,
        base_dir=job_file.resolve().parent,
        default_work_dir=work_dir,
        in_cluster=False,
    )
    setup_logging(json_lines=settings.json_logs)
    configure_torch()
    job = load_job_file(job_file)
    pairs = ensure_example_pairs(job, Path(Location.parse(job.spec.dataset.uri, settings.base_dir).prefix))
    model = ensure_toy_base()
    output = work_dir / "lora"
    # A fresh run every time: previous demo checkpoints would otherwise be resumed from.
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    job.spec.model.base = str(model)
    job.spec.dataset.uri = pairs.as_uri()
    job.spec.output.uri = output.as_uri() + "/"
    work_dir.mkdir(parents=True, exist_ok=True)
    job_as_run = work_dir / "job.yaml"
    job_as_run.write_text(yaml.safe_dump(job.to_wire(), sort_keys=False))
    resume = f"kontext-lora train {job_as_run} --work-dir {work_dir}"
    console.print(
        f"[bold]kontext-lora demo[/]: {job.spec.training.steps} steps of LoRA training on the example pairs in "
        f"{pairs}\non the toy base in {model} (a small FLUX.1-Kontext that knows other edits; CPU, "
        f"{job.spec.model.dtype.value})\n"
    )

    code, result = execute(job, settings, resume_hint=f"`{resume}` resumes")
    if code in (ExitCode.INTERRUPTED, ExitCode.TERMINATED):
        console.print(
            f"[yellow]demo stopped[/] (exit code {int(code)}): resume it from its newest checkpoint with\n"
            f"  {resume}\n(`kontext-lora demo` starts over)"
        )
        return code
    if result is None:
        console.print(f"[red]demo failed[/] (exit code {int(code)}); see the log above")
        return code

    table = Table(title=f"checkpoints kept in {output}/ (newest last)", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("held-out loss", justify="right")
    table.add_column("edit score: LoRA (base)", justify="right")
    table.add_column("folder (LoRA, training state, validation.json, preview.png)")
    for record in result.checkpoints:
        best = " (best)" if record.uri == result.best_checkpoint else ""
        loss = "n/a" if record.validation_loss is None else f"{record.validation_loss:.4f}"
        score = "n/a" if record.edit_score is None else f"{record.edit_score:.2f} dB ({record.base_edit_score:.2f} dB)"
        folder = Path(_path(record.uri)).parent.relative_to(output)
        table.add_row(f"{record.step}{best}", loss, score, f"{folder}/")
    console.print(table)
    mean_step = sum(result.step_seconds) / len(result.step_seconds) if result.step_seconds else float("nan")
    before = "n/a" if result.validation_before is None else f"{result.validation_before:.4f}"
    after = "n/a" if result.validation_after is None else f"{result.validation_after:.4f}"
    scored = [r for r in result.checkpoints if r.edit_score is not None]
    best = next((r for r in scored if r.uri == result.best_checkpoint and r is not scored[-1]), None)
    edit = (
        f"edit score on the held-out pairs (PSNR against the target): base model {result.base_edit_score:.2f} dB -> "
        f"LoRA {scored[-1].edit_score:.2f} dB after {scored[-1].step} steps"
        + (f"; the best checkpoint is step {best.step}, {best.edit_score:.2f} dB" if best else "")
        + "\n"
        if scored and result.base_edit_score is not None
        else ""
    )
    console.print(
        f"{edit}held-out loss: {before} before training -> {after} after {result.total_steps} steps\n"
        f"time: {result.seconds:.0f} s in all, {mean_step * 1000:.0f} ms per training step\n"
        f"the job as run: {job_as_run} (kontext-lora train {job_as_run} resumes it)\n"
    )
    console.print(f"[bold green]LoRA:[/] {_path(result.lora_uri)}")
    return ExitCode.OK


def _path(uri: str | None) -> str:
    return uri.removeprefix("file://") if uri else ""
