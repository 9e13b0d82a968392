"""A hub model through the real `huggingface_hub`, against the stand-in hub (tests/infra/hub.py: no internet here):
gated access refused with the hub's own words and exit code 4, the resolved commit and file identities, only the
parts a pod needs downloaded, and nothing asked again once they are in `$HF_HOME`."""

from __future__ import annotations

from pathlib import Path

import pytest
from kontext_trainer.errors import ExitCode, ModelAccessError
from kontext_trainer.model.source import (
    COMPONENTS,
    TEXT_PARTS,
    TRAINING_PARTS,
    VAE_PARTS,
    describe_model,
    fetch_model,
)
from kontext_trainer.storage import S3Settings

from kontext_lora.api.spec import ModelSpec
from tests.conftest import Hub

from .helpers import job_document, run_cli, trainer_env, write_job


@pytest.fixture
def hub_env(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process pointed at the stand-in hub (the trainer reads $HF_ENDPOINT when it calls), with an empty hub
    cache (huggingface_hub reads $HF_HOME once, at import)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", hub.server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def _describe(hub: Hub):
    return describe_model(ModelSpec(base=hub.repo), S3Settings())


def test_gated_model_is_refused_with_the_hubs_message_until_the_tokens_account_accepted_the_licence(
    hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked_before = len(hub.server.requests_for(hub.repo))  # the hub serves the whole session
    with pytest.raises(ModelAccessError) as no_token:
        _describe(hub)
    assert no_token.value.exit_code is ExitCode.MODEL_ACCESS_DENIED
    message = str(no_token.value)
    assert f"model {hub.repo} is gated" in message and "spec.model.tokenSecret" in message, message
    assert "You must have access to it and be authenticated to access it" in message, message

    monkeypatch.setenv("HF_TOKEN", hub.refused_token)
    with pytest.raises(ModelAccessError) as not_accepted:
        _describe(hub)
    message = str(not_accepted.value)
    assert f"accept the licence at {hub.server.endpoint}/{hub.repo}" in message, message
    assert "you are not in the authorized list" in message, message

    monkeypatch.setenv("HF_TOKEN", hub.unknown_token)
    with pytest.raises(ModelAccessError, match=r"the hub refused the token .*Invalid credentials in Authorization"):
        _describe(hub)

    monkeypatch.setenv("HF_TOKEN", hub.granted_token)
    description = _describe(hub)
    assert description.revision == hub.commit
    served = hub.server.repos[hub.repo].files
    weights = next(p for p in description.files if p.startswith("text_encoder_2/") and p.endswith(".safetensors"))
    assert description.files[weights] == f"sha={served[weights].sha256}"  # the LFS SHA-256 names the content
    assert description.fingerprint(VAE_PARTS) != description.fingerprint(TEXT_PARTS)
    # Nothing was downloaded to find all this out.
    asked = hub.server.requests_for(hub.repo)[asked_before:]
    assert asked and not [r for r in asked if r.method == "GET" and "/resolve/" in r.path], asked


def test_a_pod_downloads_only_the_parts_it_needs_and_a_filled_cache_answers_without_the_hub(
    hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.granted_token)
    description = _describe(hub)
    directory = fetch_model(description, S3Settings(), hub_env / "unused", parts=TRAINING_PARTS, show_progress=False)
    assert directory.name == hub.commit  # exactly the described commit
    assert {p.name for p in directory.iterdir()} == {"model_index.json", *TRAINING_PARTS}, "no text encoders"

    full = fetch_model(description, S3Settings(), hub_env / "unused", parts=COMPONENTS, show_progress=False)
    assert full == directory and {p.name for p in full.iterdir()} == {"model_index.json", *COMPONENTS}

    asked = len(hub.server.requests_for(hub.repo))
    fetch_model(description, S3Settings(), hub_env / "unused", parts=COMPONENTS, show_progress=False)
    assert len(hub.server.requests_for(hub.repo)) == asked, "a complete $HF_HOME costs no request"

    # Offline, the copy in $HF_HOME describes the model with the same identities (so the same encoder caches).
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    offline = _describe(hub)
    assert offline.revision == hub.commit
    for parts in (VAE_PARTS, TEXT_PARTS):
        assert offline.fingerprint(parts) == description.fingerprint(parts)


def test_prepare_exits_4_naming_the_licence_and_never_prints_the_token(
    hub: Hub, pairs_dir: Path, tmp_path: Path
) -> None:
    document = job_document("gated", hub.repo, pairs_dir.as_uri() + "/", (tmp_path / "out").as_uri() + "/")
    job = write_job(tmp_path / "job.yaml", document)
    termination = tmp_path / "termination-log"
    env = trainer_env(
        HF_ENDPOINT=hub.server.endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_TOKEN=hub.refused_token,
        KONTEXT_LORA_TERMINATION_LOG=str(termination),
    )
    finished = run_cli(["prepare", str(job), "--work-dir", str(tmp_path / "work")], env, tmp_path / "prepare.log")
    assert finished.code == ExitCode.MODEL_ACCESS_DENIED, finished.output[-3000:]
    message = termination.read_text()
    assert "is gated" in message and "not in the authorized list" in message, message
    assert hub.refused_token not in finished.output + message
    assert not (tmp_path / "out" / "preparation.json").exists(), "no manifest for inputs that failed"
