"""Peak GPU memory of FLUX.1-Kontext-dev LoRA training, measured without a GPU: the trainer's code, full size, meta.

    python -m bench.memory                  # the table of docs/benchmarks.md §6 (512²/1024², rank 32/128, checkpointing
                                            #   on/off, base bf16/int8/fp8, previews), beside the analytic estimate
    python -m bench.memory --quantized      # only the int8/fp8 bases, checkpointing on (bf16: the --table's figures)
    python -m bench.memory --table          # measure the admission table and write kontext_lora/api/memory_table.py
    python -m bench.memory --smoke          # tiny config, seconds (CI)

The real FLUX.1-Kontext-dev transformer config (19 double + 38 single blocks, hidden 3072: 11.9 B parameters) and
VAE config are built on the meta device, with the trainer's own pieces: `add_lora` (fp32 adapters, the job's target
modules), AdamW through `build_optimizer` (its state as after the first step, the CUDA default `foreach`
implementation), gradient checkpointing, `KontextTrainStep` under an `Accelerator` in bf16, `HeldOutSet.loss` and
`HeldOutSet.preview` (FluxKontextPipeline inference + VAE decode) and `LatentEncoder.encode_pair`. `bench.meta_memory`
counts every storage they allocate, with CUDA autocast's casts and the fused attention kernels a GPU runs.

Per case: `static` = bytes live before the step (base weights, LoRA, AdamW state, the VAE that previews keep on the
GPU), `peak` = the most live at once during one optimizer step (what `torch.cuda.max_memory_allocated` reports),
and the peaks of its phases (forward, backward, optimizer). Inputs: batch B of a square `resolution`² target + the
same-size control + 512 T5 tokens (the pipeline's `max_sequence_length`). Not counted: the CUDA context (~0.5-1 GB,
outside the allocator), allocator fragmentation (reserved - allocated), and buffers CUDA kernels allocate internally
(cuBLAS workspaces, flash attention's backward accumulator: tens of MB) — the 4 GB between the 44 GB budget and a
48 GB card is for them.

`--table` measures the grid the admission check interpolates (kontext_lora/api/memory.py): for every resolution,
checkpointing on/off, target set and LoRA dropout off/on, four corners (rank 8 and 128 x batch 1 and 2, bilinear in
between and linear in batch beyond); the extra cost of `attentionBackend: math` per resolution and checkpointing;
the per-rank bytes the modulation adapters add; previews, the held-out loss and per-step VAE encoding per
resolution; and checks of the interpolation at points it did not measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import flux
from .gpu_step import SMOKE_CONFIG
from .harness import console, load_average, machine, write_result
from .meta_memory import CudaAutocast, LiveStorages, meta_gpu

GIB = 1024**3
GB = 1e9
T5_TOKENS = flux.T5_TOKENS
# FLUX.1-Kontext-dev's vae/config.json (the same as FLUX.1-dev's): 83.8 M parameters.
FULL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
SMOKE_TRANSFORMER: dict[str, Any] = SMOKE_CONFIG  # bench.gpu_step's tiny config
SMOKE_VAE: dict[str, Any] = {
    **FULL_VAE_CONFIG,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
SMOKE_TEXT_TOKENS = 16
# The canary: the smoke config's one case whose figures kontext_lora/api/memory_table.py records, so a test can
# re-measure it in seconds and notice when the code or the libraries changed what training allocates.
CANARY = {"resolution": 128, "rank": 8, "batch_size": 1, "checkpointing": True}
QUANTIZE_EXCLUDE = ["x_embedder", "context_embedder", "time_text_embed*", "norm_out*", "proj_out"]
TABLE_FILE = Path(__file__).resolve().parents[1] / "kontext_lora" / "api" / "memory_table.py"


@dataclass(frozen=True)
class Case:
    resolution: int
    rank: int
    batch_size: int = 1
    checkpointing: bool = True
    targets: str = "default"
    modulation: bool = False
    dropout: float = 0.0
    attention: str = "auto"  # bench.meta_memory: auto (the fused kernels) or math
    base: str = "bf16"  # the frozen base: bf16 (the trainer's default), fp32, or int8 / fp8 (optimum-quanto)
    vae_resident: bool = True  # previews (on by default) keep the VAE on the GPU during training

    @property
    def adapter(self) -> tuple[Any, ...]:
        """What needs a new model and adapter when it changes."""
        return (self.targets, self.modulation, self.rank, self.dropout, self.base)

    def label(self) -> str:
        parts = [f"{self.resolution}²", f"rank {self.rank}", f"batch {self.batch_size}"]
        parts.append("checkpointing" if self.checkpointing else "no checkpointing")
        if self.targets != "default":
            parts.append(f"targets {self.targets}")
        if self.modulation:
            parts.append("modulation")
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        if self.attention != "auto":
            parts.append(f"attention {self.attention}")
        parts.append(f"base {self.base}")
        return ", ".join(parts)


class _OnDevice:
    """The run's `Accelerator` (bf16 autocast, accumulation, clipping) with `device` meta for the code that reads it."""

    def __init__(self, accelerator: Any, device: str, backward: Callable[[torch.Tensor], None]) -> None:
        self._accelerator = accelerator
        self.device = torch.device(device)
        self._backward = backward

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        self._backward(lambda: self._accelerator.backward(loss, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


class MetaTrainer:
    """The trainer's model, adapter, optimizer and VAE on the meta device; rebuilt when a case's adapter changes."""

    def __init__(self, config: dict[str, Any], vae_config: dict[str, Any], text_tokens: int, workdir: Path) -> None:
        self.config = config
        self.vae_config = vae_config
        self.text_tokens = text_tokens
        self.workdir = workdir
        self._adapter: tuple[Any, ...] | None = None
        self.vae = self._build_vae(vae_config)
        self._images = self._write_images(workdir)

    # ---- building ---------------------------------------------------------------------------------------------
    @staticmethod
    def _build_vae(config: dict[str, Any]) -> Any:
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            vae = AutoencoderKL(**config)
        return vae.to(torch.bfloat16).eval().requires_grad_(False)

    @staticmethod
    def _write_images(workdir: Path) -> tuple[Path, Path]:
        from PIL import Image

        paths = (workdir / "control.png", workdir / "target.png")
        for path in paths:
            Image.new("RGB", (64, 64), "grey").save(path)
        return paths

    def _prepare(self, case: Case) -> None:
        if self._adapter == case.adapter:
            return
        from kontext_trainer.model.lora import add_lora
        from kontext_trainer.train_step import build_lr_scheduler, build_optimizer

        from kontext_lora.api.spec import LoraSpec, TrainingSpec

        with torch.device("meta"):
            transformer = flux.FluxTransformer2DModel(**self.config)
        transformer = transformer.to(torch.float32 if case.base == "fp32" else torch.bfloat16).train()
        if case.base in ("int8", "fp8"):
            from optimum.quanto import freeze, qfloat8, qint8, quantize

            quantize(transformer, weights={"fp8": qfloat8, "int8": qint8}[case.base], exclude=QUANTIZE_EXCLUDE)
            freeze(transformer)
        lora = LoraSpec(rank=case.rank, target_modules=case.targets, modulation=case.modulation, dropout=case.dropout)
        self.parameters = add_lora(transformer, lora, case.rank)
        spec = TrainingSpec(steps=10)
        self.optimizer = build_optimizer(self.parameters, spec)
        for group in self.optimizer.param_groups:
            group["foreach"] = True  # what torch.optim picks for CUDA tensors (meta would get the per-tensor loop)
        for parameter in self.parameters:  # AdamW's state as after the first step
            parameter.grad = torch.zeros_like(parameter)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, spec, 10)
        self.transformer = transformer
        self._adapter = case.adapter

    def _tracker_with_state(self, tracker: LiveStorages, case: Case) -> None:
        """Count what is resident between steps: model, adapter, optimizer state, the VAE when previews keep it."""
        tracker.track_module(self.transformer)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    tracker.track(value)
        if case.vae_resident:
            tracker.track_module(self.vae)

    def _inputs(self, case: Case) -> Any:
        batch = flux.random_batch(
            self.config, case.resolution, self.text_tokens, case.batch_size, "meta", torch.bfloat16
        )
        inputs = batch.packed()
        # As the latent cache holds them: float32 latents and embeddings, moved and cast per step.
        return dataclasses.replace(
            inputs,
            target=inputs.target.float(),
            control=inputs.control.float(),
            prompt_embeds=inputs.prompt_embeds.float(),
            pooled_prompt_embeds=inputs.pooled_prompt_embeds.float(),
        )

    def _encoded_pair(self, case: Case) -> Any:
        from kontext_trainer.data.dataset import TrainingPair
        from kontext_trainer.encoding import EncodedPair, TextEmbedding

        inputs = self._inputs(dataclasses.replace(case, batch_size=1))
        pair = TrainingPair(
            stem="bench",
            control_path=self._images[0],
            target_path=self._images[1],
            control_etag="",
            target_etag="",
            caption="bench",
            bucket=(case.resolution, case.resolution),
        )
        side = case.resolution // flux.VAE_SCALE
        text = TextEmbedding(inputs.prompt_embeds, inputs.pooled_prompt_embeds)
        return EncodedPair(pair, text, (side, side), inputs.target, inputs.control)

    @contextmanager
    def _session(self, case: Case) -> Iterator[tuple[LiveStorages, Any]]:
        from kontext_trainer.train_step import make_accelerator

        from kontext_lora.api.spec import DType

        self._prepare(case)
        warnings.filterwarnings("ignore")
        accelerator = make_accelerator(DType.fp32 if case.base == "fp32" else DType.bf16, 1, cpu=True)
        with meta_gpu(case.attention) as (tracker, autocast):
            self._checkpointing(case, autocast)
            self._tracker_with_state(tracker, case)
            tracker.reset_peak()

            def backward(run: Callable[[], None]) -> None:
                with tracker.phase("backward"):
                    run()

            yield tracker, _OnDevice(accelerator, "meta", backward)

    def _checkpointing(self, case: Case, autocast: CudaAutocast) -> None:
        if case.checkpointing:
            self.transformer.enable_gradient_checkpointing(
                gradient_checkpointing_func=autocast.gradient_checkpointing_func()
            )
        else:
            self.transformer.disable_gradient_checkpointing()

    # ---- measuring --------------------------------------------------------------------------------------------
    def train_step(self, case: Case) -> dict[str, Any]:
        """One optimizer step of `KontextTrainStep` (the second of the run: AdamW's state exists)."""
        from kontext_trainer.train_step import KontextTrainStep

        with self._session(case) as (tracker, accelerator):
            step = KontextTrainStep(self.transformer, self.parameters, self.optimizer, self.lr_scheduler, accelerator)
            forward, optimizer_step = step.micro_batch_loss, self.optimizer.step

            def phased_forward(*args: Any) -> torch.Tensor:
                with tracker.phase("forward"):
                    return forward(*args)

            def phased_step(*args: Any, **kwargs: Any) -> Any:
                with tracker.phase("optimizer"):
                    return optimizer_step(*args, **kwargs)

            step.micro_batch_loss = phased_forward  # type: ignore[method-assign]
            self.optimizer.step = phased_step  # type: ignore[method-assign]
            static = tracker.current
            began = time.perf_counter()
            try:
                step([self._inputs(case)], [torch.Generator().manual_seed(1)])
            finally:
                self.optimizer.step = optimizer_step  # type: ignore[method-assign]
            return {
                "static": static,
                "peak": tracker.peak,
                "phases": dict(tracker.phase_peaks),
                "seconds": time.perf_counter() - began,
            }

    def held_out(self, case: Case, preview_steps: int = 2) -> dict[str, Any]:
        """The checkpoint's held-out loss (batch 1, no grad) and edits (FluxKontextPipeline + VAE decode: the edit score
        and the preview grid's images; the base model's edits, adapters disabled, cost the same)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from kontext_trainer.model.tiny import kontext_dev_scheduler
        from kontext_trainer.validation import HeldOutSet

        from kontext_lora.api.spec import TimestepSampling

        with self._session(case) as (tracker, accelerator):
            static = tracker.current
            held = HeldOutSet([self._encoded_pair(case)], None, TimestepSampling.shift, 3.0, seed=0, timesteps=1)
            with tracker.phase("validation"):
                held.loss(self.transformer, accelerator, 1.0)
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(kontext_dev_scheduler().config)
            with tracker.phase("preview"):
                held.edits(self.transformer, self.vae, scheduler, accelerator, preview_steps, seed=0)
            return {"static": static, "peak": tracker.peak, "phases": dict(tracker.phase_peaks)}

    def vae_encode(self, case: Case) -> dict[str, Any]:
        """What `cacheLatents: false` adds before each step: the VAE encoding one pair (target and control)."""
        from kontext_trainer.encoding import LatentEncoder

        pair = self._encoded_pair(case).pair
        with self._session(case) as (tracker, _):
            static = tracker.current
            with tracker.phase("vae_encode"):
                LatentEncoder(self.vae).encode_pair(pair)
            return {"static": static, "peak": tracker.peak, "phases": dict(tracker.phase_peaks)}


def analytic(case: Case, config: dict[str, Any]) -> float:
    """bench.gpu_step's analytic estimate (bytes) for the same setup: the figure this benchmark replaces."""
    from .gpu_step import Setup, memory_estimate

    c, meta = case, torch.device("meta")
    setup = Setup(config, c.resolution, T5_TOKENS, c.rank, c.batch_size, c.checkpointing, meta, torch.bfloat16)
    return memory_estimate(setup, case.base if case.base in ("int8", "fp8") else None)["ours"]["total"]


# ---- the table ------------------------------------------------------------------------------------------


def report_cases(quantized_only: bool = False) -> list[Case]:
    """512²/1024² x rank 32/128 x checkpointing on/off x base bf16/int8/fp8; `quantized_only`: int8 and fp8 with
    checkpointing, 1024² first (the bf16 figures are the admission table's; without checkpointing no 1024² job fits
    48 GB whatever the base)."""
    if quantized_only:
        return [Case(r, rank, base=base) for r in (1024, 512) for rank in (32, 128) for base in ("int8", "fp8")]
    cases = []
    for base in ("bf16", "int8", "fp8"):
        for resolution in (512, 1024):
            for rank in (32, 128):
                for checkpointing in (True, False):
                    cases.append(Case(resolution, rank, checkpointing=checkpointing, base=base))
    return cases


def run_report(trainer: MetaTrainer, config: dict[str, Any], cases: list[Case], previews: list[Case]) -> dict[str, Any]:
    rows = []
    for case in cases:
        measured = trainer.train_step(case)
        rows.append({"case": dataclasses.asdict(case), **measured, "analytic": analytic(case, config)})
        console.print(
            f"{case.label()}: peak {measured['peak'] / GB:.2f} GB (static {measured['static'] / GB:.2f}; "
            f"{measured['seconds']:.0f} s)"
        )
    preview_rows = []
    for case in previews:
        measured = trainer.held_out(case)
        preview_rows.append({"case": dataclasses.asdict(case), **measured})
        console.print(f"{case.label()}: preview peak {measured['peak'] / GB:.2f} GB")
    return {"steps": rows, "previews": preview_rows}


def print_report(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="peak GPU memory of one training step (GB = 1e9 bytes), measured on meta vs analytic")
    for column in ("resolution", "rank", "checkpointing", "base", "static", "peak", "analytic", "measured/analytic"):
        table.add_column(column, justify="right")
    for row in result["steps"]:
        case = row["case"]
        table.add_row(
            f"{case['resolution']}²",
            str(case["rank"]),
            "on" if case["checkpointing"] else "off",
            case["base"],
            f"{row['static'] / GB:.2f}",
            f"{row['peak'] / GB:.2f}" + (" OVER" if row["peak"] > 44 * GB else ""),
            f"{row['analytic'] / GB:.2f}",
            f"{row['peak'] / row['analytic']:.2f}",
        )
    console.print(table)
    for row in result["previews"]:
        case = row["case"]
        console.print(
            f"checkpoint-time preview at {case['resolution']}², rank {case['rank']}: peak {row['peak'] / GB:.2f} GB "
            f"(held-out loss {row['phases'].get('validation', 0) / GB:.2f} GB; resident {row['static'] / GB:.2f} GB)"
        )


# ---- main -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny config, seconds (CI).")
    parser.add_argument("--table", action="store_true", help="Measure the admission table and write it.")
    parser.add_argument(
        "--quantized", action="store_true", help="Only the int8/fp8 bases with checkpointing, no previews."
    )
    parser.add_argument("--dry-run", action="store_true", help="With --table: the tiny config, nothing written.")
    parser.add_argument("--reuse", type=Path, default=None, help="With --table: an earlier --json's steps.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    began = time.perf_counter()
    console.print(f"[bold]memory benchmark[/] on the meta device; {machine()}; load {load_average()}")
    with tempfile.TemporaryDirectory() as workdir:
        if args.smoke:
            trainer = MetaTrainer(SMOKE_TRANSFORMER, SMOKE_VAE, SMOKE_TEXT_TOKENS, Path(workdir))
            cases = [Case(**CANARY), Case(**{**CANARY, "checkpointing": False}), Case(**CANARY, base="int8")]
            result = run_report(trainer, SMOKE_TRANSFORMER, cases, [Case(**CANARY)])
            result["vae_encode"] = trainer.vae_encode(Case(**CANARY))
        elif args.table:
            from .memory_table import measure_table, write_table

            reuse = json.loads(args.reuse.read_text())["RUNS"] if args.reuse else None
            result = measure_table(Path(workdir), smoke=args.dry_run, reuse=reuse)
            if not args.dry_run:
                write_table(result, TABLE_FILE)
                console.print(f"wrote {TABLE_FILE}")
        else:
            trainer = MetaTrainer(flux.FULL_CONFIG, FULL_VAE_CONFIG, T5_TOKENS, Path(workdir))
            previews = [] if args.quantized else [Case(r, rank) for r in (512, 1024) for rank in (32, 128)]
            result = run_report(trainer, flux.FULL_CONFIG, report_cases(args.quantized), previews)
    if not args.table:
        print_report(result)
    result["seconds"] = time.perf_counter() - began
    result["load"] = load_average()
    console.print(f"done in {result['seconds']:.0f} s; load {load_average()}")
    write_result(args.json, _string_keys(result))
    return 0


def _string_keys(value: Any) -> Any:
    """JSON wants string keys: the table's are tuples such as (1024, True, 'default', False)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_string_keys(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
