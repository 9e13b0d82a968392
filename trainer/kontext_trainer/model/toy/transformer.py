"""The toy base's transformer: a diffusers `FluxTransformer2DModel` (double- and single-stream blocks, guidance
embedding, 3-axis RoPE) whose weights are constructed so that it performs the edit family of edits.py, plus
dormant capacity that a LoRA can recruit.

Why constructed: on two CPU cores, 300 gradient steps (11 minutes) of flow-matching pretraining leave a 1.9M
parameter transformer at 15 dB on the identity edit (measured, docs/toy-base.md). What the transformer must compute
is simple enough to write down, so it is:

Residual stream (width D): dims 0..63 hold a packed latent token; dim 64 holds minus their sum and dims 65/66 a
constant pair (+R, -R), so every token vector has mean 0 and a spread set by R: LayerNorm is then a fixed linear
scaling, and the network between the embedder and the read-out is linear where it has to be. Dims 67.. hold
features of the token (block 0's MLP) that the base never reads.

- Block 1 (double-stream) copies: its attention heads have constant queries and keys (biases only), so their
  scores depend on the RoPE positions alone: a target token at (0, row, col) attends to the control token at
  (1, row, col) with weight > 0.999 (index-axis phase, row/col-axis alignment), never to text tokens (their keys
  point away). The values carry the control token's latent, modulated per channel by the instruction (AdaLN
  scale/shift from the pooled CLIP embedding: the edit's affine map, fitted on encoded scenes), and the output
  subtracts it: the target's residual becomes x_t - x0_hat.
- The read-out (AdaLayerNormContinuous + proj_out) multiplies by g(t) ~ 1/t, fitted by least squares on features
  of the timestep embedding: the velocity (x_t - x0_hat) / t, exact for the flow x_t = (1 - t) x0 + t noise.
- Instructions are recognised from the pooled CLIP vector (a bag of words, text.py) by one hidden unit per known
  phrasing (a cosine-similarity threshold); unknown instructions change nothing: the base keeps the image.
- Dormant capacity: block 0's attention, the MLPs of block 1 and the single-stream block keep random input
  projections with zero output projections (their output is 0, their gradients are not), so a LoRA on the
  projections the trainer adapts can switch them on; block 0's MLP writes random nonlinear features of each token
  into the free dims. The copy heads' keys are small biases, so a LoRA on `to_k` can redirect them (e.g. away from
  the tokens of an object, so a target fills from its surroundings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding

from .edits import Edit

# Layout of the residual stream and of the time/text embedding.
SIGNAL = 64  # packed latent: 16 channels x 2x2
SUM_DIM = SIGNAL
REFERENCE_DIMS = (SIGNAL + 1, SIGNAL + 2)
FEATURE_START = SIGNAL + 3
REFERENCE = 100.0
TIME_UNITS = 24  # SiLU ramps of the timestep embedding that g(t) ~ 1/t is fitted on
TIME_OFFSET = 8.0  # keeps the second SiLU (AdaLN's) in its linear range
T_RANGE = (0.004, 1.0)
COPY_NORM = 6.0  # RMS of the copy heads' queries and keys after their RMSNorm: sets how sharp the copy is
COPY_BIAS = 0.05  # RMS of the raw query/key biases: small, so LoRA deltas on to_q/to_k move them
MATCH_THRESHOLD = 0.9  # cosine similarity of pooled CLIP vectors above which an instruction is recognised
MATCH_SHARPNESS = 200.0
FEATURE_GAIN = 1.5


@dataclass(frozen=True)
class ToyTransformerConfig:
    heads: int = 3
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    double_blocks: int = 2
    single_blocks: int = 1
    text_dim: int = 64

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def model_kwargs(self) -> dict:
        return {
            "patch_size": 1,
            "in_channels": SIGNAL,
            "num_layers": self.double_blocks,
            "num_single_layers": self.single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.text_dim,
            "pooled_projection_dim": self.text_dim,
            "guidance_embeds": True,
            "axes_dims_rope": self.axes_dims_rope,
        }


@dataclass
class EditMap:
    """The edit's affine map of each packed latent dim (as the pipeline normalises and packs latents)."""

    edit: Edit
    gain: torch.Tensor  # (SIGNAL,)
    offset: torch.Tensor  # (SIGNAL,)


def _zero(*modules: torch.nn.Module) -> None:
    for module in modules:
        for parameter in module.parameters():
            parameter.zero_()


