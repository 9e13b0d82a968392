"""How the trainer runs, as opposed to what it trains (the KontextLoRAJob spec): folders, ports, switches.

In the pod everything comes from the environment the operator sets (docs/architecture.md); locally from the
command line, with the same environment variables as overrides.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field

TERMINATION_LOG = Path("/dev/termination-log")


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class TrainerSettings(BaseModel):
    work_dir: Path = Field(description="Downloads, encoding cache, local checkpoints.")
    base_dir: Path | None = Field(None, description="Folder relative file:// URIs resolve against (the job file's).")
    model_cache: Path = Field(description="Where s3:// models are synced to (the model cache volume in a pod).")
    metrics_port: int = Field(0, description="Serve Prometheus metrics on this port; 0 disables.")
    report_status: bool = Field(False, description="Patch the job's status subresource.")
    termination_log: Path | None = Field(None, description="File the failure reason is written to.")
    json_logs: bool = Field(False, description="JSON lines instead of text.")
    show_progress: bool = Field(
        True, description="Live progress bars on stderr (a terminal); otherwise the bar is rendered into log lines."
    )
    preview_steps: int = Field(20, ge=0, description="Denoising steps of checkpoint previews; 0 disables them.")
    validation_timesteps: int = Field(8, ge=1, description="Fixed timesteps per held-out pair.")
    log_every_seconds: float = Field(30.0, gt=0, description="Interval of structured progress log lines.")
    status_interval_seconds: float = Field(5.0, gt=0, description="Minimum interval between status patches.")
    prepared: bool = Field(
        False, description="A preparation pod ran: start from its manifest (`$KONTEXT_LORA_PREPARED`)."
    )
    fill_model_cache: bool = Field(
        False, description="Preparation: download the model into the model cache (`$KONTEXT_LORA_FILL_MODEL_CACHE`)."
    )
    pod_name: str | None = Field(None, description="The pod's name, recorded in what it writes.")

    @classmethod
    def resolve(
        cls,
        *,
        work_dir: Path | None,
        metrics_port: int | None,
        base_dir: Path | None,
        default_work_dir: Path,
        in_cluster: bool,
        environ: Mapping[str, str] | None = None,
    ) -> TrainerSettings:
        env = os.environ if environ is None else environ
        work = Path(work_dir or env.get("KONTEXT_LORA_WORK_DIR") or default_work_dir).resolve()
        port = metrics_port if metrics_port is not None else int(env.get("KONTEXT_LORA_METRICS_PORT") or 0)
        termination = env.get("KONTEXT_LORA_TERMINATION_LOG")
        hf_home = env.get("HF_HOME")
        preview = env.get("KONTEXT_LORA_PREVIEW_STEPS")
        # Kubernetes mounts /dev/termination-log; never create it outside a pod.
        termination_log = Path(termination) if termination else TERMINATION_LOG if TERMINATION_LOG.exists() else None
        progress = env.get("KONTEXT_LORA_PROGRESS")
        return cls(
            work_dir=work,
            base_dir=base_dir,
            model_cache=Path(hf_home) / "kontext-lora" if hf_home else work / "models",
            metrics_port=port,
            report_status=_flag(env.get("KONTEXT_LORA_REPORT_STATUS")),
            termination_log=termination_log,
            json_logs=_flag(env.get("KONTEXT_LORA_LOG_JSON")) if "KONTEXT_LORA_LOG_JSON" in env else in_cluster,
            show_progress=_flag(progress) if progress is not None else sys.stderr.isatty(),
            preview_steps=int(preview) if preview is not None else 20,
            prepared=_flag(env.get("KONTEXT_LORA_PREPARED")),
            fill_model_cache=_flag(env.get("KONTEXT_LORA_FILL_MODEL_CACHE")),
            pod_name=env.get("KONTEXT_LORA_POD_NAME") or None,
        )


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a pod's limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count
