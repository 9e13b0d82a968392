"""The toy base: a small FLUX.1-Kontext in the real diffusers classes and folder layout that performs a family of
generic edits (keep, brighter, darker, warmer, cooler) on a synthetic scene world, so that a LoRA trained on it
can be judged by the edit it performs. Built by `kontext-lora tiny-model --toy-base`; the demo's base.

Its weights are fitted to the scene world in closed form (vae.py, transformer.py explain why and how), from a
seed, in about a minute on two CPU cores. docs/toy-base.md has the design and the measurements.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .build import build_toy_pipeline
from .evaluate import ToyBaseReport, evaluate

log = logging.getLogger(__name__)

TOY_BASE_VERSION = 1  # bump whenever the weights a seed gives change
TOY_BASE_NAME = f"toy-flux-kontext-v{TOY_BASE_VERSION}"
REPORT_FILE = "toy_base.json"


def save_toy_base(directory: str | Path, seed: int = 0) -> ToyBaseReport:
    """Build the toy base, save it as a diffusers folder, measure it and write the report beside it."""
    directory = Path(directory)
    started = time.monotonic()
    pipeline = build_toy_pipeline(seed)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory, safe_serialization=True)
    report = evaluate(pipeline, TOY_BASE_NAME, seed, time.monotonic() - started)
    (directory / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")
    log.info("saved the toy base %s to %s: %s", TOY_BASE_NAME, directory, report.model_dump())
    return report


def read_report(directory: str | Path) -> ToyBaseReport:
    return ToyBaseReport.model_validate_json((Path(directory) / REPORT_FILE).read_text())


__all__ = ["REPORT_FILE", "TOY_BASE_NAME", "TOY_BASE_VERSION", "ToyBaseReport", "read_report", "save_toy_base"]
