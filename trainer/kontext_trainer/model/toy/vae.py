"""The toy base's VAE: a diffusers `AutoencoderKL` with FLUX's layout (4 levels = scale 8, 16 latent channels,
no quant convs) whose weights are fitted to the scene world in closed form instead of by gradient descent.

Why closed form: a convolutional VAE trained by gradient descent on two CPU cores reaches ~18 dB PSNR after 15
minutes (measured, docs/toy-base.md), far from the 10-minute budget of the whole base. The scenes are smooth, so a
*linear* code of each 8x8 block reconstructs them well; the AutoencoderKL architecture can compute one exactly:

- encoder: the residual branches are switched off (`conv2` = 0, so every ResNet block is the identity or its 1x1
  shortcut); `conv_in` copies RGB; each stride-2 `Downsample2D` combines the moments of four child blocks into the
  parent's (mean, first and second moments per colour: exact linear recursions), so level 3 holds the moments of
  every 8x8 block. Sixteen of them, standardised, are the latent.
- the GroupNorm + SiLU before `conv_out` (and before the decoder's `conv_out`) are the only nonlinearities left.
  They are made linear to within 1e-3: each signal channel is paired with its negation and a large constant pair
  (+C, -C) joins the group, so the group mean is exactly 0 and its spread is set by C (image content moves it by
  <0.1 %); SiLU then runs around a large offset, and `conv_out` reads the odd part silu(B + u) - silu(B - u).
- decoder: `conv_in` and each nearest-neighbour `Upsample2D` conv are fitted stage by stage by ridge regression on
  rendered scenes: latents -> moments of 8x8 blocks -> of 4x4 -> of 2x2 -> RGB pixels.

The latent is therefore an affine function of the pixels, which is what lets the toy transformer (transformer.py)
perform colour edits exactly. `shift_factor`/`scaling_factor` are calibrated on scenes, as for the real VAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from PIL import Image

MOMENTS = ("m0", "mx", "my", "mxx", "myy", "mxy")  # per colour, in block-normalised coordinates
COLOURS = 3
CODE = len(MOMENTS) * COLOURS  # 18 moment channels per block
# The 16 latent channels: mean, first and second (axis) moments of each colour, and the xy moment of green.
LATENT_MOMENTS = [c * len(MOMENTS) + m for c in range(COLOURS) for m in range(5)] + [1 * len(MOMENTS) + 5]
LATENT_CHANNELS = len(LATENT_MOMENTS)
LEVELS = 4  # scale factor 2**(LEVELS-1) = 8, as FLUX's VAE
# Linearised GroupNorm + SiLU (module docstring): constant pair magnitude, SiLU offset, pre-activation gain.
REFERENCE = 100.0
SILU_OFFSET = 5.0
SILU_GAIN = 3.0
LOGVAR = -30.0  # diffusers' lower clamp: sampling the posterior returns its mode
RIDGE = 1e-4


def vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * LEVELS,
        "up_block_types": ("UpDecoderBlock2D",) * LEVELS,
        "block_out_channels": (CODE, CODE, CODE, 2 * LATENT_CHANNELS + 2),
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 1,
        "sample_size": 512,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    }


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], as the pipeline's image processor feeds the VAE."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def _silu_slope(offset: float) -> float:
    sigma = 1 / (1 + np.exp(-offset))
    return float(sigma * (1 + offset * (1 - sigma)))


def _moment_recursion() -> torch.Tensor:
    """(CODE, CODE, 2, 2): parent moments from the moments of the four children (top-left, top-right, ...).

    Child coordinates u' relate to the parent's as u = u'/2 + d with d = +-1/4 (coordinates in block units), so
    m0 = avg m0', mx = avg(mx'/2 + dx m0'), mxx = avg(mxx'/4 + dx mx' + dx^2 m0'),
    mxy = avg(mxy'/4 + (dy mx' + dx my')/2 + dx dy m0'), and likewise for y.
    """
    kernel = torch.zeros(CODE, CODE, 2, 2, dtype=torch.float64)
    for row in range(2):
        for col in range(2):
            dx, dy = (col - 0.5) / 2, (row - 0.5) / 2
            child = {  # parent moment -> {child moment: coefficient}
                "m0": {"m0": 1},
                "mx": {"mx": 0.5, "m0": dx},
                "my": {"my": 0.5, "m0": dy},
                "mxx": {"mxx": 0.25, "mx": dx, "m0": dx * dx},
                "myy": {"myy": 0.25, "my": dy, "m0": dy * dy},
                "mxy": {"mxy": 0.25, "mx": dy / 2, "my": dx / 2, "m0": dx * dy},
            }
            for colour in range(COLOURS):
                base = colour * len(MOMENTS)
                for parent, terms in child.items():
                    for name, coefficient in terms.items():
                        kernel[base + MOMENTS.index(parent), base + MOMENTS.index(name), row, col] += coefficient / 4
    return kernel


def _switch_off_residual_branches(vae: AutoencoderKL) -> None:
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            torch.nn.init.zeros_(module.conv2.weight)
            torch.nn.init.zeros_(module.conv2.bias)


def _centre_tap(out_channels: int, in_channels: int) -> torch.Tensor:
    return torch.zeros(out_channels, in_channels, 3, 3, dtype=torch.float64)


def _linearised_group(signal: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GroupNorm weight and bias for channels [s, -s, +C, -C] and the read-out factor that undoes them.

    With signals of unit size the group's spread is sigma0; conv_out multiplies silu(B + u) - silu(B - u) by
    `readout` to get back the signal."""
    channels = 2 * signal + 2
    sigma0 = float(np.sqrt((2 * signal + 2 * REFERENCE**2) / channels))
    weight = torch.full((channels,), SILU_GAIN, dtype=torch.float64)
    bias = torch.full((channels,), SILU_OFFSET, dtype=torch.float64)
    readout = sigma0 / (2 * _silu_slope(SILU_OFFSET) * SILU_GAIN)
    return weight, bias, readout


