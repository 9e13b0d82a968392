"""Encoding the dataset once: VAE latents of every pair and text embeddings of every caption.

Encodings are cached (safetensors) under keys made of everything they depend on: for latents, both images'
bytes (SHA-256), the bucket, the VAE's files and the VAE's dtype; for text, the composed caption (trigger word,
instruction or default caption), the text encoders' and tokenizers' files, the sequence length and the dtype. The
model's files are named by content identities (`ModelDescription`: the hub's blob ids and LFS SHA-256s, S3
ETags, sizes and times of a local folder), so an unchanged encoder keeps its encodings across revisions.

`EncodingCache` keeps them in two places: the work folder (the pod's emptyDir), and, when the job has one, the
shared cache in object storage (`spec.output.cacheUri`, by default `kontext-lora-cache/` beside the output), as
`encodings/v1/{latents,text}/<key>.safetensors`. A restarted pod, or another job on the same pairs and model,
finds them there and loads no text encoder (and no VAE for encoding). The text encoders always leave memory after
this stage (T5-XXL is ~9 GB); the VAE stays only when latents are encoded on the fly (`cacheLatents: false`) or
previews need it to decode.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL
from diffusers.training_utils import free_memory
from tqdm.auto import tqdm

from . import flux_math
from .data.dataset import TrainingPair
from .data.images import open_image, to_pixels
from .errors import StorageError
from .model.load import load_text_pipeline, load_vae
from .model.source import TEXT_PARTS, VAE_PARTS, ModelDescription, describe_folder
from .storage import Location, Storage

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # FluxKontextPipeline's default T5 length
CACHE_FORMAT = "v1"
REMOTE_PREFIX = f"encodings/{CACHE_FORMAT}/"


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


@dataclass
class Fingerprints:
    """Identities of the model files each kind of encoding depends on."""

    vae: str
    text: str

    @classmethod
    def of(cls, description: ModelDescription) -> Fingerprints:
        return cls(vae=description.fingerprint(VAE_PARTS), text=description.fingerprint(TEXT_PARTS))


@dataclass
class CacheReport:
    """What one run found where: for the log, and the time-to-first-step figures."""

    local: dict[str, int] = field(default_factory=lambda: {"latents": 0, "text": 0})
    remote: dict[str, int] = field(default_factory=lambda: {"latents": 0, "text": 0})
    encoded: dict[str, int] = field(default_factory=lambda: {"latents": 0, "text": 0})
    uploaded: int = 0


class EncodingCache:
    """Encodings by key: in `local_dir`, and in `remote` storage when given (shared by pods and jobs)."""

    def __init__(
        self,
        local_dir: Path,
        fingerprints: Fingerprints,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        remote: Storage | None = None,
    ):
        self.local_dir = local_dir
        self.fingerprints = fingerprints
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.remote = remote
        self.report = CacheReport()
        self._fresh: list[str] = []  # keys (relative paths) encoded by this run: uploaded by `publish`
        self._counted: set[str] = set()  # keys already in the report (gather is asked more than once)
        self._found: dict[str, Path] = {}  # where the shared cache's files are on this machine

    @staticmethod
    def _key(kind: str, identity: str) -> str:
        return f"{kind}/{hashlib.sha256(identity.encode()).hexdigest()[:40]}.safetensors"

    def latent_key(self, pair: TrainingPair) -> str:
        return self._key("latents", f"{CACHE_FORMAT}|{self.fingerprints.vae}|{self.vae_dtype}|{pair.content}")

    def text_key(self, caption: str) -> str:
        return self._key(
            "text", f"{CACHE_FORMAT}|{self.fingerprints.text}|{self.dtype}|{MAX_SEQUENCE_LENGTH}|{caption}"
        )

    def path(self, key: str) -> Path:
        """The file of `key` on this machine (the shared cache's own file when it is a local folder)."""
        return self._found.get(key) or self.local_dir / key

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def gather(self, keys: list[str]) -> set[str]:
        """Bring what the shared cache holds of `keys` into the local folder; the keys now available locally."""
        keys = sorted(set(keys))
        local = {k for k in keys if self.has(k)}
        for key in local - self._counted:
            self.report.local[key.split("/", 1)[0]] += 1
        self._counted |= local
        missing = [k for k in keys if k not in local]
        if self.remote is None or not missing:
            return local
        try:
            found = self.remote.stat(missing)
            if found:
                self._found.update(self.remote.fetch(sorted(found), self.local_dir, known=found))
        except StorageError as error:
            self._give_up_remote(f"cannot read the encoding cache {self.remote.uri()}: {error}")
            return local
        for key in found:
            self.report.remote[key.split("/", 1)[0]] += 1
        self._counted |= set(found)
        return local | set(found)

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.local_dir / key
        _save(path, tensors)
        self._fresh.append(key)
        self._counted.add(key)
        self.report.encoded[key.split("/", 1)[0]] += 1
        return path

    def publish(self) -> None:
        """Upload what this run encoded to the shared cache. A failure costs the next run an encoding, never
        this run: it is logged and training goes on."""
        fresh, self._fresh = self._fresh, []
        if self.remote is None or not fresh:
            return
        try:
            self.remote.put_files([(self.path(key), key) for key in fresh])
        except StorageError as error:
            self._give_up_remote(f"cannot write the encoding cache {self.remote.uri()}: {error}")
            return
        self.report.uploaded += len(fresh)
        log.info("%d encodings written to the shared cache %s", len(fresh), self.remote.uri())

    def _give_up_remote(self, message: str) -> None:
        log.warning("%s; going on without the shared encoding cache (the next run encodes again)", message)
        self.remote = None


def local_fingerprints(model_dir: Path) -> Fingerprints:
    """Fingerprints of a local model folder (sizes and times of its files), for callers without a description."""
    return Fingerprints.of(describe_folder(model_dir))


def remote_cache(uri: str, s3, base_dir: Path | None = None) -> Storage:
    """The shared encoding cache under a job's cache URI."""
    from .storage import open_storage

    return open_storage(Location.parse(uri, base_dir).child(REMOTE_PREFIX), s3)


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
    """Encodes pairs and captions, through an `EncodingCache` (by default one in `cache_dir` only)."""

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        vae_dtype,
        cache: EncodingCache | None = None,
    ):
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.cache = cache or EncodingCache(cache_dir, local_fingerprints(model_dir), dtype, vae_dtype)
        vae_config = AutoencoderKL.load_config(model_dir, subfolder="vae")
        self.latent_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)

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
        # One sample per pair and resolution: keyed by both (the cache key holds the bucket already).
        latent_keys = {p.sample: self.cache.latent_key(p) for p in pairs}
        if cache_latents:
            available = self.cache.gather(list(latent_keys.values()))
            todo = {p.sample for p in pairs if latent_keys[p.sample] not in available}
        else:
            todo = set()
        if todo or keep_vae or not cache_latents:
            encoder = LatentEncoder(load_vae(self.model_dir, self.vae_dtype, self.device))
        with tqdm(total=len(todo), desc="encoding images", unit="pair", disable=not (show_progress and todo)) as bar:
            for pair in pairs:
                width, height = pair.bucket
                latent_hw = (height // self.latent_scale, width // self.latent_scale)
                item = EncodedPair(pair=pair, text=texts[pair.caption], latent_hw=latent_hw)
                if cache_latents:
                    key = latent_keys[pair.sample]
                    if pair.sample in todo:
                        target, control = encoder.encode_pair(pair)
                        self.cache.save(key, {"target": target, "control": control})
                        bar.update()
                    tensors = safetensors.torch.load_file(self.cache.path(key))
                    item.target, item.control = tensors["target"], tensors["control"]
                encoded.append(item)
        self.cache.publish()
        if encoder is not None and not keep_vae and cache_latents:
            encoder = None  # every latent is cached: the VAE leaves memory
            free_memory()
        return encoded, encoder

    def _encode_texts(self, captions: list[str], show_progress: bool) -> dict[str, TextEmbedding]:
        keys = {caption: self.cache.text_key(caption) for caption in captions}
        available = self.cache.gather(list(keys.values()))
        todo = [c for c in captions if keys[c] not in available]
        if todo:
            pipeline = load_text_pipeline(self.model_dir, self.dtype, self.device)
            length = min(MAX_SEQUENCE_LENGTH, pipeline.tokenizer_2.model_max_length)
            with torch.no_grad():
                for caption in tqdm(todo, desc="encoding captions", unit="caption", disable=not show_progress):
                    prompt_embeds, pooled, _ = pipeline.encode_prompt(
                        prompt=caption, prompt_2=None, device=self.device, max_sequence_length=length
                    )
                    self.cache.save(keys[caption], {"prompt_embeds": prompt_embeds.cpu(), "pooled": pooled.cpu()})
            del pipeline
            free_memory()  # the text encoders leave memory for good
            log.info("encoded %d captions; text encoders unloaded", len(todo))
        texts = {}
        for caption in captions:
            tensors = safetensors.torch.load_file(self.cache.path(keys[caption]))
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
