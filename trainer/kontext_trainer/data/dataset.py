"""The dataset stage: list the pairs, validate names, download (parallel, cached), decode, caption.

`prepare_dataset` validates everything (the preparation pod, and local runs). A training pod that starts from a
preparation's manifest instead rebuilds the pairs from it (`TrainingPair` round-trips through JSON) and
downloads only the images it still needs (`fetch_pair_images`), checking that they did not change since.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from kontext_lora.api.spec import DatasetSpec

from ..errors import DatasetError, InputChangedError
from ..storage import Storage
from .captions import clean_caption, compose_caption
from .images import IMAGE_EXTENSIONS, ImageDecodeError, bucket_for, open_image
from .layout import index_pairs

log = logging.getLogger(__name__)


class TrainingPair(BaseModel):
    """One validated pair on local disk, with its composed caption and resolution bucket."""

    model_config = ConfigDict(frozen=True)

    stem: str
    control_path: Path
    target_path: Path
    control_etag: str
    target_etag: str
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels
    target_size: tuple[int, int] | None = None  # (width, height) of the target image; None: the bucket's
    control_key: str = ""  # keys in the dataset's storage (what a training pod downloads)
    target_key: str = ""
    control_digest: str = ""  # SHA-256 of the file's bytes ("" when not computed)
    target_digest: str = ""

    @property
    def content(self) -> str:
        """What the pair's latents depend on besides the model: both images' bytes and the bucket."""
        control = self.control_digest or f"etag:{self.control_etag}"
        target = self.target_digest or f"etag:{self.target_etag}"
        return f"{control}|{target}|{self.bucket[0]}x{self.bucket[1]}"

    @property
    def sample(self) -> tuple[str, tuple[int, int]]:
        """The pair at its bucket: one training sample (a pair trains at one bucket per resolution)."""
        return self.stem, self.bucket

    def at_resolution(self, resolution: int) -> TrainingPair:
        """The same pair in its bucket at `resolution` (the aspect bucket closest to its target's)."""
        return self.model_copy(update={"bucket": bucket_for(*(self.target_size or self.bucket), resolution)})


def training_samples(pairs: list[TrainingPair], resolutions: tuple[int, ...]) -> list[TrainingPair]:
    """One sample per pair and resolution (pair-major): what the encoder caches and the batches draw from."""
    return [pair.at_resolution(resolution) for pair in pairs for resolution in resolutions]


def prepare_dataset(
    storage: Storage,
    spec: DatasetSpec,
    cache_dir: Path,
    show_progress: bool = True,
    on_file: Callable[[int, int], None] | None = None,
) -> tuple[list[TrainingPair], list[str]]:
    """Validated pairs sorted by name, and warnings (small images, aspect mismatches) worth telling the user.

    Raises DatasetError listing every offending file when the dataset cannot be trained on; any problem
    fails the whole dataset (training on the rest would silently drop pairs the user meant to include).
    """
    storage.check()
    files, problems, ignored = index_pairs(list_pair_folders(storage, spec), spec, storage.uri)
    if not files:
        raise DatasetError(storage.uri(), problems or [f"no complete pairs in {storage.uri()}"])
    # Even with problems in the listing, the well-formed pairs are fetched and decoded, so one run reports
    # every problem (names, empty files, images that do not decode, captions) at once.

    keys = [o.key for f in files for o in (f.control, f.target, f.caption) if o is not None]

    def fetched(_key: str) -> None:
        bar.update()
        if on_file is not None:
            on_file(bar.n, len(keys))

    with tqdm(total=len(keys), desc="dataset", unit="file", disable=not show_progress, leave=False) as bar:
        paths = storage.fetch(keys, cache_dir, on_file=fetched)
    stats = storage.last_fetch
    log.info("dataset files: %d downloaded, %d already local", stats.downloaded, stats.reused)

    pairs: list[TrainingPair] = []
    warnings: list[str] = []
    for entry in files:
        sizes = {}
        for role, obj in (("control", entry.control), ("target", entry.target)):
            try:
                image = open_image(paths[obj.key])
            except ImageDecodeError as error:
                problems.append(f"{storage.uri(obj.key)}: {error}")
                continue
            sizes[role] = image.size
        caption = _read_caption(storage, entry.caption.key if entry.caption else None, paths, spec, problems)
        if len(sizes) < 2 or caption is None:
            continue
        bucket = bucket_for(*sizes["target"], spec.resolution)
        largest = max(spec.training_resolutions)
        largest_bucket = bucket_for(*sizes["target"], largest)
        for role, (width, height) in sizes.items():
            if width < largest_bucket[0] or height < largest_bucket[1]:
                warnings.append(
                    f"{storage.uri(getattr(entry, role).key)}: {width}x{height} is smaller than the "
                    f"{largest_bucket[0]}x{largest_bucket[1]} training size; it is upscaled (sharp images of at least "
                    f"{largest} px train better)"
                )
        control_aspect, target_aspect = (w / h for w, h in (sizes["control"], sizes["target"]))
        if abs(control_aspect / target_aspect - 1) > 0.02:
            warnings.append(
                f"{storage.uri(entry.control.key)}: aspect ratio {control_aspect:.2f} differs from its target's "
                f"({target_aspect:.2f}); it is centre-cropped to the target's shape"
            )
        pairs.append(
            TrainingPair(
                stem=entry.stem,
                control_path=paths[entry.control.key],
                target_path=paths[entry.target.key],
                control_etag=entry.control.etag,
                target_etag=entry.target.etag,
                caption=caption,
                bucket=bucket,
                target_size=sizes["target"],
                control_key=entry.control.key,
                target_key=entry.target.key,
                control_digest=_sha256(paths[entry.control.key]),
                target_digest=_sha256(paths[entry.target.key]),
            )
        )
    if problems:
        raise DatasetError(storage.uri(), problems)
    if ignored:
        shown = ", ".join(ignored[:10]) + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else "")
        noun = "file that is" if len(ignored) == 1 else f"{len(ignored)} files that are"
        kinds = f"an image ({', '.join(IMAGE_EXTENSIONS)}) nor a caption ({spec.caption_extension})"
        warnings.insert(0, f"ignored {noun} neither {kinds}: {shown}")
    for warning in warnings:
        log.warning("%s", warning)
    return pairs, warnings