class MomentStatistics:
    """Per-channel mean and std of the 18 block moments at level 3 (to standardise the latent)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std


@torch.no_grad()
def _encoder_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Moments at every level (1, 2, 4, 8 px blocks) as the constructed encoder computes them."""
    encoder = vae.encoder
    h = encoder.conv_in(pixels)
    levels = [h]
    for block in encoder.down_blocks[:-1]:
        h = block.downsamplers[0](h)
        levels.append(h)
    return levels


def build_encoder(vae: AutoencoderKL, statistics: MomentStatistics | None) -> None:
    """Set the encoder's weights (statistics None: moments only, for measuring them first)."""
    encoder = vae.encoder
    conv_in = _centre_tap(CODE, 3)
    for colour in range(COLOURS):
        conv_in[colour * len(MOMENTS), colour, 1, 1] = 1.0  # a pixel's m0 is its value; its moments about itself are 0
    encoder.conv_in.weight.copy_(conv_in)
    encoder.conv_in.bias.zero_()
    recursion = _moment_recursion()
    for block in encoder.down_blocks[:-1]:
        conv = block.downsamplers[0].conv
        weight = torch.zeros_like(conv.weight, dtype=torch.float64)
        weight[:, :, :2, :2] = recursion  # padding (0,1,0,1), stride 2: taps 0 and 1 are the 2x2 children
        conv.weight.copy_(weight)
        conv.bias.zero_()
    if statistics is None:
        return
    shortcut = encoder.down_blocks[-1].resnets[0].conv_shortcut
    weight = torch.zeros(shortcut.weight.shape, dtype=torch.float64)
    bias = torch.zeros(shortcut.bias.shape, dtype=torch.float64)
    for index, moment in enumerate(LATENT_MOMENTS):
        scale = 1.0 / float(statistics.std[moment])
        for sign, channel in ((1, index), (-1, LATENT_CHANNELS + index)):
            weight[channel, moment, 0, 0] = sign * scale
            bias[channel] = -sign * scale * float(statistics.mean[moment])
    bias[2 * LATENT_CHANNELS], bias[2 * LATENT_CHANNELS + 1] = REFERENCE, -REFERENCE
    shortcut.weight.copy_(weight)
    shortcut.bias.copy_(bias)
    gn_weight, gn_bias, readout = _linearised_group(LATENT_CHANNELS)
    encoder.conv_norm_out.weight.copy_(gn_weight)
    encoder.conv_norm_out.bias.copy_(gn_bias)
    conv_out = _centre_tap(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS + 2)
    for index in range(LATENT_CHANNELS):
        conv_out[index, index, 1, 1] = readout
        conv_out[index, LATENT_CHANNELS + index, 1, 1] = -readout
    encoder.conv_out.weight.copy_(conv_out)
    out_bias = torch.zeros(2 * LATENT_CHANNELS, dtype=torch.float64)
    out_bias[LATENT_CHANNELS:] = LOGVAR
    encoder.conv_out.bias.copy_(out_bias)


