"""Checkpoints: written atomically, published under the output URI with a COMPLETE marker last, rotated.

Layout (docs/architecture.md):

    checkpoints/step-000250/<name>-step-000250.safetensors   the LoRA at that step
    checkpoints/step-000250/training_state.pt                optimiser, LR schedule, step, RNG, exact LoRA
    checkpoints/step-000250/validation.json                  held-out loss (preview.png beside it)
    checkpoints/step-000250/COMPLETE                         written last

A checkpoint is staged in a hidden local folder, renamed into place, uploaded file by file and only then
marked COMPLETE; one without the marker is never resumed from and is deleted on the next start. Rotation
deletes the marker of an old checkpoint before its files, so a rotation cut short leaves nothing that looks
complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kontext_lora.api.status import CheckpointRecord

from .storage import Storage, StoredObject

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "training_state.pt"
VALIDATION_FILE = "validation.json"
PREVIEW_FILE = "preview.png"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_prefix(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:06d}/"


def lora_file_name(name: str, step: int) -> str:
    return f"{name}-step-{step:06d}.safetensors"


@dataclass
class StoredCheckpoint:
    step: int
    files: dict[str, StoredObject] = field(default_factory=dict)  # file name -> object

    @property
    def prefix(self) -> str:
        return step_prefix(self.step)

    @property
    def complete(self) -> bool:
        return COMPLETE in self.files

    def keys(self) -> list[str]:
        """Object keys, the COMPLETE marker first (the order deletions must use)."""
        names = sorted(self.files, key=lambda n: (n != COMPLETE, n))
        return [self.prefix + name for name in names]


class CheckpointStore:
    def __init__(self, storage: Storage, local_dir: Path, name: str, keep: int):
        self.storage = storage
        self.local_dir = local_dir
        self.name = name
        self.keep = keep

    # ---- reading -------------------------------------------------------------------------------------------
    def scan(self) -> list[StoredCheckpoint]:
        """Checkpoints under the output URI, oldest first; `complete` only when the marker's file list checks out."""
        found: dict[int, StoredCheckpoint] = {}
        for obj in self.storage.list(CHECKPOINTS + "/"):
            parts = obj.key.split("/")
            match = _STEP_DIR.match(parts[1]) if len(parts) == 3 else None
            if match:
                found.setdefault(int(match.group(1)), StoredCheckpoint(int(match.group(1)))).files[parts[2]] = obj
        checkpoints = sorted(found.values(), key=lambda c: c.step)
        for checkpoint in checkpoints:
            if checkpoint.complete and not self._marker_matches(checkpoint):
                checkpoint.files.pop(COMPLETE)
        return checkpoints

    def _marker_matches(self, checkpoint: StoredCheckpoint) -> bool:
        try:
            marker = json.loads(self.storage.get_bytes(checkpoint.prefix + COMPLETE))
            expected: dict[str, int] = marker["files"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        return all(name in checkpoint.files and checkpoint.files[name].size == size for name, size in expected.items())

    def fetch(self, checkpoint: StoredCheckpoint, cache_dir: Path) -> dict[str, Path]:
        """Local paths of a checkpoint's files (downloaded when the output URI is remote)."""
        keys = [checkpoint.prefix + name for name in checkpoint.files if name != COMPLETE]
        paths = self.storage.fetch(keys, cache_dir)
        return {key.rsplit("/", 1)[1]: path for key, path in paths.items()}

    def records(self, checkpoints: list[StoredCheckpoint]) -> list[CheckpointRecord]:
        """Status records (step, LoRA URI, held-out loss, edit scores, preview) of the complete checkpoints given."""
        records = []
        for checkpoint in checkpoints:
            if not checkpoint.complete:
                continue
            validation: dict = {}
            if VALIDATION_FILE in checkpoint.files:
                try:
                    validation = json.loads(self.storage.get_bytes(checkpoint.prefix + VALIDATION_FILE))
                except (FileNotFoundError, ValueError):
                    validation = {}
            records.append(
                CheckpointRecord(
                    step=checkpoint.step,
                    uri=self.storage.uri(checkpoint.prefix + lora_file_name(self.name, checkpoint.step)),
                    validation_loss=validation.get("validationLoss"),
                    edit_score=validation.get("editScore"),
                    base_edit_score=validation.get("baseEditScore"),
                    preview_uri=self.storage.uri(checkpoint.prefix + PREVIEW_FILE)
                    if PREVIEW_FILE in checkpoint.files
                    else None,
                    time=validation.get("time"),
                )
            )
        return records

    # ---- writing -------------------------------------------------------------------------------------------
    def discard_incomplete(self, checkpoints: list[StoredCheckpoint]) -> list[int]:
        """Delete checkpoints without a valid COMPLETE marker (storage and local staging); their steps."""
        discarded = []
        for checkpoint in checkpoints:
            if not checkpoint.complete:
                log.warning("removing incomplete checkpoint %s", self.storage.uri(checkpoint.prefix))
                self.storage.delete(checkpoint.keys())
                discarded.append(checkpoint.step)
        if self.local_dir.is_dir():
            for path in self.local_dir.iterdir():
                if path.name.startswith(".") and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
        return discarded

    def staging_dir(self, step: int) -> Path:
        """An empty hidden folder to write a checkpoint's files into."""
        staging = self.local_dir / f".step-{step:06d}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def publish(self, step: int, staging: Path) -> StoredCheckpoint:
        """Rename the staged folder into place, upload its files, then the COMPLETE marker."""
        final = self.local_dir / f"step-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        files = sorted(p for p in final.iterdir() if p.is_file() and p.name != COMPLETE)
        marker = {
            "step": step,
            "files": {p.name: p.stat().st_size for p in files},
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.storage.put_files([(p, step_prefix(step) + p.name) for p in files])
        (final / COMPLETE).write_text(json.dumps(marker, indent=2) + "\n")
        self.storage.put_files([(final / COMPLETE, step_prefix(step) + COMPLETE)])
        return StoredCheckpoint(
            step, {p.name: StoredObject(key=step_prefix(step) + p.name, size=0, etag="") for p in final.iterdir()}
        )

    def rotate(self) -> tuple[list[StoredCheckpoint], list[int]]:
        """Keep the newest `keep` complete checkpoints in storage and locally; (kept, deleted steps)."""
        complete = [c for c in self.scan() if c.complete]
        cut = max(0, len(complete) - self.keep)
        doomed, kept = complete[:cut], complete[cut:]
        for checkpoint in doomed:
            log.info("rotating out checkpoint %s (keep %d)", self.storage.uri(checkpoint.prefix), self.keep)
            self.storage.delete(checkpoint.keys())
        kept_steps = {c.step for c in kept}
        if self.local_dir.is_dir():
            for path in self.local_dir.iterdir():
                match = _STEP_DIR.match(path.name)
                if match and int(match.group(1)) not in kept_steps:
                    shutil.rmtree(path, ignore_errors=True)
        return kept, [c.step for c in doomed]
