"""The FLUX.1-Kontext training math, as plain functions of tensors and modules.

Conventions follow diffusers' `FluxKontextPipeline` at inference, so a LoRA trained here sees at training time
exactly the inputs it gets when used:

- VAE latents are normalised with the VAE's `shift_factor`/`scaling_factor` and packed into 2x2 patches:
  (B, C, H, W) -> (B, H/2 * W/2, 4C).
- The transformer's image sequence is [noisy target tokens ; control tokens]; image ids are (index, row, col)
  with index 0 for the target and 1 for the control image. Text ids are zeros.
- Flow matching: x_t = (1 - t) * x0 + t * noise, the model predicts the velocity (noise - x0), t in (0, 1) is
  passed as the timestep (the transformer multiplies it by 1000, as the pipeline's `timestep / 1000` undoes).
- The loss is the MSE on the target tokens only; the control tokens' outputs are discarded.
- Timesteps: logit-normal, shifted (a fixed shift, or the pipeline's resolution-dependent one), uniform, or
  ai-toolkit's `weighted` (uniform t, loss weighted per timestep); see `sample_sigmas`.

Nothing here holds state, so benchmarks can call these with any `FluxTransformer2DModel` and any tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling

from kontext_lora.api.spec import TimestepSampling

VAE_PATCH = 2  # latents are packed in 2x2 patches


def normalize_latents(latents: torch.Tensor, shift_factor: float | None, scaling_factor: float) -> torch.Tensor:
    """VAE latent -> the distribution the transformer was trained on (as `FluxKontextPipeline._encode_vae_image`)."""
    return (latents - (shift_factor or 0.0)) * scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), 2x2 patches in row-major order."""
    batch, channels, height, width = latents.shape
    if height % VAE_PATCH or width % VAE_PATCH:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latents of `height` x `width` (latent pixels, not image pixels)."""
    batch, _, features = packed.shape
    channels = features // 4
    patches = packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def image_ids(
    latent_height: int,
    latent_width: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position ids (index, row, col) of the packed tokens of one latent image: (H/2 * W/2, 3)."""
    rows = torch.arange(latent_height // 2, device=device, dtype=dtype)
    cols = torch.arange(latent_width // 2, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    first = torch.full((grid.shape[0], 1), float(index), device=device, dtype=dtype)
    return torch.cat([first, grid], dim=1)


def kontext_image_ids(
    target_hw: tuple[int, int],
    control_hw: tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ids of the sequence [target tokens ; control tokens]: the control's first id is 1 (Kontext's offset)."""
    return torch.cat(
        [image_ids(*target_hw, index=0, device=device, dtype=dtype), image_ids(*control_hw, 1, device, dtype)], dim=0
    )


def image_tokens(width: int, height: int) -> int:
    """Packed tokens of a width x height image (VAE scale 8, then 2x2 patches): the pipeline's `image_seq_len`."""
    return (height // (8 * VAE_PATCH)) * (width // (8 * VAE_PATCH))


def text_ids(sequence_length: int, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


# ---- timesteps -------------------------------------------------------------------------------------------------


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu for an image of `image_seq_len` packed tokens: the line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift), extrapolated beyond them (diffusers' `calculate_shift` in pipeline_flux_kontext.py)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> s·t / (1 + (s - 1)·t): towards high noise for s > 1. It equals the scheduler's exponential time shift
    e^mu / (e^mu + (1/t - 1)) with s = e^mu (its `_time_shift_exponential` with sigma 1)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class DynamicShift:
    """How FluxKontextPipeline shifts its inference schedule for an image's token count: the scheduler config's
    `use_dynamic_shifting`, `base_shift`/`max_shift`, `base_image_seq_len`/`max_image_seq_len`, `time_shift_type`
    (defaults: FLUX.1-Kontext-dev's scheduler_config.json), and its fixed `shift` when dynamic shifting is off."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    use_dynamic_shifting: bool = True
    fixed_shift: float = 3.0

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> DynamicShift:
        defaults = cls()
        return cls(
            base_shift=float(config.get("base_shift") or defaults.base_shift),
            max_shift=float(config.get("max_shift") or defaults.max_shift),
            base_image_seq_len=int(config.get("base_image_seq_len") or defaults.base_image_seq_len),
            max_image_seq_len=int(config.get("max_image_seq_len") or defaults.max_image_seq_len),
            time_shift_type=str(config.get("time_shift_type") or defaults.time_shift_type),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", True)),
            fixed_shift=float(config.get("shift") or 1.0),
        )

    def shift(self, image_seq_len: int) -> float:
        """The shift s (as in `shift_timesteps`) the pipeline applies to an image of `image_seq_len` tokens."""
        if not self.use_dynamic_shifting:
            return self.fixed_shift
        mu = calculate_shift(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )
        # The scheduler's time_shift(mu, 1.0, t): exponential e^mu / (e^mu + 1/t - 1), linear mu / (mu + 1/t - 1).
        return math.exp(mu) if self.time_shift_type == "exponential" else mu


def resolve_shift(
    sampling: TimestepSampling | str, fixed_shift: float, image_seq_len: int, dynamic: DynamicShift | None = None
) -> float:
    """The shift `sample_sigmas` applies for a batch of `image_seq_len`-token targets: the bucket's inference
    shift for `flux_shift`, `fixed_shift` for `shift` (ignored by the other schemes)."""
    if TimestepSampling(sampling) is TimestepSampling.flux_shift:
        return (dynamic or DynamicShift()).shift(image_seq_len)
    return fixed_shift


# ai-toolkit's `weighted` timesteps: t on its 1000-step training grid t_i = (1000 - i) / 1000, i uniform in 0..998
# (BaseSDTrainProcess draws `torch.randint(0, 999)` into the linspace(1000, 1, 1000) table), the loss multiplied by
# `default_weighing_scheme[i]` (toolkit/timestep_weighing/default_weighing_scheme.py, measured on Flex.1-alpha; see
# toolkit/samplers/custom_flowmatch_sampler.py `get_weights_for_timesteps`). The table itself is not copied here:
# WEIGHTED_CHEBYSHEV is a degree-12 least-squares Chebyshev fit of it in x = 2t - 1 (max deviation 0.027, rms 0.003
# over the 999 grid points; the same ~20 % of the total weight below t = 0.3), renormalised to mean 1 on the grid.
WEIGHTED_GRID = 1000
WEIGHTED_CHEBYSHEV = (
    0.959306, 0.421447, -0.0854781, -0.124163, -0.16095, -0.0303889, -0.0454034,
    -0.0195708, 0.000132282, -0.0150513, 0.00479879, -0.00733883, -0.000110144,
)  # fmt: skip


def _chebyshev(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """Clenshaw's recurrence for sum_k c_k T_k(x)."""
    b1 = torch.zeros_like(x)
    b2 = torch.zeros_like(x)
    for c in reversed(coefficients[1:]):
        b1, b2 = 2 * x * b1 - b2 + c, b1
    return x * b1 - b2 + coefficients[0]


def _weighted_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """(t, weight) on ai-toolkit's grid, float64, weights with mean 1 over the 999 points it draws from."""
    t = (WEIGHTED_GRID - torch.arange(WEIGHTED_GRID - 1, dtype=torch.float64)) / WEIGHTED_GRID
    weights = _chebyshev(2 * t - 1, WEIGHTED_CHEBYSHEV)
    return t, weights / weights.mean()


def timestep_weights(sampling: TimestepSampling | str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights for `sigmas` (None: unweighted). Only `weighted` weights its loss: each t gets the
    weight of its grid point, so the weighted loss's expectation is ai-toolkit's."""
    if TimestepSampling(sampling) is not TimestepSampling.weighted:
        return None
    _, grid_w = _weighted_grid()
    index = (WEIGHTED_GRID - (sigmas.double().cpu() * WEIGHTED_GRID).round()).long().clamp(0, WEIGHTED_GRID - 2)
    return grid_w[index].to(device=sigmas.device, dtype=torch.float32)


def sample_sigmas(
    batch_size: int,
    sampling: TimestepSampling | str = TimestepSampling.shift,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Flow-matching times t in (0, 1), one per sample.

    `shift` (default): a logit-normal draw u pushed towards high noise with t = s·u / (1 + (s - 1)·u), the map
    the inference scheduler applies to its sigmas with shift s. `flux_shift`: the same with s the pipeline's
    shift for the batch's token count (pass it as `shift`, see `resolve_shift`; musubi-tuner's `flux_shift`).
    `sigmoid`: plain logit-normal (SD3's recommendation, ai-toolkit's default). `uniform`: U(0, 1).
    `weighted`: ai-toolkit's grid points, uniformly; their loss weights come from `timestep_weights`.
    """
    sampling = TimestepSampling(sampling)
    # Draw on the generator's device, then move: CPU generators are portable across machines.
    gen_device = generator.device if generator is not None else device
    if sampling is TimestepSampling.weighted:
        index = torch.randint(0, WEIGHTED_GRID - 1, (batch_size,), generator=generator, device=gen_device)
        u = (WEIGHTED_GRID - index).float() / WEIGHTED_GRID
        return u.to(device).clamp(1e-4, 1 - 1e-4)
    scheme = "uniform" if sampling is TimestepSampling.uniform else "logit_normal"
    u = compute_density_for_timestep_sampling(
        scheme, batch_size, logit_mean=0.0, logit_std=1.0, device=gen_device, generator=generator
    ).to(device)
    if sampling in (TimestepSampling.shift, TimestepSampling.flux_shift):
        u = shift_timesteps(u, shift)
    return u.clamp(1e-4, 1 - 1e-4)


def stratified_sigmas(
    count: int, sampling: TimestepSampling | str = TimestepSampling.shift, shift: float = 3.0
) -> torch.Tensor:
    """`count` fixed times at the mid-quantiles of the training distribution (deterministic validation).

    For `weighted`, the distribution whose unweighted loss has the weighted loss's expectation: t with density
    proportional to its weight on ai-toolkit's grid. For `flux_shift`, pass the resolved shift as `shift`.
    """
    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    sampling = TimestepSampling(sampling)
    if sampling is TimestepSampling.uniform:
        return quantiles.float()
    if sampling is TimestepSampling.weighted:
        grid_t, grid_w = _weighted_grid()
        ascending_t, ascending_w = grid_t.flip(0), grid_w.flip(0)
        cumulative = ascending_w.cumsum(0) / ascending_w.sum()
        return ascending_t[torch.searchsorted(cumulative, quantiles)].float()
    u = torch.sigmoid(torch.special.ndtri(quantiles))
    if sampling in (TimestepSampling.shift, TimestepSampling.flux_shift):
        u = shift_timesteps(u, shift)
    return u.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t broadcast over all but the batch dimension."""
    t = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def guidance_vector(transformer: torch.nn.Module, scale: float, batch_size: int, device) -> torch.Tensor | None:
    """The guidance-embedding input (None for models without one), as the pipeline builds it. `transformer` may be
    wrapped (DistributedDataParallel keeps the model in `.module`)."""
    model = getattr(transformer, "module", transformer)
    if not getattr(model.config, "guidance_embeds", False):
        return None
    return torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)


@dataclass
class KontextInputs:
    """One batch, ready for the transformer: packed, normalised latents and cached text embeddings."""

    target: torch.Tensor  # x0, packed: (B, N, 4C)
    control: torch.Tensor  # packed control latents: (B, M, 4C)
    prompt_embeds: torch.Tensor  # T5 sequence: (B, L, D)
    pooled_prompt_embeds: torch.Tensor  # CLIP pooled: (B, P)
    img_ids: torch.Tensor  # (N + M, 3)
    txt_ids: torch.Tensor  # (L, 3)

    def to(self, device, dtype: torch.dtype | None = None) -> KontextInputs:
        def move(tensor: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
            return tensor.to(device=device, dtype=float_dtype if tensor.is_floating_point() else None)

        return KontextInputs(
            target=move(self.target, dtype),
            control=move(self.control, dtype),
            prompt_embeds=move(self.prompt_embeds, dtype),
            pooled_prompt_embeds=move(self.pooled_prompt_embeds, dtype),
            img_ids=self.img_ids.to(device),
            txt_ids=self.txt_ids.to(device),
        )

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]


def predict_velocity(
    transformer: torch.nn.Module,
    inputs: KontextInputs,
    noisy_target: torch.Tensor,
    sigmas: torch.Tensor,
    guidance: torch.Tensor | None,
) -> torch.Tensor:
    """The transformer's velocity prediction for the target tokens of [x_t ; control]."""
    hidden = torch.cat([noisy_target, inputs.control.to(noisy_target.dtype)], dim=1)
    output = transformer(
        hidden_states=hidden,
        timestep=sigmas.to(noisy_target.dtype),
        guidance=guidance,
        pooled_projections=inputs.pooled_prompt_embeds,
        encoder_hidden_states=inputs.prompt_embeds,
        txt_ids=inputs.txt_ids,
        img_ids=inputs.img_ids,
        return_dict=False,
    )[0]
    return output[:, : noisy_target.shape[1]]


def flow_matching_loss(
    transformer: torch.nn.Module,
    inputs: KontextInputs,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) on the target tokens, in float32; with
    `weights` (one per sample, see `timestep_weights`) each sample's MSE is weighted before the batch mean."""
    noisy = add_noise(inputs.target, noise, sigmas)
    guidance = guidance_vector(transformer, guidance_scale, inputs.batch_size, inputs.target.device)
    prediction = predict_velocity(transformer, inputs, noisy, sigmas, guidance)
    if weights is None:
        return F.mse_loss(prediction.float(), (noise - inputs.target).float())
    per_sample = F.mse_loss(prediction.float(), (noise - inputs.target).float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights.to(per_sample.device, torch.float32)).mean()
