"""Where the base model comes from: described from metadata alone, then fetched part by part into one local folder.

Two steps, so that access and layout are checked before anything large moves, and so that a pod downloads only
the parts it needs:

- `describe_model`: every file of the diffusers folders with a content identity, and for a hub id the commit the
  revision resolves to. Hub: the hub's access check (gated repositories: the licence must be accepted by the
  token's account) and its file list (`model_info` with file metadata: git blob ids, LFS SHA-256s); s3: a
  listing (ETags); a path: the folder (sizes and modification times). A model that lacks a part fails here,
  naming it. The identities key the encoder caches (`ModelDescription.fingerprint`).
- `fetch_model`: the parts asked for into a local folder. Hub: `huggingface_hub.snapshot_download` of exactly the
  described commit (from `$HF_HOME` when it is there already: a filled model cache volume costs no request);
  s3: synced to the model cache (only new or changed files); a path: used in place.
Whatever the source, `load.py` then loads the same folder layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kontext_lora.api.spec import ModelSpec

from ..errors import ModelAccessError, ModelLoadError, TrainerError
from ..storage import Location, S3Settings, S3Storage

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MODEL_INDEX = "model_index.json"
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
"""What only encoding captions needs (T5-XXL alone is ~9.5 GB): skipped when every caption's encoding is cached."""
VAE_PARTS = ("vae",)
TRAINING_PARTS = ("transformer", "scheduler", "vae")
"""What every training pod needs: the transformer, its scheduler, and the VAE (previews, latent geometry)."""
HUB_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class ModelDescription:
    """The model's files with their content identities, from metadata (nothing large downloaded)."""

    source: str
    kind: str  # "hub", "s3" or "path"
    files: dict[str, str] = field(default_factory=dict)  # path in the folder -> content identity
    revision: str | None = None  # hub: the resolved commit
    ref: str | None = None  # hub: the branch, tag or commit asked for (spec.model.revision, default main)

    def fingerprint(self, parts: Iterable[str]) -> str:
        """Identity of the files of `parts` (folders): what encodings made with those parts depend on."""
        wanted = set(parts)
        digest = hashlib.sha256()
        for path in sorted(p for p in self.files if p.split("/", 1)[0] in wanted):
            digest.update(f"{path}\0{self.files[path]}\n".encode())
        return digest.hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "revision": self.revision,
            "ref": self.ref,
            "files": dict(self.files),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelDescription:
        return cls(data["source"], data["kind"], dict(data["files"]), data.get("revision"), data.get("ref"))


def describe_model(spec: ModelSpec, s3: S3Settings, base_dir: Path | None = None) -> ModelDescription:
    """Check that the model exists, is complete and may be read; its files and their identities."""
    base = spec.base
    if base.startswith("s3://"):
        return _describe_s3(Location.parse(base), s3)
    if base.startswith(("file://", "/")):
        directory = Path(Location.parse(base, base_dir).prefix)
        check_model_dir(directory, base)
        return describe_folder(directory, base)
    return _describe_hub(base, spec.revision)


