"""Where the base model comes from, resolved to one local diffusers-format folder for every source.

- a hub id (`black-forest-labs/FLUX.1-Kontext-dev`): `huggingface_hub.snapshot_download` of the diffusers
  folders only (not the 23 GB single-file checkpoint beside them) into `$HF_HOME`, on clusters with internet;
  gated repositories need `HF_TOKEN` in the pod's environment;
- an `s3://` prefix: synced to the model cache (only new or changed files are downloaded);
- a path (`file://` or absolute) on a mounted volume: used in place.
Whatever the source, `load.py` then loads the same folder layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from kontext_lora.api.spec import ModelSpec

from ..errors import ModelLoadError, TrainerError
from ..storage import Location, S3Settings, S3Storage

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MODEL_INDEX = "model_index.json"
HUB_PATTERNS = [MODEL_INDEX, *(f"{component}/*" for component in COMPONENTS)]


def resolve_model_dir(
    spec: ModelSpec, s3: S3Settings, cache_root: Path, base_dir: Path | None = None, show_progress: bool = True
) -> Path:
    """A local diffusers-format folder holding the model of `spec.base` (downloaded or synced if needed)."""
    base = spec.base
    if base.startswith("s3://"):
        directory = _sync_s3(Location.parse(base), s3, cache_root, show_progress)
    elif base.startswith(("file://", "/")):
        directory = Path(Location.parse(base, base_dir).prefix)
    else:
        directory = _hub_snapshot(base, spec.revision)
    check_model_dir(directory, base)
    return directory


def check_model_dir(directory: Path, source: str) -> None:
    """Fail with the missing part named before any weights are read."""
    if not directory.is_dir():
        raise ModelLoadError(f"model {source}: {directory} is not a folder")
    missing = [name for name in (MODEL_INDEX, *COMPONENTS) if not (directory / name).exists()]
    if missing:
        raise ModelLoadError(
            f"model {source}: {directory} is not a diffusers-format FLUX.1-Kontext folder; missing "
            + ", ".join(missing)
            + " (expected model_index.json and the folders "
            + ", ".join(COMPONENTS)
            + ")"
        )


def _sync_s3(location: Location, s3: S3Settings, cache_root: Path, show_progress: bool) -> Path:
    storage = S3Storage(location, s3)
    storage.check()
    keys = [o.key for o in storage.list() if o.key == MODEL_INDEX or o.key.split("/", 1)[0] in COMPONENTS]
    if not keys:
        raise ModelLoadError(f"model {location}: no model_index.json or component folders under this prefix")
    directory = cache_root / "s3" / location.bucket / location.prefix
    with tqdm(total=len(keys), desc="model", unit="file", disable=not show_progress, leave=False) as bar:
        storage.fetch(keys, directory, on_file=lambda _key: bar.update())
    return directory


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise ModelLoadError(
            f"model {repo_id} is gated: accept its licence on huggingface.co and give the pod an HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model {repo_id}: no such repository on the Hugging Face hub (or no access)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model {repo_id}: revision {revision!r} does not exist") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        # Possibly transient (exit 1: the Job retries); without internet, point spec.model.base at a copy.
        raise TrainerError(
            f"cannot download model {repo_id} from the Hugging Face hub and it is not in the cache ($HF_HOME): "
            f"{str(error).splitlines()[0]}; on clusters without internet use an s3:// prefix or a volume path"
        ) from None