def list_pair_folders(storage: Storage, spec: DatasetSpec) -> list:
    """Every object in the control and target folders."""
    return storage.list(spec.control_dir.strip("/") + "/") + storage.list(spec.target_dir.strip("/") + "/")


def fetch_pair_images(storage: Storage, pairs: Iterable[TrainingPair], spec: DatasetSpec, cache_dir: Path) -> int:
    """Download the images of `pairs` (to the paths they name) unless present, after checking in a listing that
    none changed since it was validated; the number of files downloaded. A changed file fails naming it: the job
    trains on the dataset as it was validated."""
    wanted = {}
    for pair in pairs:
        wanted[pair.control_key], wanted[pair.target_key] = pair.control_etag, pair.target_etag
    if not wanted:
        return 0
    listed = {o.key: o.etag for o in list_pair_folders(storage, spec)}
    changed = [key for key, etag in wanted.items() if listed.get(key) != etag]
    if changed:
        first = changed[0]
        now = "is gone" if first not in listed else f"has changed (ETag {wanted[first]} -> {listed[first]})"
        raise InputChangedError(
            f"{storage.uri(first)} {now} since the preparation validated the dataset"
            + (f" ({len(changed) - 1} more files too)" if len(changed) > 1 else "")
            + "; the job trains on the pairs as they were validated: restore the file, or create a new job"
        )
    storage.fetch(sorted(wanted), cache_dir)
    return storage.last_fetch.downloaded


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_caption(
    storage: Storage, key: str | None, paths: dict[str, Path], spec: DatasetSpec, problems: list[str]
) -> str | None:
    instruction = None
    if key is not None:
        try:
            instruction = clean_caption(paths[key].read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            problems.append(f"{storage.uri(key)}: caption is not UTF-8 text")
            return None
        if not instruction and spec.default_caption is None:
            problems.append(f"{storage.uri(key)}: caption file is empty and there is no spec.dataset.defaultCaption")
            return None
    return compose_caption(instruction or spec.default_caption or "", spec.trigger_word)
