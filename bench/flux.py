"""What the training-step benchmarks share: transformer configs, fast random init, inputs, and the two variants.

Both variants train a LoRA on *the same* `FluxTransformer2DModel` instance (same weights, same target modules,
same rank): peft holds two adapters on it and the benchmark activates one before each timed step.

- `ours`: the trainer's `KontextTrainStep` with its adapter from `kontext_trainer.model.lora.add_lora` (LoRA
  weights in fp32, as the trainer keeps them) and inputs as the trainer's latent cache stores them (packed).
- `reference`: `DiffusersReferenceStep`, a plain loop written the way diffusers'
  `examples/dreambooth/train_dreambooth_lora_flux_kontext.py` does it: unpacked latents, timesteps looked up in a
  copy of the flow-matching scheduler, noise added before packing, the control tokens concatenated, the
  prediction unpacked again, a (weighted) MSE over the whole latent, `accelerator.backward`, clipping over every
  transformer parameter, optimizer/scheduler step. Its adapter stays in the weight dtype under bf16 (the script
  only upcasts for fp16), with Gaussian init. It is not a copy of the script's code; it follows its steps.

The adapters target the trainer's modules for both (diffusers' default list lacks the single blocks' `proj_out`),
so the comparison is of the loops, not of different adapter sizes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from kontext_trainer import flux_math
from kontext_trainer.model.lora import ADAPTER, TARGET_PATTERNS, add_lora
from kontext_trainer.model.tiny import kontext_dev_scheduler
from kontext_trainer.train_step import KontextTrainStep, build_lr_scheduler, build_optimizer
from peft import LoraConfig

from kontext_lora.api.spec import LoraSpec, TrainingSpec

REFERENCE_ADAPTER = "reference"
VAE_SCALE = 8  # FLUX's VAE downsamples by 8; latents are then packed in 2x2 patches
LATENT_CHANNELS = 16  # FLUX's VAE latent channels (in_channels = 16 * 4 = 64)

# FLUX.1-Kontext-dev's transformer/config.json (the same as FLUX.1-dev's): ~11.9B parameters.
FULL_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
T5_TOKENS = 512  # FluxKontextPipeline's max_sequence_length


def build_transformer(
    config: dict[str, Any], device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> FluxTransformer2DModel:
    """The transformer with random weights, allocated directly on `device` in `dtype` (never on the CPU in fp32).

    Built on the meta device (no memory, no init kernels), moved to `device` uninitialised, then filled with one
    cheap random kernel per tensor: ~12B parameters take seconds on a GPU instead of minutes of CPU init.
    """
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    fill_random_(model, seed)
    return model.requires_grad_(False).train()


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep a deep DiT numerically tame: N(0, 1/fan_in) for projections, near-zero
    adaLN modulations (the blocks start close to identity, as adaLN-zero init makes them), unit norms, zero biases.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith(".bias"):
            parameter.zero_()
        elif parameter.ndim == 1:  # RMSNorm scales
            parameter.fill_(1.0)
        elif ".norm" in name and name.endswith(".linear.weight"):  # adaLN modulation (shift/scale/gate)
            parameter.normal_(0.0, 1e-3, generator=generator)
        else:
            parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[-1]), generator=generator)


def parameter_count(config: dict[str, Any]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in FluxTransformer2DModel(**config).parameters())


# ---- inputs ---------------------------------------------------------------------------------------------------


@dataclass
class StepBatch:
    """One batch in both variants' formats: unpacked latents for the reference, packed for ours."""

    latents: torch.Tensor | None  # (B, C, H, W): normalised target latents (x0); None: encoded from pixels
    control_latents: torch.Tensor | None  # (B, C, H, W)
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    text_ids: torch.Tensor  # (L, 3)

    def packed(self) -> flux_math.KontextInputs:
        if self.latents is None or self.control_latents is None:
            raise ValueError("no latents: this batch is encoded from pixels at every step")
        _, _, height, width = self.latents.shape
        return flux_math.KontextInputs(
            target=flux_math.pack_latents(self.latents),
            control=flux_math.pack_latents(self.control_latents),
            prompt_embeds=self.prompt_embeds,
            pooled_prompt_embeds=self.pooled_prompt_embeds,
            img_ids=flux_math.kontext_image_ids((height, width), (height, width), device=self.latents.device),
            txt_ids=self.text_ids.float(),  # the trainer's ids are float32
        )


