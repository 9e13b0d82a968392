"""Encodings are cached beside the output, keyed by what they depend on: a restart (a fresh work folder, as a new
pod's emptyDir) and a second job on the same pairs and model load no text encoder and no VAE to encode, and train
the same LoRA; a changed caption setting encodes the captions again and nothing else. A training run that starts
from a preparation's manifest trains on the validated pairs, and refuses a pair that changed since."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
from kontext_trainer import encoding
from kontext_trainer.errors import ExitCode
from kontext_trainer.main import execute
from kontext_trainer.settings import TrainerSettings

from kontext_lora.api import parse_job

from .helpers import assert_same_lora, job_document


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How often the text encoders and the VAE are loaded (the real loaders, counted)."""
    counts: Counter = Counter()
    for name in ("load_text_pipeline", "load_vae"):
        real = getattr(encoding, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(encoding, name, counted)
    return counts


def _run(document: dict, work: Path, **settings) -> tuple[ExitCode, Path]:
    job = parse_job(document)
    options = TrainerSettings(
        work_dir=work, model_cache=work / "models", show_progress=False, preview_steps=0, **settings
    )
    code, _ = execute(job, options)
    return code, Path(job.spec.output.uri.removeprefix("file://"))


def test_restarts_and_reruns_encode_nothing_and_train_the_same_lora(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path, loads: Counter
) -> None:
    def job(name: str, **spec) -> dict:
        return job_document(name, str(tiny_model), pairs_dir.as_uri() + "/", (tmp_path / name).as_uri() + "/", **spec)

    first, output = _run(job("first", training={"steps": 2}, checkpoints={"saveEvery": 2}), tmp_path / "w1")
    assert first == ExitCode.OK and loads == {"load_text_pipeline": 1, "load_vae": 1}
    cache = tmp_path / "kontext-lora-cache" / "encodings" / "v1"  # beside the output folder
    assert len(list((cache / "latents").iterdir())) == 6 and list((cache / "text").iterdir())

    loads.clear()
    restart, _ = _run(job("first", training={"steps": 2}, checkpoints={"saveEvery": 2}), tmp_path / "w2")
    assert restart == ExitCode.OK and not loads, f"a restarted pod loaded {dict(loads)}"

    rerun, rerun_output = _run(job("second", training={"steps": 2}, checkpoints={"saveEvery": 2}), tmp_path / "w3")
    assert rerun == ExitCode.OK and not loads, f"a second job on the same pairs loaded {dict(loads)}"
    assert_same_lora(
        safetensors.torch.load_file(rerun_output / "second.safetensors"),
        safetensors.torch.load_file(output / "first.safetensors"),
    )

    # Another trigger word changes every caption: captions are encoded again, the images are not.
    other = job("third", training={"steps": 1}, checkpoints={"saveEvery": 1})
    other["spec"]["dataset"]["triggerWord"] = "OTHER,"
    third, _ = _run(other, tmp_path / "w4")
    assert third == ExitCode.OK and loads == {"load_text_pipeline": 1}, dict(loads)


def test_a_run_from_a_preparation_trains_on_the_validated_pairs_and_refuses_one_that_changed(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = Path(shutil.copytree(pairs_dir, tmp_path / "pairs"))
    document = job_document(
        "prepared",
        str(tiny_model),
        dataset.as_uri() + "/",
        (tmp_path / "out").as_uri() + "/",
        training={"steps": 1},
        checkpoints={"saveEvery": 1},
    )
    job = parse_job(document)
    settings = TrainerSettings(work_dir=tmp_path / "prep", model_cache=tmp_path / "m", show_progress=False)
    assert execute(job, settings, prepare_only=True)[0] == ExitCode.OK
    assert (tmp_path / "out" / "preparation.json").is_file()

    # A pair added after the preparation is not trained on: the run trains on what was validated.
    shutil.copy(dataset / "control" / "pair-000.png", dataset / "control" / "pair-new.png")
    shutil.copy(dataset / "target" / "pair-000.png", dataset / "target" / "pair-new.png")
    caplog.set_level("INFO")
    caplog.clear()  # the preparation's own records (captured already when an earlier test set the level)
    code, _ = _run(document, tmp_path / "pod1", prepared=True)
    assert code == ExitCode.OK
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting from the preparation")]
    assert started and ": 6 pairs" in started[0], started
    assert not [r for r in caplog.records if r.getMessage().startswith("preparation: ")], "prepared again"

    # A validated image replaced before a training pod (needing its pixels) starts: refused, the file named.
    shutil.rmtree(tmp_path / "out" / "checkpoints")
    shutil.rmtree(tmp_path / "kontext-lora-cache")
    target = dataset / "target" / "pair-003.png"
    target.write_bytes((dataset / "target" / "pair-004.png").read_bytes())
    code, _ = _run(document, tmp_path / "pod2", prepared=True, termination_log=tmp_path / "termination-log")
    assert code == ExitCode.INVALID_INPUT
    message = (tmp_path / "termination-log").read_text()
    assert f"{target.as_uri()} has changed" in message and "since the preparation validated" in message, message
