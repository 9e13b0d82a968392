"""The toy base's edit family: what it does when asked, in pixels, with the instructions that ask for it.

Every edit is an affine map of each colour channel, so in the toy VAE's latent space (an affine function of the
pixels, vae.py) it is an affine map of each latent channel, which the toy transformer applies exactly. Instructions
it does not know leave the image as it is. Shape removal — the demo's edit — is deliberately not in the family:
the demo's LoRA has to teach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Edit:
    name: str
    instructions: tuple[str, ...]
    gain: tuple[float, float, float]  # per colour channel, on pixel values in [0, 1]
    offset: tuple[float, float, float]

    def apply(self, image: Image.Image) -> Image.Image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        edited = pixels * np.asarray(self.gain, dtype=np.float32) + np.asarray(self.offset, dtype=np.float32)
        return Image.fromarray(np.clip(np.round(edited * 255), 0, 255).astype(np.uint8), "RGB")

    @property
    def is_identity(self) -> bool:
        return self.gain == (1.0, 1.0, 1.0) and self.offset == (0.0, 0.0, 0.0)


KEEP = Edit(
    "keep", ("keep the image as it is", "keep everything unchanged", "leave the picture as it is"), (1, 1, 1), (0, 0, 0)
)
EDITS = (
    KEEP,
    Edit("brighter", ("make it brighter", "brighten the image", "make the picture brighter"), (0.6,) * 3, (0.4,) * 3),
    Edit("darker", ("make it darker", "darken the image", "make the picture darker"), (0.6,) * 3, (0.0,) * 3),
    Edit("warmer", ("make it warmer", "give it a warm tone"), (0.8, 1.0, 0.8), (0.2, 0.0, 0.0)),
    Edit("cooler", ("make it cooler", "give it a cool tone"), (0.8, 1.0, 0.8), (0.0, 0.0, 0.2)),
)
VOCABULARY = " ".join(sorted({word for edit in EDITS for text in edit.instructions for word in text.split()}))
