"""Refuse, before anything heavy, a job the GPU it got cannot hold: its measured peak against this GPU's memory.

The API model already refuses, at admission, jobs on the hub's FLUX.1-Kontext-dev whose peak (kontext_lora.api.memory,
from measurements of the full model) exceeds what a 48 GB class leaves. A model from s3:// or a path is only known to
be the full-size one once its folder is here; this check then reads its transformer config and, on a CUDA GPU,
compares the same estimate with the device's memory minus the allowance for the CUDA context and fragmentation. So a
job that would run out of memory fails with the fields to change in its first minute, not with an OOM hours in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kontext_lora.api.spec import KontextLoRAJobSpec

from .errors import InvalidInputError

log = logging.getLogger(__name__)

# FLUX.1-Kontext-dev's transformer (FLUX.1-dev's config): what the measured table is of.
FULL_SIZE_TRANSFORMER = {
    "num_layers": 19,
    "num_single_layers": 38,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "joint_attention_dim": 4096,
}


def is_full_size(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the loader reports a broken model folder with its own message
    return all(config.get(key) == value for key, value in FULL_SIZE_TRANSFORMER.items())


def check_memory(spec: KontextLoRAJobSpec, model_dir: Path, device: torch.device) -> None:
    """Raise InvalidInputError (exit 2) when the job's measured peak exceeds what this GPU leaves for training."""
    if device.type != "cuda" or not is_full_size(model_dir):
        return
    from kontext_lora.api.memory import RESERVED_BYTES, memory_problem

    properties = torch.cuda.get_device_properties(device)
    total = properties.total_memory
    problem = memory_problem(spec, total - RESERVED_BYTES, f"this {properties.name} ({total / 1e9:.0f} GB)")
    if problem is not None:
        field, message = problem
        raise InvalidInputError(f"spec.{field}: {message}")
    log.info("memory: the job's measured peak fits %s (%.0f GB)", properties.name, total / 1e9)