def _neighbourhoods(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C*9 + 1): every position's 3x3 neighbourhood (zero padded) and a constant."""
    batch, channels, height, width = feature.shape
    columns = F.unfold(feature.double(), kernel_size=3, padding=1)  # (B, C*9, H*W)
    rows = columns.permute(0, 2, 1).reshape(batch * height * width, channels * 9)
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


class _Ridge:
    """Accumulated normal equations of a ridge regression (so fits stream over batches of scenes)."""

    def __init__(self):
        self.xtx: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xtx, xty = x.T @ x, x.T @ y
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty

    def solve(self) -> torch.Tensor:
        scale = torch.diagonal(self.xtx).mean()
        eye = torch.eye(self.xtx.shape[0], dtype=self.xtx.dtype)
        return torch.linalg.solve(self.xtx + RIDGE * scale * eye, self.xty)


def _set_fitted_conv(conv: torch.nn.Conv2d, solution: torch.Tensor, outputs: Sequence[int], inputs: int) -> None:
    """Write a ridge solution ((inputs*9 + 1) x len(outputs)) into `conv` (other outputs and inputs zero)."""
    weight = torch.zeros(conv.weight.shape, dtype=torch.float64)
    bias = torch.zeros(conv.weight.shape[0], dtype=torch.float64)
    kernels = solution[:-1].T.reshape(len(outputs), inputs, 3, 3)
    for row, channel in enumerate(outputs):
        weight[channel, :inputs] = kernels[row]
        bias[channel] = solution[-1, row]
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)


