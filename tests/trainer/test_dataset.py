"""Dataset validation: every bad file is named, with what was expected; captions as the users' guide writes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kontext_trainer.data.captions import compose_caption
from kontext_trainer.data.dataset import prepare_dataset
from kontext_trainer.errors import DatasetError, ExitCode
from kontext_trainer.main import run_training
from kontext_trainer.storage import LocalStorage, Location, S3Settings, S3Storage

from kontext_lora.api.spec import DatasetSpec, StorageSpec

from .helpers import job_document, write_job


@pytest.fixture
def dataset(pairs_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pairs_dir, tmp_path / "pairs"))


def _prepare(root: Path, **spec):
    spec = DatasetSpec(uri=root.as_uri(), resolution=512, **spec)
    return prepare_dataset(LocalStorage(Location.parse(spec.uri)), spec, root.parent / "cache", show_progress=False)


def _problems(root: Path, **spec) -> list[str]:
    with pytest.raises(DatasetError) as failure:
        _prepare(root, **spec)
    assert failure.value.exit_code is ExitCode.INVALID_INPUT
    return failure.value.problems


def test_valid_dataset_gives_pairs_with_composed_captions(dataset: Path) -> None:
    pairs, warnings = _prepare(dataset, trigger_word="RMV,", default_caption="remove the coloured shape")
    assert [p.stem for p in pairs] == [f"pair-{i:03d}" for i in range(6)]
    assert warnings == []
    captions = {p.stem: p.caption for p in pairs}
    assert captions["pair-000"].startswith("RMV, remove the ")
    assert captions["pair-005"] == "RMV, remove the coloured shape"  # no caption file: the default
    assert {p.bucket for p in pairs} <= {(512, 512), (592, 448), (448, 592)}


def test_every_problem_is_reported_with_the_file_named(dataset: Path) -> None:
    control, target = dataset / "control", dataset / "target"
    (target / "pair-000.png").unlink()  # control without target
    (control / "pair-001.png").unlink()  # target without control
    (target / "pair-002.txt").unlink()  # no caption (and no default below)
    (control / "pair-003.png").write_bytes(b"this is not a PNG at all")  # does not decode
    data = (target / "pair-004.png").read_bytes()
    (target / "pair-004.png").write_bytes(data[: len(data) // 2])  # truncated
    (control / "pair-005.png").write_bytes(b"")  # 0 bytes
    (target / "notes.gif").write_bytes(b"GIF89a")  # not an accepted extension
    (target / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored

    problems = _problems(dataset)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    uri = dataset.as_uri()
    expected = {
        f"{uri}/control/pair-000.png: control image has no target; expected target/pair-000.<ext>",
        f"{uri}/target/pair-001.png: target image has no control; expected control/pair-001.<ext>",
        f"{uri}/target/pair-002.png: no caption file (target/pair-002.txt) and no spec.dataset.defaultCaption",
        f"{uri}/control/pair-003.png: not a readable image",
        f"{uri}/target/pair-004.png: the image is damaged or truncated",
        f"{uri}/control/pair-005.png: the file is empty (0 bytes)",
        f"{uri}/target/notes.gif: unexpected file type .gif; expected an image (.png, .jpg, .jpeg, .webp)",
    }
    for line in expected:
        assert any(problem.startswith(line) for problem in problems), f"missing {line!r} in:\n{text}"


def test_files_that_are_neither_images_nor_captions_are_ignored_with_one_warning_naming_them(dataset: Path) -> None:
    (dataset / "target" / "notes.md").write_text("shot on the balcony, 3 pm")
    (dataset / "control" / "metadata.json").write_text("{}")
    (dataset / "control" / "README").write_text("before images")
    pairs, warnings = _prepare(dataset, trigger_word="RMV,", default_caption="remove the coloured shape")
    assert len(pairs) == 6
    [warning] = warnings
    uri = dataset.as_uri()
    assert warning.startswith("ignored 3 files that are neither an image (.png, .jpg, .jpeg, .webp) nor a caption"), (
        warning
    )
    for name in ("target/notes.md", "control/metadata.json", "control/README"):
        assert f"{uri}/{name}" in warning, warning


def test_empty_folder_names_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "empty" / "control").mkdir(parents=True)
    problems = _problems(tmp_path / "empty")
    assert problems[0].startswith(f"no images found in {(tmp_path / 'empty').as_uri()}/control/ or ")


def test_duplicate_names_and_empty_caption(dataset: Path) -> None:
    shutil.copy(dataset / "target" / "pair-000.png", dataset / "target" / "pair-000.jpg")
    (dataset / "target" / "pair-001.txt").write_text("  \n")
    problems = _problems(dataset)
    assert any("target/pair-000.jpg" in p and "several images share the name 'pair-000'" in p for p in problems)
    assert any(
        p.endswith("target/pair-001.txt: caption file is empty and there is no spec.dataset.defaultCaption")
        for p in problems
    )


def test_empty_s3_prefix_names_the_bucket_and_prefix(bucket: str, s3_env: dict, tmp_path: Path) -> None:
    spec = DatasetSpec(uri=f"s3://{bucket}/nothing-here/")
    storage = S3Storage(Location.parse(spec.uri), S3Settings.from_spec(StorageSpec()))
    with pytest.raises(DatasetError) as failure:
        prepare_dataset(storage, spec, tmp_path / "cache", show_progress=False)
    assert failure.value.problems[0].startswith(f"no images found in s3://{bucket}/nothing-here/control/ or ")


def test_trainer_exits_2_names_the_file_and_keeps_saved_checkpoints(
    dataset: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input: exit code 2, the reason in the termination message, and existing checkpoints untouched."""
    output = tmp_path / "out"
    checkpoint = output / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text('{"step": 4, "files": {}}')
    (dataset / "target" / "pair-002.png").unlink()
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KONTEXT_LORA_TERMINATION_LOG", str(termination))
    job = write_job(tmp_path / "job.yaml", job_document("bad-data", str(tiny_model), dataset.as_uri(), output.as_uri()))
    code = run_training(job_file=job, work_dir=tmp_path / "work", metrics_port=0)
    assert code == ExitCode.INVALID_INPUT
    message = termination.read_text()
    assert f"{dataset.as_uri()}/control/pair-002.png: control image has no target" in message
    assert (checkpoint / "COMPLETE").is_file()


@pytest.mark.parametrize(
    ("instruction", "trigger", "caption"),
    [
        ("remove the red circle\n", "RMV,", "RMV, remove the red circle"),
        ("RMV, remove the red circle", "RMV,", "RMV, remove the red circle"),  # never doubled
        ("a [trigger] edit:  keep   the rest", "XM,", "a XM, edit: keep the rest"),  # ai-toolkit's placeholder
        ("retouch the jewellery", None, "retouch the jewellery"),
    ],
)
def test_caption_composition(instruction: str, trigger: str | None, caption: str) -> None:
    assert compose_caption(instruction, trigger) == caption