def _zero_mean_columns(weight: torch.Tensor, rows: slice) -> torch.Tensor:
    """`weight` with only `rows` non-zero and each column summing to 0 (outputs keep the token mean at 0)."""
    out = torch.zeros_like(weight)
    block = weight[rows]
    out[rows] = block - block.mean(dim=0, keepdim=True)
    return out


def _ada_norm_bias(linear: torch.nn.Linear, chunks: int, gates: Sequence[int]) -> None:
    """AdaLN projection with constant output: scales and shifts 0, the chunks in `gates` 1."""
    linear.weight.zero_()
    bias = torch.zeros_like(linear.bias).view(chunks, -1)
    for chunk in gates:
        bias[chunk] = 1.0
    linear.bias.copy_(bias.flatten())


def _copy_pattern(config: ToyTransformerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, key, text key) of one copy head, before RMSNorm: the score of a target token for a token at relative
    position (d_index, d_row, d_col) is a^2 cos(1 + d_index) + sum_j b_j^2 (cos(w_j d_row) + cos(w_j d_col)),
    largest (by > 14 over every other token up to 64x64 grids) for the control token at the same row and column."""
    index_dims, row_dims, _ = config.axes_dims_rope
    query = torch.zeros(config.head_dim)
    key = torch.zeros(config.head_dim)
    amplitude = math.sqrt(400.0)
    query[0], query[1] = amplitude * math.cos(1.0), amplitude * math.sin(1.0)  # index axis, frequency 1
    key[0] = amplitude
    for axis_start in (index_dims, index_dims + row_dims):
        for pair, weight in enumerate((200.0, 100.0, 26.0)):  # frequencies 1, 0.215, 0.046 of a 12-dim axis
            query[axis_start + 2 * pair] = key[axis_start + 2 * pair] = math.sqrt(weight)
    text_key = torch.zeros(config.head_dim)
    text_key[:2] = -query[:2]
    scale = COPY_BIAS / query.pow(2).mean().sqrt()
    return query * scale, key * scale, text_key * scale


@torch.no_grad()
def _embedders(transformer: FluxTransformer2DModel, config: ToyTransformerConfig, seed: int) -> None:
    hidden = config.hidden
    x_embedder = transformer.x_embedder
    weight = torch.zeros(hidden, SIGNAL)
    weight[:SIGNAL] = torch.eye(SIGNAL)
    weight[SUM_DIM] = -1.0
    x_embedder.weight.copy_(weight)
    bias = torch.zeros(hidden)
    bias[REFERENCE_DIMS[0]], bias[REFERENCE_DIMS[1]] = REFERENCE, -REFERENCE
    x_embedder.bias.copy_(bias)
    # Text tokens: the reference pair, and a random projection of T5's output into the feature dims.
    generator = torch.Generator().manual_seed(seed + 1)
    context = torch.randn(hidden, config.text_dim, generator=generator) / math.sqrt(config.text_dim)
    transformer.context_embedder.weight.copy_(_zero_mean_columns(context, slice(FEATURE_START, hidden)))
    transformer.context_embedder.bias.copy_(bias)


@torch.no_grad()
def _time_embedding(transformer: FluxTransformer2DModel) -> None:
    """TIME_UNITS ramps silu(alpha (t - c)) of the timestep, in temb dims 0..TIME_UNITS-1 (offset, see module doc)."""
    embed = transformer.time_text_embed
    timestep = embed.timestep_embedder
    # The lowest-frequency sine of the 256 sinusoidal features is ~ proportional to t on [0, 1].
    probe = get_timestep_embedding(torch.tensor([1000.0]), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    sine = 256 - 1
    per_t = float(probe[0, sine])
    centres = torch.logspace(math.log10(T_RANGE[0] * 0.75), 0, TIME_UNITS)
    slopes = 3.0 / centres
    timestep.linear_1.weight.zero_()
    timestep.linear_1.bias.zero_()
    timestep.linear_1.weight[:TIME_UNITS, sine] = slopes / per_t
    timestep.linear_1.bias[:TIME_UNITS] = -slopes * centres
    timestep.linear_2.weight.zero_()
    timestep.linear_2.weight[:TIME_UNITS, :TIME_UNITS] = torch.eye(TIME_UNITS)
    timestep.linear_2.bias.zero_()
    timestep.linear_2.bias[:TIME_UNITS] = TIME_OFFSET
    _zero(embed.guidance_embedder)  # the toy base ignores the guidance value


@torch.no_grad()
def _instruction_detectors(
    transformer: FluxTransformer2DModel, templates: torch.Tensor, template_edit: Sequence[int], edits: int
) -> list[int]:
    """Hidden unit per known phrasing (pooled CLIP vector `templates[i]`), summed into one temb dim per edit.
    Returns the temb dim of each edit."""
    text = transformer.time_text_embed.text_embedder
    hidden = text.linear_1.weight.shape[0]
    if TIME_UNITS + edits > hidden or len(templates) > hidden:
        raise ValueError("the toy transformer is too narrow for its instructions")
    norms = templates.pow(2).sum(dim=1)
    text.linear_1.weight.zero_()
    text.linear_1.bias.zero_()
    text.linear_1.weight[: len(templates)] = MATCH_SHARPNESS * templates / norms[:, None]
    text.linear_1.bias[: len(templates)] = -MATCH_SHARPNESS * MATCH_THRESHOLD
    full_match = torch.nn.functional.silu(torch.tensor(MATCH_SHARPNESS * (1 - MATCH_THRESHOLD)))
    dims = [TIME_UNITS + e for e in range(edits)]
    text.linear_2.weight.zero_()
    text.linear_2.bias.zero_()
    for unit, edit in enumerate(template_edit):
        text.linear_2.weight[dims[edit], unit] = 1.0 / full_match
    return dims


@torch.no_grad()
def _feature_bank(block, config: ToyTransformerConfig, spread: float, seed: int) -> None:
    """Block 0's image MLP: random GELU features of the latent (inputs scaled to unit size), written into the free
    dims with zero-mean output columns."""
    hidden = config.hidden
    generator = torch.Generator().manual_seed(seed + 2)
    first, second = block.ff.net[0].proj, block.ff.net[2]
    inner = first.weight.shape[0]
    weight = torch.zeros(inner, hidden)
    weight[:, :SIGNAL] = torch.randn(inner, SIGNAL, generator=generator) * spread / math.sqrt(SIGNAL)
    first.weight.copy_(weight)
    first.bias.copy_(torch.randn(inner, generator=generator) * 0.5)
    out = torch.randn(hidden, inner, generator=generator) * FEATURE_GAIN / math.sqrt(inner)
    second.weight.copy_(_zero_mean_columns(out, slice(FEATURE_START, hidden)))
    second.bias.zero_()


@torch.no_grad()
def _copy_block(
    block, config: ToyTransformerConfig, edit_maps: Sequence[EditMap], edit_dims: Sequence[int], spread: float
) -> None:
    attention = block.attn
    query, key, text_key = _copy_pattern(config)
    heads = config.heads
    for projection in (attention.to_q, attention.to_k, attention.add_q_proj, attention.add_k_proj):
        projection.weight.zero_()
    attention.to_q.bias.copy_(query.repeat(heads))
    attention.to_k.bias.copy_(key.repeat(heads))
    attention.add_q_proj.bias.zero_()
    attention.add_k_proj.bias.copy_(text_key.repeat(heads))
    for norm in (attention.norm_q, attention.norm_k, attention.norm_added_k):
        norm.weight.fill_(COPY_NORM)
    # Values: the modulated latent dims; output: minus them (and plus their sum in the sum dim).
    hidden = config.hidden
    value = torch.zeros(hidden, hidden)
    value[:SIGNAL, :SIGNAL] = torch.eye(SIGNAL)
    attention.to_v.weight.copy_(value)
    attention.to_v.bias.zero_()
    out = torch.zeros(hidden, hidden)
    out[:SIGNAL, :SIGNAL] = -spread * torch.eye(SIGNAL)
    out[SUM_DIM, :SIGNAL] = spread
    attention.to_out[0].weight.copy_(out)
    attention.to_out[0].bias.zero_()
    _zero(attention.to_add_out, block.ff.net[2], block.ff_context.net[2])
    # AdaLN: gates 1, and per recognised instruction the edit's map as scale (gain - 1) and shift (offset / spread).
    _ada_norm_bias(block.norm1.linear, 6, gates=(2, 5))
    _ada_norm_bias(block.norm1_context.linear, 6, gates=(2, 5))
    full_match = float(torch.nn.functional.silu(torch.tensor(1.0)))
    chunk = block.norm1.linear.weight.view(6, hidden, -1)
    for edit_map, dim in zip(edit_maps, edit_dims, strict=True):
        chunk[0, :SIGNAL, dim] = edit_map.offset / spread / full_match  # shift_msa
        chunk[1, :SIGNAL, dim] = (edit_map.gain - 1) / full_match  # scale_msa


@torch.no_grad()
def _dormant_block(block) -> None:
    """Random attention and MLP inputs, zero outputs, unit gates: contributes 0, trainable by a LoRA."""
    _zero(block.attn.to_out[0], block.attn.to_add_out, block.ff.net[2], block.ff_context.net[2])
    _ada_norm_bias(block.norm1.linear, 6, gates=(2, 5))
    _ada_norm_bias(block.norm1_context.linear, 6, gates=(2, 5))


@torch.no_grad()
def _dormant_single_block(block) -> None:
    _zero(block.proj_out)
    _ada_norm_bias(block.norm.linear, 3, gates=(2,))


@torch.no_grad()
def _read_out(transformer: FluxTransformer2DModel, config: ToyTransformerConfig, spread: float) -> None:
    """norm_out's scale = spread * g(t) - 1 on the latent dims, g ~ 1/t fitted on the actual temb features."""
    t = torch.cat([torch.linspace(T_RANGE[0], 0.05, 600), torch.linspace(0.05, T_RANGE[1], 600)]).double()
    embed = transformer.time_text_embed.double()
    temb = embed(t.float().double() * 1000, torch.zeros_like(t), torch.zeros(len(t), config.text_dim).double())
    transformer.time_text_embed.float()
    features = torch.nn.functional.silu(temb[:, :TIME_UNITS])
    design = torch.cat([features, torch.ones(len(t), 1, dtype=features.dtype)], dim=1) * t[:, None]
    solution = torch.linalg.lstsq(design, torch.ones(len(t), 1, dtype=design.dtype)).solution[:, 0]
    hidden = config.hidden
    linear = transformer.norm_out.linear  # AdaLayerNormContinuous: chunks (scale, shift)
    linear.weight.zero_()
    linear.bias.zero_()
    linear.weight[:SIGNAL, :TIME_UNITS] = spread * solution[:-1].float()
    linear.bias[:SIGNAL] = spread * float(solution[-1]) - 1.0
    readout = torch.zeros(SIGNAL, hidden)
    readout[:, :SIGNAL] = torch.eye(SIGNAL)
    transformer.proj_out.weight.copy_(readout)
    transformer.proj_out.bias.zero_()


