"""Jobs on the hub's FLUX.1-Kontext-dev that a 48 GB card cannot hold are refused before anything runs, with the
field, the measured peak and what would fit; jobs that fit pass (the figures come from kontext_lora/api/memory_table.py,
measured by bench.memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kontext_lora.api import memory, parse_job
from tests.malformed_specs import valid_job


def _spec(**sections: dict):
    document = valid_job()
    for section, values in sections.items():
        document["spec"].setdefault(section, {}).update(values)
    return parse_job(document).spec


def test_the_guides_defaults_fit_and_the_peak_is_a_measurement() -> None:
    spec = _spec()
    peak = memory.estimate_peak(spec)
    assert peak.what == "the training step at 1024²"
    assert 28 < peak.gb < 40  # measured ~31 GB for rank 32 at 1024² with checkpointing (docs/benchmarks.md)
    assert memory.admission_problem(spec) is None


@pytest.mark.parametrize(
    ("sections", "field", "fix"),
    [
        ({"training": {"batchSize": 16}}, "spec.training.batchSize", "batchSize: "),
        (
            {"training": {"gradientCheckpointing": False}},
            "spec.training.gradientCheckpointing",
            "gradientCheckpointing: true",
        ),
        ({"model": {"dtype": "fp32"}}, "spec.model.dtype", "train in bf16 (the default)"),
        ({"training": {"attentionBackend": "math"}}, "spec.training.attentionBackend", "attentionBackend: auto"),
    ],
)
def test_jobs_over_the_budget_are_refused_naming_the_field_the_figure_and_a_fix(sections, field, fix) -> None:
    spec = _spec(**sections)
    problem = memory.admission_problem(spec)
    assert problem is not None and problem.startswith(f"{field}: needs about ")
    assert "GB of GPU memory at its peak" in problem and "more than the 44 GB a L40S-48GB GPU leaves" in problem
    assert fix in problem and ";" not in problem  # one line: error lists are joined with "; "
    figure = float(problem.split("needs about ")[1].split(" GB")[0])
    assert figure > 44


def test_the_suggested_fixes_fit() -> None:
    spec = _spec(training={"batchSize": 16})
    problem = memory.admission_problem(spec)
    batch = int(problem.split("What fits: batchSize: ")[1].split(" ")[0])
    assert batch >= 1 and memory.admission_problem(_spec(training={"batchSize": batch})) is None
    assert memory.admission_problem(_spec(training={"batchSize": batch + 1})) is not None


def test_only_the_hub_model_is_checked_at_admission() -> None:
    """A path or s3:// model's size is known once its folder is there: the trainer checks it at start, on the GPU."""
    spec = _spec(model={"base": "s3://models-bucket/flux-kontext/"}, training={"batchSize": 16})
    assert memory.admission_problem(spec) is None
    assert memory.memory_problem(spec) is not None  # what the trainer's start check will say


def test_several_resolutions_peak_at_the_largest_and_larger_gpus_fit_more() -> None:
    spec = _spec(dataset={"resolution": 768, "resolutions": [512, 768]})
    assert memory.estimate_peak(spec).what.endswith("at 768²")
    big = _spec(training={"batchSize": 6})
    assert memory.memory_problem(big) is not None
    assert memory.memory_problem(big, budget_bytes=80e9 - memory.RESERVED_BYTES, gpu="this H100") is None


def test_validate_prints_the_peak_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    document = valid_job()
    fits = tmp_path / "fits.yaml"
    fits.write_text(yaml.safe_dump(document))
    kontext_lora = str(Path(sys.executable).with_name("kontext-lora"))
    ok = subprocess.run([kontext_lora, "validate", str(fits)], capture_output=True, text=True)
    assert ok.returncode == 0 and "peak GPU memory: about" in ok.stderr
    document["spec"]["training"]["batchSize"] = 16
    too_big = tmp_path / "too-big.yaml"
    too_big.write_text(yaml.safe_dump(document))
    refused = subprocess.run([kontext_lora, "validate", str(too_big)], capture_output=True, text=True)
    assert refused.returncode != 0 and "spec.training.batchSize: needs about" in refused.stderr