def random_batch(
    config: dict[str, Any],
    resolution: int,
    text_tokens: int,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
) -> StepBatch:
    """Cached-latent-like inputs: a `resolution`² target and control, `text_tokens` T5 tokens."""
    generator = torch.Generator().manual_seed(seed)
    side = resolution // VAE_SCALE
    channels = config["in_channels"] // 4

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    return StepBatch(
        latents=normal(batch_size, channels, side, side),
        control_latents=normal(batch_size, channels, side, side),
        prompt_embeds=normal(batch_size, text_tokens, config["joint_attention_dim"]),
        pooled_prompt_embeds=normal(batch_size, config["pooled_projection_dim"]),
        text_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    )


# ---- the reference loop (the diffusers example's way) -----------------------------------------------------------


class DiffusersReferenceStep:
    """One optimiser step the way diffusers' `train_dreambooth_lora_flux_kontext.py` takes it (batch size B,
    no gradient accumulation). With `vae` set, latents are encoded from pixels every step (`--cache_latents` off,
    the script's default); otherwise the batch's latents are used as if cached (`--cache_latents`)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        accelerator: Accelerator,
        noise_scheduler: FlowMatchEulerDiscreteScheduler,
        weight_dtype: torch.dtype,
        guidance_scale: float = 1.0,
        max_grad_norm: float = 1.0,
        weighting_scheme: str = "none",
        vae: Any | None = None,
    ):
        self.transformer = transformer
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.accelerator = accelerator
        self.noise_scheduler = copy.deepcopy(noise_scheduler)
        self.weight_dtype = weight_dtype
        self.guidance_scale = guidance_scale
        self.max_grad_norm = max_grad_norm
        self.weighting_scheme = weighting_scheme
        self.vae = vae

    def _sigmas(self, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
        device = self.accelerator.device
        sigmas = self.noise_scheduler.sigmas.to(device=device, dtype=dtype)
        schedule = self.noise_scheduler.timesteps.to(device)
        indices = [(schedule == t).nonzero().item() for t in timesteps.to(device)]
        sigma = sigmas[indices].flatten()
        while sigma.ndim < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(pixels.to(self.accelerator.device, self.vae.dtype)).latent_dist.mode()

    def __call__(self, batch: StepBatch, pixels: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        device = self.accelerator.device
        self.transformer.train()
        with self.accelerator.accumulate(self.transformer):
            if pixels is not None and self.vae is not None:
                config = self.vae.config
                model_input = (self._encode(pixels[0]) - (config.shift_factor or 0.0)) * config.scaling_factor
                cond_input = (self._encode(pixels[1]) - (config.shift_factor or 0.0)) * config.scaling_factor
            elif batch.latents is not None and batch.control_latents is not None:
                model_input, cond_input = batch.latents, batch.control_latents
            else:
                raise ValueError("the batch has neither latents nor pixels (with a VAE) to encode")
            model_input = model_input.to(device=device, dtype=self.weight_dtype)
            cond_input = cond_input.to(device=device, dtype=self.weight_dtype)
            bsz, channels, height, width = model_input.shape
            image_ids = FluxKontextPipeline._prepare_latent_image_ids(
                bsz, height // 2, width // 2, device, self.weight_dtype
            )
            cond_ids = FluxKontextPipeline._prepare_latent_image_ids(
                bsz, height // 2, width // 2, device, self.weight_dtype
            )
            cond_ids[..., 0] = 1
            image_ids = torch.cat([image_ids, cond_ids], dim=0)

            noise = torch.randn_like(model_input)
            u = compute_density_for_timestep_sampling(
                weighting_scheme=self.weighting_scheme, batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
            )
            indices = (u * self.noise_scheduler.config.num_train_timesteps).long()
            timesteps = self.noise_scheduler.timesteps[indices].to(device=device)
            sigmas = self._sigmas(timesteps, model_input.ndim, model_input.dtype)
            noisy = (1.0 - sigmas) * model_input + sigmas * noise
            packed = FluxKontextPipeline._pack_latents(noisy, bsz, channels, height, width)
            target_tokens = packed.shape[1]
            packed_cond = FluxKontextPipeline._pack_latents(cond_input, bsz, channels, height, width)
            packed = torch.cat([packed, packed_cond], dim=1)
            guidance = torch.tensor([self.guidance_scale], device=device).expand(bsz)
            prediction = self.transformer(
                hidden_states=packed,
                timestep=timesteps / 1000,
                guidance=guidance,
                pooled_projections=batch.pooled_prompt_embeds.to(device),
                encoder_hidden_states=batch.prompt_embeds.to(device),
                txt_ids=batch.text_ids.to(device),
                img_ids=image_ids,
                return_dict=False,
            )[0]
            prediction = prediction[:, :target_tokens]
            prediction = FluxKontextPipeline._unpack_latents(
                prediction, height=height * VAE_SCALE, width=width * VAE_SCALE, vae_scale_factor=VAE_SCALE
            )
            weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean(
                (weighting.float() * (prediction.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
            ).mean()
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.transformer.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach().item()


def reference_noise_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-Kontext-dev's scheduler/scheduler_config.json (the reference copies it for its timestep table)."""
    return kontext_dev_scheduler()


