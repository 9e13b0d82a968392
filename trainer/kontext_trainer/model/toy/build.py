"""Assembling the toy base: fit the VAE on rendered scenes, build the text encoders, fit each edit's latent map,
construct the transformer, and put them in one `FluxKontextPipeline` (saved in FLUX.1-Kontext-dev's folder layout).

Every step is a pure function of the seed: the same seed gives bit-identical weights on every machine.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from ...data.synthetic import render_scene
from ...flux_math import normalize_latents, pack_latents
from ..tiny import TinyModelConfig, build_text_encoders, build_tokenizers, kontext_dev_scheduler
from .edits import EDITS, VOCABULARY, Edit
from .text import make_bag_of_words_clip
from .transformer import EditMap, ToyTransformerConfig, build_transformer
from .vae import LATENT_CHANNELS, build_vae, to_pixels

VAE_FIT_SCENES = 16  # 192 px scenes: ~600k pixels for the decoder's least-squares fits
EDIT_FIT_SCENES = 16
FIT_SIZE = 192
EDIT_FIT_SIZE = 128
CLIP_VOCABULARY = 1200  # enough merges that every corpus word is one CLIP token (the bag of words, text.py)


def known_edits() -> list[Edit]:
    """The edits the transformer is built to recognise (keeping the image needs no recognition: it is the default)."""
    return [edit for edit in EDITS if not edit.is_identity]


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images) -> torch.Tensor:
    """Normalised latents (B, 16, H/8, W/8), exactly as FluxKontextPipeline prepares its image latents."""
    latents = vae.encode(to_pixels(images).to(vae.dtype)).latent_dist.mode()
    return normalize_latents(latents, vae.config.shift_factor, vae.config.scaling_factor)


def fit_edit_maps(vae: AutoencoderKL, edits: list[Edit], rng: np.random.Generator) -> list[EditMap]:
    """Per latent channel, the least-squares affine map from a scene's latents to its edited version's."""
    scenes = [render_scene(rng, EDIT_FIT_SIZE, EDIT_FIT_SIZE) for _ in range(EDIT_FIT_SCENES)]
    before = encode_latents(vae, scenes).transpose(0, 1).reshape(LATENT_CHANNELS, -1).double()
    maps = []
    for edit in edits:
        after = encode_latents(vae, [edit.apply(scene) for scene in scenes]).transpose(0, 1)
        after = after.reshape(LATENT_CHANNELS, -1).double()
        gains, offsets = [], []
        for channel in range(LATENT_CHANNELS):
            design = torch.stack([before[channel], torch.ones_like(before[channel])], dim=1)
            gain, offset = torch.linalg.lstsq(design, after[channel][:, None]).solution[:, 0]
            gains.append(float(gain))
            offsets.append(float(offset))
        # Packed tokens hold each channel's 2x2 patch next to each other (flux_math.pack_latents).
        maps.append(EditMap(edit, torch.tensor(gains).repeat_interleave(4), torch.tensor(offsets).repeat_interleave(4)))
    return maps


def build_text(seed: int, config: ToyTransformerConfig) -> tuple[CLIPTokenizer, CLIPTextModel, object, object]:
    text_config = TinyModelConfig(
        text_dim=config.text_dim, t5_max_length=512, clip_vocab_size=CLIP_VOCABULARY, extra_vocabulary=VOCABULARY
    )
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_tokenizers(text_config)
    clip, t5 = build_text_encoders(text_config, clip_tokenizer, t5_tokenizer)
    make_bag_of_words_clip(clip, clip_tokenizer, seed)
    return clip_tokenizer, clip, t5_tokenizer, t5


@torch.no_grad()
def pooled_instructions(pipeline: FluxKontextPipeline, edits: list[Edit]) -> tuple[torch.Tensor, list[int]]:
    """Pooled CLIP vectors of every phrasing of `edits`, and the edit index of each."""
    vectors, owners = [], []
    for index, edit in enumerate(edits):
        for instruction in edit.instructions:
            vectors.append(pipeline._get_clip_prompt_embeds(instruction, 1, torch.device("cpu"))[0])
            owners.append(index)
    return torch.stack(vectors), owners


@torch.no_grad()
def build_toy_pipeline(seed: int = 0) -> FluxKontextPipeline:
    rng = np.random.default_rng(seed)
    batches = [to_pixels([render_scene(rng, FIT_SIZE, FIT_SIZE) for _ in range(4)]) for _ in range(VAE_FIT_SCENES // 4)]
    torch.manual_seed(seed)  # the VAE's switched-off residual branches keep their (unused) random weights
    vae = build_vae(batches)
    config = ToyTransformerConfig()
    clip_tokenizer, clip, t5_tokenizer, t5 = build_text(seed, config)
    pipeline = FluxKontextPipeline(
        scheduler=kontext_dev_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=None,
    )
    edits = known_edits()
    templates, owners = pooled_instructions(pipeline, edits)
    edit_maps = fit_edit_maps(vae, edits, rng)
    tokens = pack_latents(encode_latents(vae, [render_scene(rng, EDIT_FIT_SIZE, EDIT_FIT_SIZE) for _ in range(4)]))
    transformer = build_transformer(config, edit_maps, templates, owners, tokens.float(), seed)
    pipeline.register_modules(transformer=transformer, vae=vae.float())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
