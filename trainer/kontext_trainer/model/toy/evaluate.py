"""What the toy base can do, measured on scenes it never saw: the VAE's reconstruction and each edit through
`FluxKontextPipeline` itself (the path users take), as PSNR in dB against the exact answer."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from pydantic import BaseModel

from ...data.synthetic import render_scene
from ...image_metrics import psnr
from .edits import EDITS, Edit
from .vae import to_pixels

EVALUATION_SEED_OFFSET = 10_000  # scenes drawn from another stream than any fitted on
EVALUATION_SIZE = 256
EVALUATION_SCENES = 3
UNKNOWN_INSTRUCTION = "make it look like an oil painting"


class ToyBaseReport(BaseModel):
    name: str
    seed: int
    build_seconds: float
    evaluation_size: int
    inference_steps: int
    vae_psnr: float  # mean over unseen scenes, encode + decode
    edit_psnr: dict[str, float]  # edit name -> mean PSNR of the pipeline's output against the exact edit
    unknown_instruction_psnr: float  # the output for an instruction it does not know, against the input


@torch.no_grad()
def run_edit(pipeline: FluxKontextPipeline, image: Image.Image, instruction: str, steps: int, seed: int = 0):
    return pipeline(
        image=image,
        prompt=instruction,
        height=image.height,
        width=image.width,
        max_area=image.height * image.width,
        _auto_resize=False,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


@torch.no_grad()
def evaluate(
    pipeline: FluxKontextPipeline, name: str, seed: int, build_seconds: float, steps: int = 20
) -> ToyBaseReport:
    rng = np.random.default_rng(seed + EVALUATION_SEED_OFFSET)
    scenes = [render_scene(rng, EVALUATION_SIZE, EVALUATION_SIZE) for _ in range(EVALUATION_SCENES)]
    vae = pipeline.vae
    decoded = vae.decode(vae.encode(to_pixels(scenes)).latent_dist.mode()).sample.clamp(-1, 1)
    images = [(d.permute(1, 2, 0).numpy() + 1) / 2 for d in decoded]
    vae_psnr = float(np.mean([psnr(image, scene) for image, scene in zip(images, scenes, strict=True)]))

    def mean_psnr(edit: Edit, instruction: str) -> float:
        return float(np.mean([psnr(run_edit(pipeline, s, instruction, steps), edit.apply(s)) for s in scenes]))

    return ToyBaseReport(
        name=name,
        seed=seed,
        build_seconds=round(build_seconds, 1),
        evaluation_size=EVALUATION_SIZE,
        inference_steps=steps,
        vae_psnr=round(vae_psnr, 2),
        edit_psnr={edit.name: round(mean_psnr(edit, edit.instructions[0]), 2) for edit in EDITS},
        unknown_instruction_psnr=round(mean_psnr(EDITS[0], UNKNOWN_INSTRUCTION), 2),
    )