# ---- both variants on one transformer ----------------------------------------------------------------------------


@dataclass
class Variants:
    transformer: torch.nn.Module
    accelerator: Accelerator
    ours: KontextTrainStep
    reference: DiffusersReferenceStep
    ours_parameters: list[torch.nn.Parameter]
    reference_parameters: list[torch.nn.Parameter]

    def activate(self, name: str) -> None:
        """Make `name`'s adapter the only active (and trainable) one; untimed, before each step."""
        self.transformer.set_adapter(ADAPTER if name == "ours" else REFERENCE_ADAPTER)

    def parameters_of(self, name: str) -> list[torch.nn.Parameter]:
        return self.ours_parameters if name == "ours" else self.reference_parameters

    def state_bytes(self, name: str) -> int:
        """Bytes a variant holds beyond the shared base weights: its adapter, gradients and optimizer state."""
        params = self.parameters_of(name)
        optimizer = (self.ours if name == "ours" else self.reference).optimizer
        total = sum(p.numel() * p.element_size() for p in params)
        total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        return total


def build_variants(
    transformer: torch.nn.Module,
    accelerator: Accelerator,
    rank: int,
    weight_dtype: torch.dtype,
    gradient_checkpointing: bool,
    total_steps: int = 10_000,
    vae: Any | None = None,
    include: tuple[str, ...] = ("ours", "reference"),
) -> Variants:
    """Both adapters on `transformer`, each with its own AdamW and constant LR schedule (same hyper-parameters)."""
    spec = TrainingSpec(steps=total_steps, learning_rate=1e-4, lr_scheduler="constant", warmup_steps=0)
    ours_parameters: list[torch.nn.Parameter] = []
    reference_parameters: list[torch.nn.Parameter] = []
    ours = reference = None
    if "ours" in include:
        ours_parameters = add_lora(transformer, LoraSpec(rank=rank), rank)  # the trainer's adapter (fp32)
    if "reference" in include:
        transformer.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=TARGET_PATTERNS[LoraSpec(rank=rank).target_modules],
            ),
            adapter_name=REFERENCE_ADAPTER,
        )
        reference_parameters = [
            p for n, p in transformer.named_parameters() if f".{REFERENCE_ADAPTER}." in n and p.requires_grad
        ]
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer = accelerator.prepare(transformer)
    if "ours" in include:
        optimizer = build_optimizer(ours_parameters, spec)
        scheduler = build_lr_scheduler(optimizer, spec, total_steps)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        ours = KontextTrainStep(transformer, ours_parameters, optimizer, scheduler, accelerator)
    if "reference" in include:
        optimizer = torch.optim.AdamW(reference_parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total_steps)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        reference = DiffusersReferenceStep(
            transformer, optimizer, scheduler, accelerator, reference_noise_scheduler(), weight_dtype, vae=vae
        )
    return Variants(transformer, accelerator, ours, reference, ours_parameters, reference_parameters)  # type: ignore[arg-type]


def step_callables(
    variants: Variants, batch: StepBatch, synchronize: Callable[[], None] = lambda: None
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], None]]]:
    """(timed step per variant, untimed preparation per variant) for `harness.interleaved`."""
    packed = batch.packed()
    counter = {"ours": 0}

    def ours() -> float:
        counter["ours"] += 1
        result = variants.ours([packed], [torch.Generator().manual_seed(counter["ours"])])
        synchronize()
        return result.loss

    def reference() -> float:
        loss = variants.reference(batch)
        synchronize()
        return loss

    steps = {"ours": ours, "reference": reference}
    prepare = {name: (lambda name=name: variants.activate(name)) for name in steps}
    return ({k: v for k, v in steps.items() if getattr(variants, k) is not None}, prepare)


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began
