"""`kontext-lora train` and `prepare`: read the job, run it, turn the outcome into the exit codes of
docs/architecture.md.

0 LoRA uploaded (prepare: inputs valid, manifest written); 2 invalid input (dataset, spec, model, incompatible
checkpoints: no retry helps); 3 storage unreachable after bounded retries; 4 the hub refused the model (gated and
the licence not accepted, no token or a bad one); 143 stopped by SIGTERM (130: SIGINT), with a checkpoint at the step
reached once training had started (signals.py); 1 anything else (the operator retries, resuming from the newest
checkpoint). Before a non-zero exit the reason goes to the termination-message file, credentials redacted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kontext_lora.api import InvalidJobError, KontextLoRAJob, load_job_file, parse_job

from .errors import ExitCode, InvalidInputError, TrainerError
from .logs import fields, redact, setup_logging
from .settings import TrainerSettings, available_cpus
from .signals import Interrupted, StopSignals

if TYPE_CHECKING:
    from .train import RunResult

log = logging.getLogger(__name__)

JOB_ENV = "KONTEXT_LORA_JOB"
TERMINATION_MESSAGE_LIMIT = 4096  # what the kubelet keeps of the termination message
RESUME_LOCALLY = "run the same command again to resume"
RESUME_IN_CLUSTER = "the Job's next pod resumes"


def load_job(job_file: Path | None, from_env: bool) -> KontextLoRAJob:
    if from_env:
        raw = os.environ.get(JOB_ENV)
        if not raw:
            raise InvalidInputError(f"${JOB_ENV} is empty: the operator passes the KontextLoRAJob as JSON there")
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"${JOB_ENV} is not valid JSON: {error}") from None
        return parse_job(document, source=f"${JOB_ENV}")
    if job_file is None:
        raise InvalidInputError("no job: give a KontextLoRAJob YAML file, or --from-env inside the cluster")
    return load_job_file(job_file)


def configure_torch() -> None:
    """Use the CPUs the pod may use (torch otherwise sizes its pool by the node's cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cpus())
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def write_termination_message(path: Path | None, message: str) -> None:
    if path is None:
        return
    try:
        path.write_text(redact(message)[:TERMINATION_MESSAGE_LIMIT])
    except OSError as error:
        log.warning("could not write the termination message to %s: %s", path, error)


def run_training(
    job_file: Path | None = None,
    from_env: bool = False,
    work_dir: Path | None = None,
    metrics_port: int | None = None,
    settings: TrainerSettings | None = None,
    prepare_only: bool = False,
    fill_model_cache: bool | None = None,
) -> ExitCode:
    """Run one job (or only its preparation); returns the process exit code (never raises for expected failures)."""
    base_dir = job_file.resolve().parent if job_file is not None else None
    name = job_file.stem if job_file is not None else "job"
    settings = settings or TrainerSettings.resolve(
        work_dir=work_dir,
        metrics_port=metrics_port,
        base_dir=base_dir,
        default_work_dir=Path("runs") / name,
        in_cluster=from_env,
    )
    if fill_model_cache is not None:
        settings = settings.model_copy(update={"fill_model_cache": fill_model_cache})
    setup_logging(json_lines=settings.json_logs)
    configure_torch()
    try:
        job = load_job(job_file, from_env)
    except InvalidJobError as error:
        return _fail(settings, ExitCode.INVALID_INPUT, str(error))
    except TrainerError as error:
        return _fail(settings, error.exit_code, str(error))
    hint = RESUME_IN_CLUSTER if from_env else RESUME_LOCALLY
    return execute(job, settings, resume_hint=hint, prepare_only=prepare_only)[0]


def execute(
    job: KontextLoRAJob, settings: TrainerSettings, resume_hint: str = RESUME_LOCALLY, prepare_only: bool = False
) -> tuple[ExitCode, RunResult | None]:
    """Run a parsed job; (exit code, result when it succeeded). Expected failures are logged, never raised.

    SIGTERM and SIGINT stop the run with a checkpoint at the step reached (signals.py); `resume_hint` ends the
    message saying so ("run the same command again to resume"). `prepare_only`: the preparation alone
    (`kontext-lora prepare`; no result).
    """
    # Imported here so argument errors do not pay for torch's heavy imports.
    from .prepare import PreparationRun
    from .train import TrainingRun

    def on_abort(message: str) -> None:
        log.error("%s", message)
        write_termination_message(settings.termination_log, message)

    stop = StopSignals(on_abort=on_abort)
    what = "preparation" if prepare_only else "training"
    try:
        with stop.installed():
            if prepare_only:
                PreparationRun(job, settings, stop).run()
                return ExitCode.OK, None
            result = TrainingRun(job, settings, stop).run()
        return ExitCode.OK, result
    except Interrupted as interrupted:
        return _interrupted(settings, interrupted, resume_hint), None
    except TrainerError as error:
        return _fail(settings, error.exit_code, str(error)), None
    except KeyboardInterrupt:  # SIGINT where the handlers could not be installed (not the main thread)
        return _fail(settings, ExitCode.INTERRUPTED, "interrupted (SIGINT) without a checkpoint"), None
    except Exception as error:
        log.exception("%s failed", what)
        return _fail(settings, ExitCode.CRASH, f"trainer crashed: {type(error).__name__}: {error}"), None


def _interrupted(settings: TrainerSettings, interrupted: Interrupted, resume_hint: str) -> ExitCode:
    start = "it" if interrupted.checkpoint is not None else "the newest complete checkpoint"
    message = f"{interrupted.describe()}; {resume_hint} from {start}"
    log.warning(
        "%s",
        message,
        **fields(signal=interrupted.signal_name, step=interrupted.step, checkpoint=interrupted.checkpoint),
    )
    write_termination_message(settings.termination_log, message)
    return ExitCode(interrupted.exit_code)


def _fail(settings: TrainerSettings, code: ExitCode, message: str) -> ExitCode:
    if code is not ExitCode.CRASH:
        log.error("%s", message)
    write_termination_message(settings.termination_log, message)
    return code
