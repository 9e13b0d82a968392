"""Pairing control and target images by file name, from a listing alone (before anything is downloaded).

Every problem is collected — unpaired images, duplicate names, images in formats the trainer does not read, empty
files, missing captions without a default — and reported together, each line naming the file and what was
expected, so a user fixes the dataset in one go instead of one error per run. Files that are neither images nor
captions (`notes.md`, `metadata.json`, `Thumbs.db`) are not part of the dataset: they are ignored, and named in
one warning, as hidden files are ignored silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

from kontext_lora.api.spec import DatasetSpec

from ..storage import StoredObject
from .images import IMAGE_EXTENSIONS

# Image formats PIL does not register by default, or that cameras and phones write: a file in one of them is an
# image the user meant to train on (and must convert), never a stray file.
OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".svg", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".jxl")


@cache
def _image_extensions() -> frozenset[str]:
    from PIL import Image

    Image.init()
    return frozenset(Image.registered_extensions()) | frozenset(OTHER_IMAGE_EXTENSIONS)


def looks_like_image(suffix: str) -> bool:
    return suffix.lower() in _image_extensions()


class PairFiles(BaseModel):
    """The keys (relative to the dataset root) of one control/target pair and its caption, if any."""

    model_config = ConfigDict(frozen=True)

    stem: str
    control: StoredObject
    target: StoredObject
    caption: StoredObject | None


def _folder_entries(
    objects: Sequence[StoredObject],
    folder: str,
    spec: DatasetSpec,
    describe: Callable[[str], str],
    problems: list[str],
    broken: set[str],
    ignored: list[str],
) -> tuple[dict[str, StoredObject], dict[str, StoredObject]]:
    """Images and captions directly in `folder`, by stem; images of other formats and sub-folders are problems
    (stems of bad images go to `broken`, so their partner is not reported as unpaired as well), other files go to
    `ignored`."""
    images: dict[str, list[StoredObject]] = defaultdict(list)
    captions: dict[str, StoredObject] = {}
    prefix = folder.strip("/") + "/"
    caption_ext = spec.caption_extension.lower()
    allowed = ", ".join(IMAGE_EXTENSIONS)
    for obj in objects:
        if not obj.key.startswith(prefix):
            continue
        relative = PurePosixPath(obj.key[len(prefix) :])
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden files (.DS_Store, editor swap files) are not part of the dataset
        if len(relative.parts) > 1:
            problems.append(f"{describe(obj.key)}: sub-folders are not read; move the file up into {folder}/")
            continue
        suffix = relative.suffix.lower()
        if suffix == caption_ext:
            captions[relative.stem] = obj
        elif suffix in IMAGE_EXTENSIONS:
            if obj.size == 0:
                problems.append(f"{describe(obj.key)}: the file is empty (0 bytes)")
                broken.add(relative.stem)
                continue
            images[relative.stem].append(obj)
        elif looks_like_image(suffix):
            problems.append(
                f"{describe(obj.key)}: unexpected file type {suffix}; expected an image ({allowed}) or a caption "
                f"({spec.caption_extension}): convert it to PNG"
            )
            broken.add(relative.stem)
        else:
            ignored.append(describe(obj.key))
    unique: dict[str, StoredObject] = {}
    for stem, found in images.items():
        if len(found) > 1:
            names = ", ".join(describe(o.key) for o in found)
            problems.append(f"{names}: several images share the name {stem!r}; keep one per pair")
            broken.add(stem)
        else:
            unique[stem] = found[0]
    return unique, captions


def index_pairs(
    objects: Sequence[StoredObject], spec: DatasetSpec, describe: Callable[[str], str]
) -> tuple[list[PairFiles], list[str], list[str]]:
    """Pairs found in the listing, the problems that make the dataset unusable (empty when it is fine), and the
    files ignored (neither images nor captions)."""
    problems: list[str] = []
    broken: set[str] = set()
    ignored: list[str] = []
    controls, _ = _folder_entries(objects, spec.control_dir, spec, describe, problems, broken, ignored)
    targets, captions = _folder_entries(objects, spec.target_dir, spec, describe, problems, broken, ignored)
    if not controls and not targets and not broken:
        problems.insert(
            0,
            f"no images found in {describe(spec.control_dir + '/')} or {describe(spec.target_dir + '/')} "
            f"(expected pairs of {', '.join(IMAGE_EXTENSIONS)} files with the same name in both folders)",
        )
        return [], problems, ignored
    for stem, control in sorted(controls.items()):
        if stem not in targets and stem not in broken:
            problems.append(
                f"{describe(control.key)}: control image has no target; expected {spec.target_dir}/{stem}.<ext> "
                "with the same name"
            )
    for stem, target in sorted(targets.items()):
        if stem not in controls and stem not in broken:
            problems.append(
                f"{describe(target.key)}: target image has no control; expected {spec.control_dir}/{stem}.<ext> "
                "with the same name"
            )
    for stem, caption in sorted(captions.items()):
        if stem not in targets and stem not in controls and stem not in broken:
            problems.append(f"{describe(caption.key)}: caption has no target image with the same name")
    pairs = []
    for stem in sorted(controls.keys() & targets.keys()):
        caption = captions.get(stem)
        if caption is None and spec.default_caption is None:
            expected = f"{spec.target_dir}/{stem}{spec.caption_extension}"
            problems.append(
                f"{describe(targets[stem].key)}: no caption file ({expected}) and no spec.dataset.defaultCaption"
            )
        pairs.append(PairFiles(stem=stem, control=controls[stem], target=targets[stem], caption=caption))
    # Captions beside control images are ignored (ai-toolkit does the same): only targets carry captions.
    return pairs, problems, ignored