@torch.no_grad()
def fit_vae(vae: AutoencoderKL, batches: Sequence[torch.Tensor]) -> None:
    """Construct the encoder and fit the decoder on `batches` of scene pixels ((B, 3, H, W), H and W divisible by 8)."""
    vae.eval()
    _switch_off_residual_branches(vae)
    build_encoder(vae, None)
    level3 = torch.cat([_encoder_moments(vae, b)[-1].double().transpose(0, 1).reshape(CODE, -1) for b in batches], 1)
    build_encoder(vae, MomentStatistics(level3.mean(1), level3.std(1).clamp_min(1e-6)))

    decoder = vae.decoder
    targets = [_encoder_moments(vae, b) for b in batches]
    # Stage by stage, each conv fitted on the previous stage's decoded output (so errors do not compound unseen):
    # latents -> moments of 8x8 blocks (conv_in), -> 4x4 (first upsampler), -> 2x2 (second upsampler).
    features = [vae.encode(b).latent_dist.mode() for b in batches]
    for conv, level, upsample in (
        (decoder.conv_in, 3, False),
        (decoder.up_blocks[0].upsamplers[0].conv, 2, True),
        (decoder.up_blocks[1].upsamplers[0].conv, 1, True),
    ):
        inputs = [F.interpolate(f, scale_factor=2.0) if upsample else f for f in features]
        live = min(CODE, inputs[0].shape[1])  # the moments sit in the first channels of a wider level
        ridge = _Ridge()
        for x, target in zip(inputs, targets, strict=True):
            ridge.add(_neighbourhoods(x[:, :live]), target[level].double().permute(0, 2, 3, 1).reshape(-1, CODE))
        _set_fitted_conv(conv, ridge.solve(), range(CODE), live)
        features = [F.conv2d(x[:, :live], conv.weight[:CODE, :live], conv.bias[:CODE], padding=1) for x in inputs]
    # Identity 1x1 shortcut where the decoder narrows from the latent level's width to CODE channels.
    shortcut = decoder.up_blocks[1].resnets[0].conv_shortcut
    weight = torch.zeros(shortcut.weight.shape, dtype=torch.float64)
    weight[:CODE, :CODE, 0, 0] = torch.eye(CODE, dtype=torch.float64)
    shortcut.weight.copy_(weight)
    shortcut.bias.zero_()
    # Last upsampler: RGB pixels, their negations and the constant pair, for the linearised GroupNorm + SiLU.
    ridge = _Ridge()
    inputs = [F.interpolate(f, scale_factor=2.0) for f in features]
    for x, b in zip(inputs, batches, strict=True):
        ridge.add(_neighbourhoods(x), b.double().permute(0, 2, 3, 1).reshape(-1, 3))
    solution = ridge.solve()
    conv = decoder.up_blocks[2].upsamplers[0].conv
    weight = torch.zeros(conv.weight.shape, dtype=torch.float64)
    bias = torch.zeros(conv.weight.shape[0], dtype=torch.float64)
    kernels = solution[:-1].T.reshape(3, CODE, 3, 3)
    for colour in range(3):
        weight[colour], bias[colour] = kernels[colour], solution[-1, colour]
        weight[3 + colour], bias[3 + colour] = -kernels[colour], -solution[-1, colour]
    bias[6], bias[7] = REFERENCE, -REFERENCE
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    gn_weight, gn_bias, readout = _linearised_group(3)
    width = decoder.conv_norm_out.weight.shape[0]
    decoder.conv_norm_out.weight.copy_(torch.cat([gn_weight, torch.ones(width - 8, dtype=torch.float64)]))
    decoder.conv_norm_out.bias.copy_(torch.cat([gn_bias, torch.zeros(width - 8, dtype=torch.float64)]))
    # The group holds 8 live channels among `width`: its spread is sigma0 * sqrt(8 / width).
    readout *= float(np.sqrt(8 / width))
    conv_out = _centre_tap(3, width)
    for colour in range(3):
        conv_out[colour, colour, 1, 1] = readout
        conv_out[colour, 3 + colour, 1, 1] = -readout
    decoder.conv_out.weight.copy_(conv_out)
    decoder.conv_out.bias.zero_()
    calibrate_latent_normalisation(vae, batches)


@torch.no_grad()
def calibrate_latent_normalisation(vae: AutoencoderKL, batches: Sequence[torch.Tensor]) -> None:
    """shift_factor/scaling_factor so that latents of scenes are ~N(0, 1), like the real VAE's dataset constants."""
    latents = torch.cat([vae.encode(b).latent_dist.mode().flatten() for b in batches])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


def build_vae(batches: Sequence[torch.Tensor]) -> AutoencoderKL:
    """The fitted VAE, in float64: fits in double precision give the same float32 weights whatever the thread
    count or CPU (float32 sums differ in the last bit between them); cast it with `.float()` when done."""
    vae = AutoencoderKL(**vae_config()).double()
    fit_vae(vae, [batch.double() for batch in batches])
    return vae