def token_spread(config: ToyTransformerConfig, energy: float) -> float:
    """The LayerNorm spread of a token: sqrt(mean square) of [latent, -sum, +R, -R, features] (its mean is 0)."""
    return math.sqrt((2 * REFERENCE**2 + energy) / config.hidden)


def _latent_energy(tokens: torch.Tensor) -> float:
    """Mean squared norm of the latent dims and the sum dim of embedded tokens (B, N, SIGNAL)."""
    return float((tokens.pow(2).sum(-1) + tokens.sum(-1).pow(2)).mean())


@torch.no_grad()
def _feature_energy(transformer: FluxTransformer2DModel, tokens: torch.Tensor) -> float:
    """Mean squared norm of what block 0's MLP writes into the feature dims of embedded tokens."""
    block = transformer.transformer_blocks[0]
    hidden = transformer.x_embedder(tokens)
    return float(block.ff(block.norm2(hidden)).pow(2).sum(-1).mean())


@torch.no_grad()
def build_transformer(
    config: ToyTransformerConfig,
    edit_maps: Sequence[EditMap],
    templates: torch.Tensor,
    template_edit: Sequence[int],
    sample_tokens: torch.Tensor,
    seed: int,
) -> FluxTransformer2DModel:
    """The constructed transformer. `templates`: pooled CLIP vectors of the known instructions, `template_edit`: the
    index in `edit_maps` of each; `sample_tokens`: packed normalised latents of scenes (B, N, 64), to size the
    LayerNorm spread."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config.model_kwargs())
    _embedders(transformer, config, seed)
    _time_embedding(transformer)
    dims = _instruction_detectors(transformer, templates, template_edit, len(edit_maps))
    blocks = transformer.transformer_blocks
    _dormant_block(blocks[0])
    latent_energy = _latent_energy(sample_tokens)
    _feature_bank(blocks[0], config, token_spread(config, latent_energy), seed)
    spread = token_spread(config, latent_energy + _feature_energy(transformer, sample_tokens))
    _copy_block(blocks[1], config, edit_maps, dims, spread)
    for block in blocks[2:]:
        _dormant_block(block)
    for block in transformer.single_transformer_blocks:
        _dormant_single_block(block)
    _read_out(transformer, config, spread)
    return transformer
