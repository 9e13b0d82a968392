"""The `kontext-lora` command line.

The core commands (crd, validate) need only the API model. `train`, `demo` and `tiny-model` import the
trainer (the `[trainer]` extra: torch, diffusers, peft...); `operator` imports the kopf operator. Imports
are lazy so the operator image, which has no torch, still runs this CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .api import DEFAULT_BASE_MODEL, InvalidJobError, load_job_file

app = typer.Typer(
    name="kontext-lora",
    help="Train FLUX.1-Kontext-dev image-edit LoRAs: locally, or declaratively on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)

REPO_CRD_DIR = Path(__file__).resolve().parents[1] / "crds"


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _require_trainer() -> None:
    try:
        import kontext_trainer.train  # noqa: F401
    except ModuleNotFoundError as error:
        raise _fail(
            f"the trainer is not installed ({error.name} is missing): "
            "install the trainer extra with `pip install 'kontext-lora[trainer]'`"
        ) from None


@app.command()
def crd(
    output: Annotated[Path, typer.Option(help="Folder to write kontextlorajob.yaml into.")] = REPO_CRD_DIR,
    check: Annotated[bool, typer.Option(help="Only compare: exit 1 when the file differs from the model.")] = False,
    stdout: Annotated[bool, typer.Option(help="Print the CRD instead of writing it.")] = False,
) -> None:
    """Generate the KontextLoRAJob CRD from the API model."""
    from .chart import CHART_CRD_TEMPLATE, CHART_DIR, render_chart_crd
    from .crd import CRD_FILE, render_crd, write_crd

    if stdout:
        sys.stdout.write(render_crd())
        return
    # The chart carries its own copy (Helm cannot read files outside the chart), written alongside the default one.
    chart_crd = CHART_DIR / CHART_CRD_TEMPLATE if output == REPO_CRD_DIR and CHART_DIR.is_dir() else None
    if check:
        path = output / CRD_FILE
        if not path.exists() or path.read_text() != render_crd():
            raise _fail(f"{path} is out of date: run `kontext-lora crd` and commit the result")
        if chart_crd and (not chart_crd.exists() or chart_crd.read_text() != render_chart_crd()):
            raise _fail(f"{chart_crd} is out of date: run `kontext-lora crd` and commit the result")
        console.print(f"{path} matches the API model")
        return
    console.print(f"wrote {write_crd(output)}")
    if chart_crd:
        chart_crd.write_text(render_chart_crd())
        console.print(f"wrote {chart_crd}")


@app.command()
def chart(
    chart_dir: Annotated[Path | None, typer.Option(help="The chart folder (default: charts/kontext-lora).")] = None,
    check: Annotated[bool, typer.Option(help="Only compare: exit 1 when a generated file is stale.")] = False,
) -> None:
    """Regenerate the Helm chart's derived files: CRD, operator RBAC rules, values schema, README values table."""
    from .chart import CHART_DIR, stale_files, undocumented_values, write_chart_files

    directory = chart_dir or CHART_DIR
    if check:
        problems = [f"{path} is out of date" for path in stale_files(directory)]
        problems += [
            f"values.yaml: {key} has no `# --` description"
            for key in undocumented_values((directory / "values.yaml").read_text())
        ]
        if problems:
            raise _fail("; ".join(problems) + ": run `kontext-lora chart` and commit the result")
        console.print(f"{directory}: generated files are up to date")
        return
    try:
        written = write_chart_files(directory)
    except ValueError as error:
        raise _fail(str(error)) from None
    for path in written:
        console.print(f"wrote {path}")
    if not written:
        console.print(f"{directory}: generated files are up to date")


@app.command()
def validate(job_file: Annotated[Path, typer.Argument(help="KontextLoRAJob YAML file.")]) -> None:
    """Check a KontextLoRAJob file against the API model and print it with every default filled in; for
    FLUX.1-Kontext-dev from the hub, also its measured peak GPU memory against its GPU class (as the operator does)."""
    import yaml

    from .api.memory import GPU_BUDGET_BYTES, admission_problem, estimate_peak

    try:
        job = load_job_file(job_file)
    except InvalidJobError as error:
        raise _fail(str(error)) from None
    sys.stdout.write(yaml.safe_dump(job.to_wire(), sort_keys=False))
    if (problem := admission_problem(job.spec)) is not None:
        raise _fail(f"{job_file}: {problem}")
    if job.spec.model.base == DEFAULT_BASE_MODEL:
        peak, gpu = estimate_peak(job.spec), job.spec.resources.gpu
        console.print(
            f"peak GPU memory: about {peak.gb:.1f} GB ({peak.what}; measured on the full model) of the "
            f"{GPU_BUDGET_BYTES[gpu] / 1e9:.0f} GB a {gpu.value} leaves for training"
        )
    else:
        console.print("peak GPU memory: checked by the trainer at start, once it has the model (not the hub's)")


