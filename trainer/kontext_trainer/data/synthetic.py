"""The synthetic scene world: soft backgrounds with coloured shapes, and the demo's "object remover" pairs.

A scene is a soft, textured background (two-colour gradient and blobs) with flat coloured shapes on it. The demo's
pairs are a background (the target, "after") and the same background with one shape drawn on it (the control,
"before"); the caption names the shape to remove. The toy base model (`model/toy/`) is fitted on scenes of the
same world with other edits, never the removal. Everything is generated from a seed instead of being committed,
so the repository stays small, and it is bit-identical on every machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "green": (40, 170, 70),
}
# Colours the toy base's world adds to the demo's four (the demo's pairs only ever use COLOURS).
SCENE_COLOURS = {
    **COLOURS,
    "orange": (240, 130, 30),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle")
EDGE_BLUR = 0.8  # px: edges look photographed, not rasterised
# Most pairs are square; some are landscape or portrait so aspect-ratio bucketing is exercised.
SIZES = ((512, 512), (512, 512), (592, 448), (512, 512), (448, 592))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Two-colour gradient with soft blobs: smooth enough to inpaint, varied enough to be learnable."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2
    start, end = rng.uniform(60, 200, size=3), rng.uniform(60, 200, size=3)
    image = start[None, None, :] * (1 - ramp[..., None]) + end[None, None, :] * ramp[..., None]
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.1, 0.3) * min(width, height)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))
        image += blob[..., None] * rng.uniform(-40, 40, size=3)[None, None, :]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], extent: float, fill: tuple[int, int, int]
) -> None:
    cx, cy = centre
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)


def render_scene(rng: np.random.Generator, width: int, height: int, max_shapes: int = 3) -> Image.Image:
    """A scene of the toy world: a background with 0 to `max_shapes` shapes of any SCENE_COLOURS colour."""
    scene = _background(rng, width, height)
    draw = ImageDraw.Draw(scene)
    for _ in range(int(rng.integers(0, max_shapes + 1))):
        fill = list(SCENE_COLOURS.values())[int(rng.integers(len(SCENE_COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        extent = rng.uniform(0.12, 0.36) * min(width, height)
        centre = (rng.uniform(extent / 2, width - extent / 2), rng.uniform(extent / 2, height - extent / 2))
        _draw_shape(draw, shape, centre, extent, fill)
    return scene.filter(ImageFilter.GaussianBlur(EDGE_BLUR))


def render_pair(seed: int, size: int | tuple[int, int] | None = None) -> tuple[Image.Image, Image.Image, str]:
    """(control, target, instruction) for one example; `size` overrides the width/height chosen by the seed."""
    rng = np.random.default_rng(seed)
    width, height = SIZES[seed % len(SIZES)] if size is None else (size, size) if isinstance(size, int) else size
    target = _background(rng, width, height)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    extent = rng.uniform(0.22, 0.36) * min(width, height)
    cx = rng.uniform(extent, width - extent)
    cy = rng.uniform(extent, height - extent)
    control = target.copy()
    _draw_shape(ImageDraw.Draw(control), shape, (cx, cy), extent, COLOURS[colour])
    control = control.filter(ImageFilter.GaussianBlur(EDGE_BLUR))
    return control, target, f"remove the {colour} {shape}"


def write_example_pairs(
    root: str | Path,
    count: int = 12,
    control_dir: str = "control",
    target_dir: str = "target",
    seed: int = 2024,
    uncaptioned: int = 1,
) -> Path:
    """Write `count` pairs as PNGs (+ captions; the last `uncaptioned` targets rely on the default caption)."""
    root = Path(root)
    (root / control_dir).mkdir(parents=True, exist_ok=True)
    (root / target_dir).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        control, target, instruction = render_pair(seed + index)
        stem = f"pair-{index:03d}"
        control.save(root / control_dir / f"{stem}.png", optimize=True)
        target.save(root / target_dir / f"{stem}.png", optimize=True)
        caption = root / target_dir / f"{stem}.txt"
        if index < count - uncaptioned:
            caption.write_text(instruction + "\n")
        else:
            caption.unlink(missing_ok=True)
    return root
