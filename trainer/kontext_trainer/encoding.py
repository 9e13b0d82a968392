"""Encoding the dataset once: VAE latents of every pair and text embeddings of every caption.

Encodings are cached on disk (safetensors, keyed by the model's files, the pair's content, caption and
bucket), so a restarted trainer skips the text encoders and VAE entirely. The text encoders always leave
memory after this stage (T5-XXL is ~9 GB); the VAE stays only when latents are encoded on the fly
(`cacheLatents: false`) or previews need it to decode.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL
from diffusers.training_utils import free_memory
from tqdm.auto import tqdm

from . import flux_math
from .data.dataset import TrainingPair
from .data.images import open_image, to_pixels
from .model.load import load_text_pipeline, load_vae

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # FluxKontextPipeline's default T5 length
ENCODER_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass
class TextEmbedding:
    prompt_embeds: torch.Tensor  # (1, L, D)
    pooled_prompt_embeds: torch.Tensor  # (1, P)


@dataclass
class EncodedPair:
    """A pair ready for the transformer. `target`/`control` are None when latents are encoded per step."""

    pair: TrainingPair
    text: TextEmbedding
    latent_hw: tuple[int, int]  # (height, width) of the latent grid, before packing
    target: torch.Tensor | None = None  # packed, normalised x0: (1, N, 4C)
    control: torch.Tensor | None = None  # packed, normalised control latents: (1, N, 4C)


def model_fingerprint(model_dir: Path) -> str:
    """Identity of the encoders' files (names, sizes, mtimes): a changed model invalidates cached encodings."""
    digest = hashlib.sha256()
    for part in ENCODER_PARTS:
        for path in sorted((model_dir / part).rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(model_dir)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class LatentEncoder:
    """VAE encoding exactly as `FluxKontextPipeline` prepares its image latents (argmax, shift/scale, packing)."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8) in float32."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return flux_math.normalize_latents(
            latents.float(), self.vae.config.shift_factor, self.vae.config.scaling_factor
        )

    def encode_pair(self, pair: TrainingPair) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (target, control) latents on the CPU, both at the target's bucket."""
        target = self.encode_pixels(to_pixels(open_image(pair.target_path), pair.bucket))
        control = self.encode_pixels(to_pixels(open_image(pair.control_path), pair.bucket))
        return flux_math.pack_latents(target).cpu(), flux_math.pack_latents(control).cpu()


class DatasetEncoder:
    """Encodes pairs and captions with an on-disk cache under `cache_dir`."""

    def __init__(self, model_dir: Path, cache_dir: Path, device: torch.device, dtype: torch.dtype, vae_dtype):
        self.model_dir = model_dir
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.fingerprint = model_fingerprint(model_dir)
        vae_config = AutoencoderKL.load_config(model_dir, subfolder="vae")
        self.latent_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)

    def _path(self, kind: str, identity: str) -> Path:
        key = hashlib.sha256(f"{self.fingerprint}|{identity}".encode()).hexdigest()[:32]
        return self.cache_dir / kind / f"{key}.safetensors"

    def encode(
        self,
        pairs: list[TrainingPair],
        cache_latents: bool,
        keep_vae: bool,
        show_progress: bool = True,
        extra_captions: tuple[str, ...] = (),
    ) -> tuple[list[EncodedPair], LatentEncoder | None]:
        """Encoded pairs (same order), and the VAE encoder when it must stay loaded (else None). The embeddings of
        every caption, `extra_captions` (a dropped caption) included, are then in `self.texts`."""
        texts = self._encode_texts(sorted({p.caption for p in pairs} | set(extra_captions)), show_progress)
        self.texts = texts
        encoder: LatentEncoder | None = None
        encoded = []
        latent_paths = {p.identity: self._path("latents", f"{p.identity}|{self.vae_dtype}") for p in pairs}
        todo = {p.identity for p in pairs if not latent_paths[p.identity].is_file()} if cache_latents else set()
        if todo or keep_vae or not cache_latents:
            encoder = LatentEncoder(load_vae(self.model_dir, self.vae_dtype, self.device))
        with tqdm(total=len(todo), desc="encoding images", unit="pair", disable=not (show_progress and todo)) as bar:
            for pair in pairs:
                width, height = pair.bucket
                latent_hw = (height // self.latent_scale, width // self.latent_scale)
                item = EncodedPair(pair=pair, text=texts[pair.caption], latent_hw=latent_hw)
                if cache_latents:
                    path = latent_paths[pair.identity]
                    if pair.identity in todo:
                        target, control = encoder.encode_pair(pair)
                        _save(path, {"target": target, "control": control})
                        bar.update()
                    tensors = safetensors.torch.load_file(path)
                    item.target, item.control = tensors["target"], tensors["control"]
                encoded.append(item)
        if encoder is not None and not keep_vae and cache_latents:
            encoder = None  # every latent is cached: the VAE leaves memory
            free_memory()
        return encoded, encoder

    def _encode_texts(self, captions: list[str], show_progress: bool) -> dict[str, TextEmbedding]:
        paths = {caption: self._path("text", f"{caption}|{self.dtype}") for caption in captions}
        todo = [c for c in captions if not paths[c].is_file()]
        if todo:
            pipeline = load_text_pipeline(self.model_dir, self.dtype, self.device)
            length = min(MAX_SEQUENCE_LENGTH, pipeline.tokenizer_2.model_max_length)
            with torch.no_grad():
                for caption in tqdm(todo, desc="encoding captions", unit="caption", disable=not show_progress):
                    prompt_embeds, pooled, _ = pipeline.encode_prompt(
                        prompt=caption, prompt_2=None, device=self.device, max_sequence_length=length
                    )
                    _save(paths[caption], {"prompt_embeds": prompt_embeds.cpu(), "pooled": pooled.cpu()})
            del pipeline
            free_memory()  # the text encoders leave memory for good
            log.info("encoded %d captions; text encoders unloaded", len(todo))
        texts = {}
        for caption in captions:
            tensors = safetensors.torch.load_file(paths[caption])
            texts[caption] = TextEmbedding(tensors["prompt_embeds"], tensors["pooled"])
        return texts


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.replace(path)


def batch_inputs(items: list[EncodedPair], encoder: LatentEncoder | None) -> flux_math.KontextInputs:
    """Stack pairs of one bucket into a batch (encoding latents now when they are not cached)."""
    targets, controls = [], []
    for item in items:
        if item.target is None or item.control is None:
            if encoder is None:
                raise RuntimeError("latents are not cached and no VAE is loaded")
            target, control = encoder.encode_pair(item.pair)
        else:
            target, control = item.target, item.control
        targets.append(target)
        controls.append(control)
    height, width = items[0].latent_hw
    return flux_math.KontextInputs(
        target=torch.cat(targets),
        control=torch.cat(controls),
        prompt_embeds=torch.cat([i.text.prompt_embeds for i in items]),
        pooled_prompt_embeds=torch.cat([i.text.pooled_prompt_embeds for i in items]),
        img_ids=flux_math.kontext_image_ids((height, width), (height, width)),
        txt_ids=flux_math.text_ids(items[0].text.prompt_embeds.shape[1]),
    )
