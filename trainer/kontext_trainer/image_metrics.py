"""How close an edited image is to the wanted one: the edit score of held-out pairs and of the toy base's report."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

MAX_PSNR = 100.0  # identical images


def psnr(image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of `image` against `reference` (same size; 8-bit images or [0, 1] arrays)."""
    a, b = _unit(image), _unit(reference)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare a {a.shape} image with a {b.shape} one")
    mse = float(np.mean((a - b) ** 2))
    return MAX_PSNR if mse <= 10 ** (-MAX_PSNR / 10) else -10 * math.log10(mse)


def _unit(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return np.asarray(image, dtype=np.float64)