def describe_folder(directory: Path, source: str | None = None) -> ModelDescription:
    """A local model folder's files: size and modification time stand for the content (hashing 30 GB would not)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and _wanted(relative, COMPONENTS) and not any(p.startswith(".") for p in relative.split("/")):
            stat = path.stat()
            files[relative] = f"size={stat.st_size},mtime={stat.st_mtime_ns}"
    return ModelDescription(source or str(directory), "path", files)


def fetch_model(
    description: ModelDescription,
    s3: S3Settings,
    cache_root: Path,
    base_dir: Path | None = None,
    parts: Iterable[str] = COMPONENTS,
    show_progress: bool = True,
) -> Path:
    """A local diffusers-format folder holding at least `parts` of the described model."""
    parts = tuple(parts)
    if description.kind == "s3":
        directory = _sync_s3(description, Location.parse(description.source), s3, cache_root, parts, show_progress)
    elif description.kind == "path":
        directory = Path(Location.parse(description.source, base_dir).prefix)
    else:
        directory = _hub_snapshot(description, parts)
    check_model_dir(directory, description.source, parts)
    return directory


def resolve_model_dir(
    spec: ModelSpec, s3: S3Settings, cache_root: Path, base_dir: Path | None = None, show_progress: bool = True
) -> Path:
    """A local diffusers-format folder holding every part of the model of `spec.base`."""
    return fetch_model(describe_model(spec, s3, base_dir), s3, cache_root, base_dir, COMPONENTS, show_progress)


def check_model_dir(directory: Path, source: str, parts: Iterable[str] = COMPONENTS) -> None:
    """Fail with the missing part named before any weights are read."""
    if not directory.is_dir():
        raise ModelLoadError(f"model {source}: {directory} is not a folder")
    _require_layout(source, str(directory), [p.name for p in directory.iterdir()], tuple(parts))


def _require_layout(source: str, where: str, names: Iterable[str], parts: tuple[str, ...] = COMPONENTS) -> None:
    present = set(names)
    missing = [name for name in (MODEL_INDEX, *parts) if name not in present]
    if missing:
        raise ModelLoadError(
            f"model {source}: {where} is not a diffusers-format FLUX.1-Kontext folder; missing "
            + ", ".join(missing)
            + " (expected model_index.json and the folders "
            + ", ".join(COMPONENTS)
            + ")"
        )


def _wanted(path: str, parts: Iterable[str]) -> bool:
    return path == MODEL_INDEX or path.split("/", 1)[0] in set(parts)


# ---- s3 ---------------------------------------------------------------------------------------------------------


def _describe_s3(location: Location, s3: S3Settings) -> ModelDescription:
    storage = S3Storage(location, s3)
    storage.check()
    objects = [o for o in storage.list() if _wanted(o.key, COMPONENTS)]
    if not objects:
        raise ModelLoadError(f"model {location}: no model_index.json or component folders under this prefix")
    _require_layout(str(location), "the prefix", {o.key.split("/", 1)[0] for o in objects})
    return ModelDescription(str(location), "s3", {o.key: f"etag={o.etag}" for o in objects})


def _sync_s3(
    description: ModelDescription,
    location: Location,
    s3: S3Settings,
    cache_root: Path,
    parts: tuple[str, ...],
    show_progress: bool,
) -> Path:
    storage = S3Storage(location, s3)
    keys = [key for key in description.files if _wanted(key, parts)]
    directory = cache_root / "s3" / location.bucket / location.prefix
    with tqdm(total=len(keys), desc="model", unit="file", disable=not show_progress, leave=False) as bar:
        storage.fetch(keys, directory, on_file=lambda _key: bar.update())
    stats = storage.last_fetch
    log.info("model files: %d downloaded, %d already in the model cache", stats.downloaded, stats.reused)
    return directory


# ---- the Hugging Face hub ---------------------------------------------------------------------------------------


def _hub_patterns(parts: Iterable[str]) -> list[str]:
    return [MODEL_INDEX, *(f"{part}/*" for part in parts)]


def _endpoint() -> str:
    """$HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")


def _describe_hub(repo_id: str, revision: str | None) -> ModelDescription:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    api = HfApi(endpoint=_endpoint())
    try:
        with _hub_errors(repo_id, revision):
            api.auth_check(repo_id)  # gated: has the token's account accepted the licence?
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except _HubUnreachable as unreachable:
        # Without the hub (offline, HF_HUB_OFFLINE), a complete copy in $HF_HOME still describes the model.
        try:
            directory = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, endpoint=_endpoint()))
        except (LocalEntryNotFoundError, OSError):
            raise unreachable.error from None
        log.warning("the hub is unreachable (%s): using the copy of %s in $HF_HOME", unreachable.reason, repo_id)
        check_model_dir(directory, repo_id)
        return ModelDescription(repo_id, "hub", _snapshot_files(directory), directory.name, revision)
    files = {}
    for sibling in info.siblings or []:
        if _wanted(sibling.rfilename, COMPONENTS):
            identity = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
            files[sibling.rfilename] = f"sha={identity}"
    _require_layout(repo_id, f"the hub repository (revision {info.sha})", {p.split("/", 1)[0] for p in files})
    return ModelDescription(repo_id, "hub", files, info.sha, revision)


def _snapshot_files(directory: Path) -> dict[str, str]:
    """Files of a hub cache snapshot: each is a link to `blobs/<etag>`, the same identity the hub's metadata gives."""
    files = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and _wanted(relative, COMPONENTS):
            blob = Path(os.readlink(path)).name if path.is_symlink() else f"size={path.stat().st_size}"
            files[relative] = f"sha={blob}"
    return files