@app.command()
def train(
    job_file: Annotated[Path | None, typer.Argument(help="KontextLoRAJob YAML file (local runs).")] = None,
    from_env: Annotated[bool, typer.Option(help="Read the job from $KONTEXT_LORA_JOB (set by the operator).")] = False,
    work_dir: Annotated[Path | None, typer.Option(help="Local working folder (downloads, cache, checkpoints).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port (0 = off).")] = None,
) -> None:
    """Train a LoRA from a KontextLoRAJob: pull the pairs, train, checkpoint, upload."""
    _require_trainer()
    from kontext_trainer.main import run_training

    raise typer.Exit(run_training(job_file=job_file, from_env=from_env, work_dir=work_dir, metrics_port=metrics_port))


@app.command()
def prepare(
    job_file: Annotated[Path | None, typer.Argument(help="KontextLoRAJob YAML file (local runs).")] = None,
    from_env: Annotated[bool, typer.Option(help="Read the job from $KONTEXT_LORA_JOB (set by the operator).")] = False,
    work_dir: Annotated[Path | None, typer.Option(help="Local working folder (the downloaded pairs).")] = None,
    download_model: Annotated[
        bool | None,
        typer.Option(
            "--download-model/--no-download-model",
            help="Also download the model into the model cache ($HF_HOME); default: $KONTEXT_LORA_FILL_MODEL_CACHE.",
        ),
    ] = None,
) -> None:
    """Check a job's inputs without training: storage, model access, every pair; writes <output>/preparation.json."""
    _require_trainer()
    from kontext_trainer.main import run_training

    code = run_training(
        job_file=job_file, from_env=from_env, work_dir=work_dir, prepare_only=True, fill_model_cache=download_model
    )
    raise typer.Exit(code)


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the demo writes its model, data and LoRA.")] = Path("runs/demo"),
) -> None:
    """Train a LoRA on the bundled example pairs with a tiny model on CPU: no cluster, no downloads."""
    _require_trainer()
    from kontext_trainer.demo import run_demo

    raise typer.Exit(run_demo(work_dir))


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[
        Path | None,
        typer.Argument(help="Folder to save the diffusers-format model into (with --toy-base: default the cache)."),
    ] = None,
    toy_base: Annotated[
        bool,
        typer.Option(
            "--toy-base",
            help="Build the toy base that performs edits (keep, brighter, darker, warmer, cooler), fitted to the "
            "scene world; without it the weights are random.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for the weights.")] = 0,
) -> None:
    """Build a tiny FLUX.1-Kontext model (transformer, VAE, CLIP, T5, tokenizers) in diffusers format."""
    _require_trainer()
    if not toy_base:
        if directory is None:
            raise _fail("give the folder to save the model into (or --toy-base to build the toy base into the cache)")
        from kontext_trainer.model.tiny import save_tiny_model

        console.print(f"saved tiny FLUX.1-Kontext model to {save_tiny_model(directory, seed=seed)}")
        return
    from kontext_trainer.demo import ensure_toy_base
    from kontext_trainer.model.toy import read_report, save_toy_base

    if directory is None:
        if seed != 0:
            raise _fail("the cached toy base is built from seed 0: give a folder to build another seed into")
        directory = ensure_toy_base()
        report = read_report(directory)
    else:
        report = save_toy_base(directory, seed=seed)
    edits = ", ".join(f"{name} {value:.1f} dB" for name, value in report.edit_psnr.items())
    console.print(
        f"toy base {report.name} (seed {report.seed}) in {directory}: built in {report.build_seconds:.0f} s\n"
        f"on {report.evaluation_size} px scenes it never saw: VAE reconstruction {report.vae_psnr:.1f} dB; "
        f"edits through FluxKontextPipeline ({report.inference_steps} steps, PSNR against the exact edit): {edits}; "
        f"an instruction it does not know keeps the image ({report.unknown_instruction_psnr:.1f} dB)",
        highlight=False,
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def operator(ctx: typer.Context) -> None:
    """Run the Kubernetes operator (extra arguments go to `kopf run`, e.g. --namespace, --priority)."""
    from kontext_operator.main import run_operator

    raise typer.Exit(run_operator(ctx.args))


if __name__ == "__main__":
    app()
