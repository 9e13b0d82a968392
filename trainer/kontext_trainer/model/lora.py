"""The LoRA adapter: which projections get one (peft), and the file users load (diffusers' LoRA format).

The file has diffusers/peft key names (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), which
diffusers' `load_lora_weights` and ComfyUI both read. The alpha/rank scale is folded into `lora_B` and the
recorded alpha set to the rank, so every loader applies the trained strength whether or not it reads alpha
(ComfyUI assumes alpha = rank for these keys). Safetensors metadata carries the adapter config diffusers reads
(`lora_adapter_metadata`) and the training facts under `kontext_lora.*` (rank, alpha, step, trigger word...).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import safetensors.torch
import torch
from diffusers import FluxKontextPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from kontext_lora.api.spec import LoraSpec, TargetModules

ADAPTER = "default"
_BLOCKS = r"(single_transformer_blocks|transformer_blocks)\.\d+\."
_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_MLP = r"ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out"
# The AdaLN modulation projections (shift/scale/gate from the timestep + pooled-text embedding): double blocks'
# norm1.linear and norm1_context.linear, single blocks' norm.linear.
_MODULATION = r"norm1\.linear|norm1_context\.linear|norm\.linear"
# peft matches a string target with re.fullmatch against each module name.
TARGET_PATTERNS = {
    TargetModules.default: rf"{_BLOCKS}({_ATTENTION}|{_MLP})",
    TargetModules.attention: rf"{_BLOCKS}{_ATTENTION}",
}


_TARGET_ALTERNATIVES = {TargetModules.default: f"{_ATTENTION}|{_MLP}", TargetModules.attention: _ATTENTION}


def target_pattern(spec: LoraSpec) -> str:
    """The regex of the modules that get an adapter: `targetModules`, plus the modulation projections. Without
    modulation it is the TARGET_PATTERNS string itself (checkpoint fingerprints compare it)."""
    if not spec.modulation:
        return TARGET_PATTERNS[spec.target_modules]
    return rf"{_BLOCKS}({_MODULATION}|{_TARGET_ALTERNATIVES[spec.target_modules]})"


def lora_config(spec: LoraSpec, alpha: int) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=alpha,
        lora_dropout=spec.dropout,
        target_modules=target_pattern(spec),
        init_lora_weights=True,  # A: Kaiming-uniform, B: zeros -> the untrained LoRA changes nothing
    )


def add_lora(transformer: torch.nn.Module, spec: LoraSpec, alpha: int) -> list[torch.nn.Parameter]:
    """Freeze the transformer, inject the adapter, and return its trainable parameters (in float32)."""
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(spec, alpha), adapter_name=ADAPTER)
    cast_training_params(transformer, torch.float32)  # train the adapter in fp32, whatever the base dtype
    # peft casts each adapted layer's input to the adapter's dtype: under bf16/fp16 autocast (the trainer's only way
    # to run a half-precision base) that is an fp32 copy which autocast casts straight back for the matmul — the
    # same values, plus a second half-precision copy saved for backward (0.8 GB at 1024², bench.memory). Off.
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("no transformer module matched the LoRA target modules")
    return parameters


def lora_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's exact weights (peft names without the adapter name), detached copies on the CPU."""
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items()
    }


def restore_lora_weights(transformer: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, weights, adapter_name=ADAPTER)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this model: unexpected {unexpected[:3]}")


def export_lora(
    transformer: torch.nn.Module, path: Path, dtype: torch.dtype, metadata: dict[str, str | int | float | None]
) -> Path:
    """Write the LoRA as a diffusers-format safetensors file at `path` (scale folded in, see module doc)."""
    config: LoraConfig = transformer.peft_config[ADAPTER]
    scale = config.lora_alpha / config.r
    weights = {
        key: (value * scale if scale != 1 and ".lora_B." in key else value).to(dtype).contiguous()
        for key, value in lora_weights(transformer).items()
    }
    adapter = {"r": config.r, "lora_alpha": config.r, "target_modules": config.target_modules}
    extra = {f"kontext_lora.{k}": str(v) for k, v in metadata.items() if v is not None}
    FluxKontextPipeline.save_lora_weights(
        path.parent,
        transformer_lora_layers=weights,
        weight_name=path.name,
        save_function=functools.partial(_save, adapter=adapter, extra=extra),
    )
    return path


def _save(weights: dict[str, torch.Tensor], filename: str, adapter: dict, extra: dict[str, str]) -> None:
    # diffusers only injects the adapter metadata with its default save function; this adds ours beside it.
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in adapter.items()}, sort_keys=True),
        **extra,
    }
    safetensors.torch.save_file(weights, filename, metadata=metadata)


def read_lora_metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
