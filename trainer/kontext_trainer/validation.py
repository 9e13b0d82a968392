"""Held-out evaluation at each checkpoint: a deterministic validation loss, the edit score and a preview grid.

The validation loss is the training objective on pairs the LoRA never trained on, with fixed noise and fixed
timesteps (the mid-quantiles of the training distribution), so values at different steps are comparable. The
edit score judges what users see: `FluxKontextPipeline` itself runs on each held-out control (cached control
latents and caption embeddings in, a few denoising steps, a fixed seed) with the LoRA and without it (the base
model, once per run), and each output is scored by its PSNR in dB against the pair's target. The highest LoRA
score marks the best checkpoint. The preview lays out control | target | base output | LoRA output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from PIL import Image, ImageDraw

from kontext_lora.api.spec import TimestepSampling

from . import flux_math
from .data.images import fit_image, open_image
from .encoding import EncodedPair, LatentEncoder, batch_inputs
from .image_metrics import psnr

log = logging.getLogger(__name__)

PREVIEW_GUIDANCE = 2.5  # FLUX.1-Kontext-dev's recommended guidance at inference
PREVIEW_CELL = 384  # longest side of each image in the grid: 1024 px training gives a ~1.5k x 0.4k row per pair
EDIT_METRIC = "PSNR (dB) of FluxKontextPipeline's output against the target, mean over the held-out pairs"


@dataclass
class HeldOutEdits:
    """The pipeline's outputs on the held-out controls (one per pair, in order) and their edit scores."""

    images: list[Image.Image]
    scores: list[float]  # PSNR in dB against each pair's target

    @property
    def score(self) -> float:
        return float(np.mean(self.scores))


@contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model: the transformer with its LoRA switched off (diffusers' PEFT integration)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


class HeldOutSet:
    def __init__(
        self,
        pairs: list[EncodedPair],
        encoder: LatentEncoder | None,
        sampling: TimestepSampling,
        shift: float,
        seed: int,
        timesteps: int = 8,
    ):
        self.pairs = pairs
        self.inputs = [batch_inputs([pair], encoder) for pair in pairs]
        self.sigmas = flux_math.stratified_sigmas(timesteps, sampling, shift)
        generator = torch.Generator().manual_seed(seed + 7919)
        self.noise = [torch.randn((timesteps, *inputs.target.shape[1:]), generator=generator) for inputs in self.inputs]

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def loss(self, transformer: torch.nn.Module, accelerator: Accelerator, guidance_scale: float) -> float | None:
        """Mean flow-matching loss over held-out pairs x fixed timesteps (None without held-out pairs)."""
        if not self.pairs:
            return None
        was_training = transformer.training
        transformer.eval()
        device = accelerator.device
        total = 0.0
        try:
            for inputs, noise in zip(self.inputs, self.noise, strict=True):
                on_device = inputs.to(device)
                # One timestep at a time: batch 1 keeps peak memory at the training step's level.
                for sigma, eps in zip(self.sigmas, noise, strict=True):
                    with accelerator.autocast():
                        loss = flux_math.flow_matching_loss(
                            transformer, on_device, eps[None].to(device), sigma.view(1).to(device), guidance_scale
                        )
                    total += float(loss)
        finally:
            transformer.train(was_training)
        return total / (len(self.inputs) * len(self.sigmas))

    @torch.no_grad()
    def edits(
        self,
        transformer: torch.nn.Module,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        accelerator: Accelerator,
        steps: int,
        seed: int,
    ) -> HeldOutEdits | None:
        """Run the pipeline on every held-out control with `transformer` as it is (None without held-out pairs)."""
        if not self.pairs or steps <= 0:
            return None
        pipeline = FluxKontextPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
        pipeline.set_progress_bar_config(disable=True)
        was_training = transformer.training
        transformer.eval()
        images, scores = [], []
        try:
            for item, inputs in zip(self.pairs, self.inputs, strict=True):
                height, width = item.latent_hw
                control_latents = flux_math.unpack_latents(inputs.control, height, width)
                pixel_w, pixel_h = item.pair.bucket
                with accelerator.autocast():
                    output = pipeline(
                        image=control_latents.to(accelerator.device, transformer.dtype),
                        prompt_embeds=inputs.prompt_embeds.to(accelerator.device, transformer.dtype),
                        pooled_prompt_embeds=inputs.pooled_prompt_embeds.to(accelerator.device, transformer.dtype),
                        height=pixel_h,
                        width=pixel_w,
                        max_area=pixel_h * pixel_w,
                        num_inference_steps=steps,
                        guidance_scale=PREVIEW_GUIDANCE,
                        generator=torch.Generator().manual_seed(seed),
                        output_type="pil",
                        _auto_resize=False,
                    ).images[0]
                images.append(output)
                scores.append(psnr(output, self._target(item)))
        finally:
            transformer.train(was_training)
        return HeldOutEdits(images, scores)

    def base_edits(self, transformer: torch.nn.Module, *args, **kwargs) -> HeldOutEdits | None:
        """`edits` of the base model (the LoRA switched off)."""
        with adapters_disabled(transformer):
            return self.edits(transformer, *args, **kwargs)

    def preview(self, base: HeldOutEdits, lora: HeldOutEdits, title: str) -> Image.Image:
        """Grid with one row per held-out pair: control | target | base model output | LoRA output."""
        rows = []
        for index, item in enumerate(self.pairs):
            control = fit_image(open_image(item.pair.control_path), item.pair.bucket)
            cells = [
                (control, f"{item.pair.stem}: before (control)"),
                (self._target(item), "after (target)"),
                (base.images[index], f"base model: {base.scores[index]:.1f} dB"),
                (lora.images[index], f"LoRA: {lora.scores[index]:.1f} dB"),
            ]
            rows.append(cells)
        return _grid(rows, title)

    @staticmethod
    def _target(item: EncodedPair) -> Image.Image:
        return fit_image(open_image(item.pair.target_path), item.pair.bucket)


def _grid(rows: list[list[tuple[Image.Image, str]]], title: str) -> Image.Image:
    rows = [[(_thumbnail(image), label) for image, label in row] for row in rows]
    cell_w = max(image.width for row in rows for image, _ in row)
    cell_h = max(image.height for row in rows for image, _ in row)
    columns = max(len(row) for row in rows)
    header = 24
    grid = Image.new("RGB", (cell_w * columns, header + (cell_h + header) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title, fill="black")
    for index, row in enumerate(rows):
        top = header + index * (cell_h + header)
        for column, (image, label) in enumerate(row):
            draw.text((column * cell_w + 6, top + 6), label, fill="black")
            grid.paste(image, (column * cell_w, top + header))
    return grid


def _thumbnail(image: Image.Image, longest: int = PREVIEW_CELL) -> Image.Image:
    scale = longest / max(image.size)
    return image if scale >= 1 else image.resize((round(image.width * scale), round(image.height * scale)))