def _hub_snapshot(description: ModelDescription, parts: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision = description.source, description.revision
    patterns = _hub_patterns(parts)
    # A model cache volume filled by the preparation pod (or an earlier run) answers without a single request.
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=True, endpoint=_endpoint()
            )
        )
    except (LocalEntryNotFoundError, OSError):
        pass
    try:
        with _hub_errors(repo_id, revision):
            directory = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=_endpoint())
            )
    except _HubUnreachable as unreachable:
        raise unreachable.error from None
    _remember_ref(directory, description.ref or "main", revision)
    return directory


def _remember_ref(snapshot: Path, ref: str, commit: str | None) -> None:
    """Record which commit the branch or tag asked for is (`refs/<ref>` in the hub cache's layout, as
    huggingface_hub does when it resolves a branch itself): an offline run then still finds the snapshot."""
    if commit is None or ref == commit:
        return
    refs = snapshot.parent.parent / "refs" / ref
    try:
        refs.parent.mkdir(parents=True, exist_ok=True)
        if not refs.is_file() or refs.read_text() != commit:
            partial = refs.with_name(f".{refs.name}.partial")
            partial.write_text(commit)
            partial.replace(refs)
    except OSError as error:
        log.debug("could not record %s -> %s in the hub cache: %s", ref, commit, error)


class _HubUnreachable(Exception):
    """The hub could not be asked (no connection, offline mode, a 5xx): possibly transient, exit 1."""

    def __init__(self, error: TrainerError, reason: str):
        self.error, self.reason = error, reason


def _hub_message(error: Exception) -> str:
    """What the hub said (its X-Error-Message or body), else the first line of the error."""
    server = getattr(error, "server_message", None)
    text = (server or str(error)).strip()
    return " ".join(text.split()) if server else text.splitlines()[0]


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Hub failures as the trainer's errors: access (ModelAccessError, exit 4), a wrong id or revision (exit 2),
    the hub unreachable (_HubUnreachable: exit 1, the Job retries)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{_endpoint()}/{repo_id}"
    token_hint = "spec.model.tokenSecret (or the operator's hub.tokenSecret)"
    try:
        yield
    except GatedRepoError as error:
        status = error.response.status_code if error.response is not None else 0
        if status == 401:
            why = f"the hub needs a token for this gated model and none was accepted; name a Secret in {token_hint}"
        else:
            why = (
                f"the token's account may not download it: accept the licence at {page} with that account "
                "(access can take a moment to be granted), or use a token of an account that has"
            )
        raise ModelAccessError(f"model {repo_id} is gated: {why}. The hub said: {_hub_message(error)}") from None
    except RepositoryNotFoundError as error:
        raise ModelLoadError(
            f"model {repo_id}: no such repository on the Hugging Face hub, or it is private and the token in "
            f"{token_hint} may not read it. The hub said: {_hub_message(error)}"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model {repo_id}: revision {revision!r} does not exist") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status in (401, 403):
            raise ModelAccessError(
                f"model {repo_id}: the hub refused the token (HTTP {status}); check the Secret in {token_hint}. "
                f"The hub said: {_hub_message(error)}"
            ) from None
        if status >= 500 or status == 429:
            raise _HubUnreachable(_unreachable(repo_id, error), f"HTTP {status}") from None
        raise ModelLoadError(f"model {repo_id}: the hub answered HTTP {status}: {_hub_message(error)}") from None
    except (_transport_error(), OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise _HubUnreachable(_unreachable(repo_id, error), type(error).__name__) from None


def _transport_error() -> type[Exception]:
    """The HTTP client's connection-level failure (huggingface_hub 2 uses httpx2, 1.x httpx)."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http.TransportError


def _unreachable(repo_id: str, error: Exception) -> TrainerError:
    # Possibly transient (exit 1: the Job retries); without internet, point spec.model.base at a copy.
    return TrainerError(
        f"cannot reach the Hugging Face hub ({_endpoint()}) for model {repo_id} and it is not in the cache "
        f"($HF_HOME): {str(error).splitlines()[0] if str(error) else type(error).__name__}; on clusters without "
        "internet use an s3:// prefix or a volume path"
    )
