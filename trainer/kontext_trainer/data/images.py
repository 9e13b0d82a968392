"""Image decoding, resolution buckets and the pixel tensors the VAE encodes.

Buckets are the resolutions FLUX.1-Kontext was trained on — diffusers' `PREFERRED_KONTEXT_RESOLUTIONS`,
the list the pipeline snaps inputs to — scaled to the job's resolution and rounded to multiples of 16 (VAE
scale 8 x 2x2 packing), so a 512 bucket has about 512² pixels and the aspect ratio of its 1024 sibling.
Images are resized to cover the bucket and centre-cropped (aspect kept); the control image is cropped to its
target's bucket so both latents have the same shape.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SIZE_MULTIPLE = 16  # VAE scale factor 8 x 2x2 packing


class ImageDecodeError(ValueError):
    pass


@cache
def buckets(resolution: int, multiple: int = SIZE_MULTIPLE) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets of about `resolution`² pixels: Kontext's preferred resolutions, rescaled."""
    scale = resolution / 1024
    return tuple(
        (max(multiple, round(w * scale / multiple) * multiple), max(multiple, round(h * scale / multiple) * multiple))
        for w, h in PREFERRED_KONTEXT_RESOLUTIONS
    )


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (as the pipeline picks its input size)."""
    aspect = width / height
    return min(buckets(resolution), key=lambda wh: abs(aspect - wh[0] / wh[1]))


def open_image(path: Path) -> Image.Image:
    """Decode an image fully (not just its header) as RGB; ImageDecodeError says why it cannot be used."""
    if path.stat().st_size == 0:
        raise ImageDecodeError("the file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < SIZE_MULTIPLE or image.height < SIZE_MULTIPLE:
                raise ImageDecodeError(f"the image is {image.width}x{image.height} pixels, too small to train on")
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (the content is not PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageDecodeError):
            raise
        raise ImageDecodeError(f"the image is damaged or truncated ({error})") from None


@cache
def _processor() -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=SIZE_MULTIPLE)


def to_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) tensor in [-1, 1]: resized to cover `size` (width, height), centre-cropped."""
    width, height = size
    return _processor().preprocess(image, height=height, width=width, resize_mode="crop")


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The PIL image exactly as `to_pixels` sees it (for previews)."""
    return _processor().postprocess(to_pixels(image, size), output_type="pil")[0]
