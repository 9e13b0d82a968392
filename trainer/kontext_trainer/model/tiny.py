"""A tiny, random-initialised FLUX.1-Kontext model in diffusers format, built entirely here (no downloads).

It has every component the real model has — `FluxTransformer2DModel` (guidance embedding, one double- and one
single-stream block), `AutoencoderKL` (4 levels = scale factor 8, 4 latent channels), CLIP and T5 text encoders,
tokenizers built from a small built-in corpus, the flow-matching scheduler — so the trainer loads it through the
same code path as FLUX.1-Kontext-dev. It is small enough to train at 512 px on two CPU cores.

The VAE's `shift_factor`/`scaling_factor` are calibrated on synthetic images so its latents are roughly
zero-mean and unit-variance, as the real VAE's constants make them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from pydantic import BaseModel, ConfigDict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from .vocabulary import clip_tokenizer, t5_tokenizer

log = logging.getLogger(__name__)

# Vocabulary the tokenizers are trained on: edit instructions of the kind the product trains on.
_CORPUS_TEXT = (
    "remove the red green blue yellow orange purple white black circle square triangle shape object from image "
    "and fill background naturally retouch jewellery crisp metal gem detail studio light relight scene warm cool "
    "enhance texture sharpen make it brighter darker add a sign that says hello person smile photo of with on in "
    "at to by for is are this that these those keep everything else unchanged edit picture painting style "
    "xm rmv sks trigger word comma zero one two three four five six seven eight nine XM RMV SKS"
)
# Every printable character, so no caption maps to the unknown token.
_ALPHABET = [chr(code) for code in range(33, 127)]


class TinyModelConfig(BaseModel):
    """Sizes of the tiny model; the defaults make a 512 px training step take well under a second on a CPU."""

    model_config = ConfigDict(frozen=True)

    hidden_heads: int = 2
    head_dim: int = 16
    double_blocks: int = 1
    single_blocks: int = 1
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)
    text_dim: int = 32
    clip_vocab_size: int = 600
    t5_max_length: int = 512
    extra_vocabulary: str = ""  # more words for the tokenizers to learn (the toy base's edit instructions)


def _corpus(extra_vocabulary: str = "") -> list[str]:
    words = (_CORPUS_TEXT + " " + extra_vocabulary).split()
    # Deterministic sentences: every word, and word pairs, so BPE/Unigram learn stable merges.
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [f"{a} {b}," for a, b in zip(words, reversed(words), strict=True)]
    lines += [" ".join(_ALPHABET), "".join(_ALPHABET)]
    return lines * 4


def build_tokenizers(config: TinyModelConfig) -> tuple[CLIPTokenizer, T5Tokenizer]:
    """CLIP (byte-level BPE) and T5 (Unigram) tokenizers with the real ones' pipelines, built deterministically
    from a small corpus (vocabulary.py)."""
    corpus = _corpus(config.extra_vocabulary)
    return clip_tokenizer(corpus, config.clip_vocab_size), t5_tokenizer(corpus, config.t5_max_length)


def build_text_encoders(
    config: TinyModelConfig, clip_tokenizer: CLIPTokenizer, t5_tokenizer: T5Tokenizer
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """One-layer CLIP and T5 encoders of width `config.text_dim`, random-initialised (from torch's current seed)."""
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=config.text_dim * 2,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=config.text_dim,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=config.text_dim,
            d_kv=16,
            d_ff=config.text_dim * 2,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    return clip, t5


def build_tiny_pipeline(seed: int = 0, config: TinyModelConfig | None = None) -> FluxKontextPipeline:
    """All components of a FLUX.1-Kontext pipeline, random-initialised from `seed`."""
    config = config or TinyModelConfig()
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_tokenizers(config)
    clip, t5 = build_text_encoders(config, clip_tokenizer, t5_tokenizer)
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=4,
        sample_size=512,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    _calibrate_vae(vae, seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.latent_channels * 4,
        num_layers=config.double_blocks,
        num_single_layers=config.single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.hidden_heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=True,
        axes_dims_rope=config.axes_dims_rope,
    )
    return FluxKontextPipeline(
        scheduler=kontext_dev_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def kontext_dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-Kontext-dev's scheduler/scheduler_config.json, so the tiny model samples timesteps like the real one."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


@torch.no_grad()
def _calibrate_vae(vae: AutoencoderKL, seed: int) -> None:
    """Set shift/scale so latents of typical images are ~N(0, 1), like the real VAE's dataset constants."""
    from ..data.synthetic import render_pair

    images = [render_pair(seed * 1000 + i, size=128)[j] for i in range(4) for j in range(2)]
    batch = torch.stack([torch.from_numpy(_to_array(image)) for image in images]).permute(0, 3, 1, 2)
    latents = vae.encode(batch * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


def _to_array(image):
    import numpy as np

    return np.asarray(image, dtype=np.float32) / 255.0


def save_tiny_model(directory: str | Path, seed: int = 0, config: TinyModelConfig | None = None) -> Path:
    """Build the tiny model and save it as a diffusers-format folder (model_index.json + one folder per part)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed, config).save_pretrained(directory, safe_serialization=True)
    log.info("saved tiny FLUX.1-Kontext model to %s", directory)
    return directory
