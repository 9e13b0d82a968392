"""The API model: the guide's defaults, step resolution, and the same refusals as the apiserver."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontext_lora.api import InvalidJobError, load_job_file, parse_job
from tests.malformed_specs import MALFORMED, Malformed, valid_job

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))


def test_defaults_follow_the_users_guide() -> None:
    job = parse_job(
        {
            "metadata": {"name": "x"},
            "spec": {"dataset": {"uri": "s3://pairs-bucket/x/"}, "output": {"uri": "s3://out-bucket/x/"}},
        }
    )
    spec = job.spec
    assert spec.lora.rank == 32 and spec.lora_alpha == 32
    assert spec.model.dtype == "bf16"
    assert spec.training.steps == "auto"
    assert (spec.checkpoints.save_every, spec.checkpoints.keep) == (250, 4)
    assert spec.dataset.resolution == 1024
    assert (spec.resources.count, spec.resources.nodes, spec.resources.world_size) == (1, 1, 1)
    assert spec.training.learning_rate_scaling == "sqrt"


@pytest.mark.parametrize(
    ("steps", "per_pair", "pairs", "count", "nodes", "expected"),
    [
        ("auto", 100, None, 1, 1, 3000),
        ("auto", 100, 57, 1, 1, 5700),
        ("auto", 150, 20, 1, 1, 3000),
        (6000, 100, 57, 1, 1, 6000),
        # steps: auto keeps the epochs of one GPU, in 1/world of the steps (rounded up); explicit steps stay.
        ("auto", 100, 57, 4, 1, 1425),
        ("auto", 100, 57, 2, 2, 1425),
        ("auto", 100, 20, 8, 2, 125),
        ("auto", 100, 57, 8, 1, 713),
        ("auto", 100, None, 2, 1, 1500),
        (6000, 100, 57, 8, 2, 6000),
    ],
)
def test_total_steps(steps, per_pair, pairs, count, nodes, expected) -> None:
    document = valid_job()
    document["spec"]["training"] = {"steps": steps, "autoStepsPerPair": per_pair}
    document["spec"]["checkpoints"]["saveEvery"] = 100
    document["spec"]["resources"].update(count=count, nodes=nodes)
    spec = parse_job(document).spec
    assert spec.resources.world_size == count * nodes
    assert spec.total_steps(pairs) == expected


@pytest.mark.parametrize(
    ("scaling", "world", "expected"), [("sqrt", 1, 1e-4), ("sqrt", 4, 2e-4), ("linear", 4, 4e-4), ("none", 16, 1e-4)]
)
def test_learning_rate_follows_the_world_size(scaling, world, expected) -> None:
    document = valid_job()
    document["spec"]["training"].update(learningRate=1e-4, learningRateScaling=scaling)
    document["spec"]["resources"].update(count=world if world <= 8 else 8, nodes=1 if world <= 8 else world // 8)
    spec = parse_job(document).spec
    assert spec.resources.world_size == world
    assert spec.effective_learning_rate() == pytest.approx(expected)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(example: Path) -> None:
    assert load_job_file(example).kind == "KontextLoRAJob"


@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: c.id)
def test_model_refuses_what_the_apiserver_refuses(case: Malformed) -> None:
    with pytest.raises(InvalidJobError) as raised:
        parse_job(case.job(case.id))
    assert any(line.startswith(case.field) for line in raised.value.errors), raised.value.errors


def test_errors_explain_patterns_in_words() -> None:
    document = valid_job()
    document["spec"]["dataset"]["triggerWord"] = "XM"
    document["spec"]["output"]["uri"] = "gs://bucket/x/"
    with pytest.raises(InvalidJobError) as raised:
        parse_job(document)
    text = str(raised.value)
    assert "spec.dataset.triggerWord: the trigger word must end with a comma" in text
    assert "spec.output.uri: expected an s3://bucket/prefix/ or file:///path URI, got 'gs://bucket/x/'" in text


def test_load_job_file_reports_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidJobError, match="file not found"):
        load_job_file(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(InvalidJobError, match="not valid YAML"):
        load_job_file(broken)
    other = tmp_path / "other.yaml"
    other.write_text("kind: ConfigMap\n")
    with pytest.raises(InvalidJobError, match="no document with kind: KontextLoRAJob"):
        load_job_file(other)
