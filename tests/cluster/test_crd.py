"""The generated CRD on the real apiserver: it installs, accepts every example, refuses every malformed job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cluster
from tests.malformed_specs import MALFORMED, Malformed, valid_job

pytestmark = pytest.mark.cluster

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))


def _jobs_in(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "KontextLoRAJob"]


def test_crd_is_established_with_printer_columns_and_short_name(crd: Cluster) -> None:
    out = json.loads(crd.kubectl("get", "crd", "kontextlorajobs.kontext-lora.io", "-o", "json").stdout)
    version = out["spec"]["versions"][0]
    assert out["spec"]["names"]["shortNames"] == ["klj"]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:6] == [
        "Phase",
        "Step",
        "Loss",
        "GPU",
        "World",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
    assert "kontextlorajob" in crd.kubectl("api-resources", "--api-group=kontext-lora.io").stdout
    # The apiserver publishes the CRD's OpenAPI (what `kubectl explain` reads) a moment after Established.
    deadline = time.monotonic() + 60
    while (
        explained := crd.kubectl("explain", "klj.spec.lora.rank", check=False)
    ).returncode and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "LoRA rank" in explained.stdout, explained.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_accepted_and_defaulted(crd: Cluster, namespace: str, example: Path) -> None:
    jobs = _jobs_in(example)
    assert jobs, f"{example} holds no KontextLoRAJob"
    crd.kubectl("apply", "-n", namespace, "-f", str(example))
    for job in jobs:
        stored = json.loads(crd.kubectl("get", "klj", job["metadata"]["name"], "-n", namespace, "-o", "json").stdout)
        spec = stored["spec"]
        # Server-side defaults from the model fill what the file leaves out.
        assert spec["lora"]["rank"] >= 8
        assert spec["checkpoints"]["keep"] >= 1
        assert spec["training"]["autoStepsPerPair"] == job["spec"].get("training", {}).get("autoStepsPerPair", 100)
        assert spec["dataset"]["captionExtension"] == job["spec"]["dataset"].get("captionExtension", ".txt")
        assert spec["runPolicy"]["backoffLimit"] == job["spec"].get("runPolicy", {}).get("backoffLimit", 3)


def test_minimal_job_gets_the_guide_defaults(crd: Cluster, namespace: str) -> None:
    minimal = {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": "minimal"},
        "spec": {"dataset": {"uri": "s3://pairs-bucket/x/"}, "output": {"uri": "s3://loras-bucket/x/"}},
    }
    crd.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(minimal))
    spec = json.loads(crd.kubectl("get", "klj", "minimal", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["lora"]["rank"] == 32
    assert spec["model"]["dtype"] == "bf16"
    assert spec["training"]["steps"] == "auto"
    assert spec["checkpoints"] == {"saveEvery": 250, "keep": 4}
    assert spec["dataset"]["resolution"] == 1024
    assert spec["resources"]["gpu"] == "L40S-48GB"


def test_the_valid_base_of_the_malformed_set_is_accepted(crd: Cluster, namespace: str) -> None:
    crd.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(valid_job("base")))


@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: c.id)
def test_malformed_job_is_refused_naming_the_field(crd: Cluster, namespace: str, case: Malformed) -> None:
    result = crd.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(case.job(case.id)), check=False)
    assert result.returncode != 0, f"{case.id} was accepted by the apiserver"
    assert case.field in result.stderr, f"{case.id}: error does not name {case.field}:\n{result.stderr}"
    assert crd.kubectl("get", "klj", case.id, "-n", namespace, check=False).returncode != 0


def test_malformed_set_is_large_enough() -> None:
    assert len(MALFORMED) >= 40
    assert len({case.id for case in MALFORMED}) == len(MALFORMED)
