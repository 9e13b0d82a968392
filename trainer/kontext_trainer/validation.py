"""Held-out evaluation at each checkpoint: a deterministic validation loss and a before/after preview grid.

The validation loss is the training objective on pairs the LoRA never trained on, with fixed noise and fixed
timesteps (the mid-quantiles of the training distribution), so values at different steps are comparable and
the lowest one marks the best checkpoint. The preview runs `FluxKontextPipeline` itself — cached control
latents and caption embeddings in, a few denoising steps — and lays out control | target | LoRA output.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from PIL import Image, ImageDraw

from kontext_lora.api.spec import TimestepSampling

from . import flux_math
from .data.images import fit_image, open_image
from .encoding import EncodedPair, LatentEncoder, batch_inputs

log = logging.getLogger(__name__)

PREVIEW_GUIDANCE = 2.5  # FLUX.1-Kontext-dev's recommended guidance at inference
PREVIEW_CELL = 384  # longest side of each image in the grid: 1024 px training gives a ~1.2k x 0.8k grid per pair


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
    def preview(
        self,
        transformer: torch.nn.Module,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        accelerator: Accelerator,
        steps: int,
        title: str,
        seed: int,
    ) -> Image.Image | None:
        """Grid with one row per held-out pair: control | target | the pipeline's output with the LoRA."""
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
        rows = []
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
                control = fit_image(open_image(item.pair.control_path), item.pair.bucket)
                target = fit_image(open_image(item.pair.target_path), item.pair.bucket)
                rows.append((control, target, output, item.pair.stem))
        finally:
            transformer.train(was_training)
        return _grid(rows, title)


def _grid(rows: list[tuple[Image.Image, Image.Image, Image.Image, str]], title: str) -> Image.Image:
    rows = [(*(_thumbnail(image) for image in row[:3]), row[3]) for row in rows]
    cell_w = max(r[0].width for r in rows)
    cell_h = max(r[0].height for r in rows)
    header = 24
    grid = Image.new("RGB", (cell_w * 3, header + (cell_h + header) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title, fill="black")
    for index, (control, target, output, stem) in enumerate(rows):
        top = header + index * (cell_h + header)
        for column, (image, label) in enumerate(
            ((control, f"{stem}: before (control)"), (target, "after (target)"), (output, "LoRA output"))
        ):
            draw.text((column * cell_w + 6, top + 6), label, fill="black")
            grid.paste(image, (column * cell_w, top + header))
    return grid


def _thumbnail(image: Image.Image, longest: int = PREVIEW_CELL) -> Image.Image:
    scale = longest / max(image.size)
    return image if scale >= 1 else image.resize((round(image.width * scale), round(image.height * scale)))
