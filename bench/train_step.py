"""CPU training-step benchmark: our `KontextTrainStep` against a plain diffusers-style loop, side by side.

    python -m bench.train_step            # ~7 minutes on 2 cores
    python -m bench.train_step --smoke    # tiny config, seconds (CI)

Both variants train a rank-32 LoRA (the trainer's target modules) on one small `FluxTransformer2DModel` (2 double +
4 single blocks, hidden 128, 16 latent channels as the real VAE has), fp32 on the CPU (bf16 autocast on x86 CPUs
without AMX is several times slower than fp32 and not what anybody trains with), batch 1, a 512² target + 512²
control (1024 + 1024 image tokens) and 64 T5 tokens, gradient checkpointing on. See `bench/flux.py` for the variants.

1. Step time: one step of each, interleaved (A B B A ...), median ± IQR/2, ratio reference/ours.
2. Peak memory: each variant alone in its own subprocess; the peak RSS (VmHWM, reset through /proc/self/clear_refs
   after setup) during its steps, and the RSS before them.
3. Caching: whole training runs on real encoders (a VAE + CLIP + T5 built by `kontext_trainer.model.tiny` at the
   benchmark's sizes) and synthetic PNG pairs. Ours: the trainer's `DatasetEncoder` (text + VAE latents cached on
   disk once, then only the transformer runs); a second run over the same cache (a restarted pod) encodes nothing.
   Reference: the diffusers script without `--cache_latents` (its default): captions encoded once, images
   preprocessed once in memory, the VAE encoding target and control at every step. Epoch 1 includes each side's
   setup (loading the encoders, encoding). The two runs go in lockstep (ours' step i, the reference's step i, ...)
   so that load changes on a shared machine hit both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import flux
from .harness import Sample, console, interleaved, load_average, machine, print_table, ratio, write_result

RANK = 32
RESOLUTION = 512  # the smallest resolution the product trains at: ~1 s a step on 2 idle cores
# The benchmark's model: the tiny model builder's components at a size where a step takes about a second.
BENCH_MODEL: dict[str, Any] = {
    "hidden_heads": 4,
    "head_dim": 32,
    "double_blocks": 2,
    "single_blocks": 4,
    "axes_dims_rope": (8, 12, 12),
    "latent_channels": 16,
    "vae_channels": (32, 64, 128, 128),
    "text_dim": 128,
    "t5_max_length": 64,
}
SMOKE_MODEL: dict[str, Any] = {
    "hidden_heads": 2,
    "head_dim": 16,
    "double_blocks": 1,
    "single_blocks": 1,
    "axes_dims_rope": (4, 6, 6),
    "latent_channels": 16,
    "vae_channels": (8, 8, 16, 16),
    "text_dim": 32,
    "t5_max_length": 16,
}


def transformer_config(model: dict[str, Any]) -> dict[str, Any]:
    """The `FluxTransformer2DModel` config that `kontext_trainer.model.tiny` builds for these sizes."""
    return {
        "patch_size": 1,
        "in_channels": model["latent_channels"] * 4,
        "num_layers": model["double_blocks"],
        "num_single_layers": model["single_blocks"],
        "attention_head_dim": model["head_dim"],
        "num_attention_heads": model["hidden_heads"],
        "joint_attention_dim": model["text_dim"],
        "pooled_projection_dim": model["text_dim"],
        "guidance_embeds": True,
        "axes_dims_rope": model["axes_dims_rope"],
    }


@dataclass
class Options:
    smoke: bool
    model: dict[str, Any]
    resolution: int
    rank: int
    repeats: int
    memory_steps: int
    pairs: int
    epochs: int
    rounds: int
    checkpointing: bool = True

    @property
    def text_tokens(self) -> int:
        return self.model["t5_max_length"]


def quiet() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def make_variants(options: Options, include: tuple[str, ...] = ("ours", "reference"), vae: Any = None):
    from kontext_trainer.train_step import make_accelerator

    from kontext_lora.api.spec import DType

    config = transformer_config(options.model)
    transformer = flux.build_transformer(config, "cpu", torch.float32)
    accelerator = make_accelerator(DType.fp32, 1, cpu=True)
    return flux.build_variants(
        transformer, accelerator, options.rank, torch.float32, options.checkpointing, include=include, vae=vae
    )


# ---- 1. step time -------------------------------------------------------------------------------------------


def bench_steps(options: Options, variants: flux.Variants) -> dict[str, Sample]:
    config = transformer_config(options.model)
    batch = flux.random_batch(config, options.resolution, options.text_tokens, 1, "cpu", torch.float32)
    steps, prepare = flux.step_callables(variants, batch)
    return interleaved(steps, repeats=options.repeats, warmup=2, prepare=prepare)


# ---- 2. memory, one variant per process ----------------------------------------------------------------------


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_alone(options: Options, variant: str) -> dict[str, float]:
    """In this process: build one variant, reset the RSS high-water mark, run its steps, report the peak."""
    variants = make_variants(options, include=(variant,))
    config = transformer_config(options.model)
    batch = flux.random_batch(config, options.resolution, options.text_tokens, 1, "cpu", torch.float32)
    steps, prepare = flux.step_callables(variants, batch)
    prepare[variant]()
    steps[variant]()  # the first step allocates the optimizer state: part of the steady state
    before = _vm_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        source = "VmHWM after reset"
    except OSError:
        source = "ru_maxrss (whole process)"
    began = time.perf_counter()
    for _ in range(options.memory_steps):
        steps[variant]()
    seconds = (time.perf_counter() - began) / options.memory_steps
    peak = _vm_kib("VmHWM") if source.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_before_steps_mib": before / 1024,
        "peak_rss_mib": peak / 1024,
        "step_working_mib": (peak - before) / 1024,
        "adapter_and_optimizer_mib": variants.state_bytes(variant) / 2**20,
        "seconds_per_step_alone": seconds,
        "source": source,  # type: ignore[dict-item]
    }


def bench_memory(options: Options, argv: list[str]) -> dict[str, dict[str, float]]:
    results = {}
    for variant in ("ours", "reference"):
        command = [sys.executable, "-m", "bench.train_step", *argv, "--alone", variant]
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    return results


# ---- 3. caching: epochs of whole runs ------------------------------------------------------------------------


@dataclass
class Corpus:
    model_dir: Path
    pairs: list[Any]  # kontext_trainer.data.dataset.TrainingPair


def make_corpus(options: Options, root: Path) -> Corpus:
    from kontext_trainer.data.dataset import TrainingPair
    from kontext_trainer.data.synthetic import render_pair
    from kontext_trainer.model.tiny import TinyModelConfig, save_tiny_model

    model_dir = save_tiny_model(root / "model", seed=0, config=TinyModelConfig(**options.model))
    pairs = []
    for index in range(options.pairs):
        control, target, caption = render_pair(100 + index, size=options.resolution)
        paths = {}
        for role, image in (("control", control), ("target", target)):
            path = root / "pairs" / role / f"pair-{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            paths[role] = path
        pairs.append(
            TrainingPair(
                stem=f"pair-{index:03d}",
                control_path=paths["control"],
                target_path=paths["target"],
                control_etag=str(paths["control"].stat().st_mtime_ns),
                target_etag=str(paths["target"].stat().st_mtime_ns),
                caption=f"XM, {caption}",
                bucket=(options.resolution, options.resolution),
            )
        )
    return Corpus(model_dir, pairs)


class OursRun:
    """The trainer's path: `DatasetEncoder` (text + VAE latents cached on disk) once, then steps on cached latents."""

    def __init__(self, corpus: Corpus, variants: flux.Variants, cache_dir: Path):
        self.corpus, self.variants, self.cache_dir = corpus, variants, cache_dir
        self.encoded: list[Any] = []
        self.latent_encoder: Any = None

    def _encode(self) -> None:
        from kontext_trainer.encoding import DatasetEncoder

        cpu = torch.device("cpu")
        encoder = DatasetEncoder(self.corpus.model_dir, self.cache_dir, cpu, torch.float32, torch.float32)
        self.encoded, self.latent_encoder = encoder.encode(
            self.corpus.pairs, cache_latents=True, keep_vae=False, show_progress=False
        )

    def setup(self) -> None:
        self._encode()

    def step(self, index: int, seed: int) -> None:
        from kontext_trainer.encoding import batch_inputs

        inputs = batch_inputs([self.encoded[index]], self.latent_encoder)
        self.variants.ours([inputs], [torch.Generator().manual_seed(seed)])

    def restart(self) -> None:
        """What a restarted pod does: the same encoder over the same cache folder."""
        self._encode()


class ReferenceRun:
    """The diffusers script without --cache_latents: captions encoded once, pixels in memory, VAE every step."""

    def __init__(self, corpus: Corpus, variants: flux.Variants):
        self.corpus, self.variants = corpus, variants
        self.texts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pixels: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self) -> None:
        from kontext_trainer.data.images import open_image, to_pixels
        from kontext_trainer.encoding import MAX_SEQUENCE_LENGTH
        from kontext_trainer.model.load import load_text_pipeline, load_vae

        cpu = torch.device("cpu")
        pipeline = load_text_pipeline(self.corpus.model_dir, torch.float32, cpu)
        length = min(MAX_SEQUENCE_LENGTH, pipeline.tokenizer_2.model_max_length)
        with torch.no_grad():
            for pair in self.corpus.pairs:
                self.texts[pair.stem] = pipeline.encode_prompt(
                    prompt=pair.caption, prompt_2=None, device=cpu, max_sequence_length=length
                )
        del pipeline
        self.variants.reference.vae = load_vae(self.corpus.model_dir, torch.float32, cpu)
        self.pixels = [
            (to_pixels(open_image(p.target_path), p.bucket), to_pixels(open_image(p.control_path), p.bucket))
            for p in self.corpus.pairs
        ]

    def step(self, index: int, seed: int) -> None:
        torch.manual_seed(seed)
        embeds, pooled, text_ids = self.texts[self.corpus.pairs[index].stem]
        self.variants.reference(flux.StepBatch(None, None, embeds, pooled, text_ids), self.pixels[index])


def _order(count: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(epoch).shuffle(order)
    return order


def bench_caching(options: Options, variants: flux.Variants, root: Path) -> dict[str, Any]:
    """Whole runs of both, in lockstep: setups alternate, then every step of ours is followed by the same step of
    the reference (order swapped every step), so a change of machine load lands on both sides alike."""
    corpus = make_corpus(options, root)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": []}
    # Untimed warm-up of both setups: first-use costs (imports, tokenizer builds) belong to neither side.
    OursRun(corpus, variants, root / "cache-warm-up").setup()
    ReferenceRun(corpus, variants).setup()
    variants.reference.vae = None
    for round_index in range(options.rounds):
        pair = {
            "ours": OursRun(corpus, variants, root / f"cache-{round_index}"),
            "reference": ReferenceRun(corpus, variants),
        }
        names = ["ours", "reference"] if round_index % 2 == 0 else ["reference", "ours"]
        record: dict[str, dict[str, Any]] = {n: {"encode": 0.0, "epochs": [0.0] * options.epochs} for n in names}
        for name in names:
            variants.activate(name)
            began = time.perf_counter()
            pair[name].setup()
            record[name]["encode"] = time.perf_counter() - began
        step_number = 0
        for epoch in range(options.epochs):
            for index in _order(len(corpus.pairs), epoch):
                order = names if step_number % 2 == 0 else names[::-1]
                for name in order:
                    variants.activate(name)
                    began = time.perf_counter()
                    pair[name].step(index, epoch * 1000 + index)
                    record[name]["epochs"][epoch] += time.perf_counter() - began
                step_number += 1
        began = time.perf_counter()
        pair["ours"].restart()  # type: ignore[attr-defined]
        record["ours"]["restart_encode"] = time.perf_counter() - began
        variants.reference.vae = None
        for name in names:
            runs[name].append(record[name])
    return {"runs": runs, "pairs": options.pairs, "epochs": options.epochs}


def epoch_samples(caching: dict[str, Any]) -> dict[str, list[Sample]]:
    """Per variant: its setup (encoders + encoding), then one Sample per epoch (epoch 1 includes the setup)."""
    table: dict[str, list[Sample]] = {}
    for name, runs in caching["runs"].items():
        what = "encode captions + latents to disk" if name == "ours" else "encode captions, load VAE, decode images"
        samples = [Sample(f"{name}: setup ({what})", [run["encode"] for run in runs])]
        for epoch in range(caching["epochs"]):
            seconds = [run["epochs"][epoch] + (run["encode"] if epoch == 0 else 0.0) for run in runs]
            samples.append(Sample(f"{name} epoch {epoch + 1}" + (" (incl. setup)" if epoch == 0 else ""), seconds))
        if name == "ours":
            samples.append(Sample("ours: restarted run, encode from disk cache", [r["restart_encode"] for r in runs]))
        table[name] = samples
    return table


# ---- main ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny config, few repeats (CI).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed steps per variant (default 12; smoke 2).")
    parser.add_argument("--rounds", type=int, default=None, help="Whole-run rounds for caching (default 3; smoke 1).")
    parser.add_argument("--pairs", type=int, default=None, help="Pairs in the caching runs (default 6; smoke 2).")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs per caching run (default 3; smoke 2).")
    parser.add_argument("--skip-memory", action="store_true", help="Skip the per-variant memory subprocesses.")
    parser.add_argument("--skip-caching", action="store_true", help="Skip the caching runs.")
    parser.add_argument("--alone", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    smoke = args.smoke
    return Options(
        smoke=smoke,
        model=SMOKE_MODEL if smoke else BENCH_MODEL,
        resolution=128 if smoke else RESOLUTION,
        rank=8 if smoke else RANK,
        repeats=args.repeats or (2 if smoke else 12),
        memory_steps=2 if smoke else 4,
        pairs=args.pairs or (2 if smoke else 6),
        epochs=args.epochs or (2 if smoke else 3),
        rounds=args.rounds or (1 if smoke else 3),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    quiet()
    torch.manual_seed(0)
    options = options_from(args)
    if args.alone:
        print(json.dumps(measure_alone(options, args.alone)))
        return 0

    config = transformer_config(options.model)
    console.print(
        f"[bold]CPU training-step benchmark[/] ({'smoke' if options.smoke else 'full'}): {machine()}, "
        f"{torch.get_num_threads()} torch threads, load {load_average()}\n"
        f"transformer {config['num_layers']} double + {config['num_single_layers']} single blocks, hidden "
        f"{config['num_attention_heads'] * config['attention_head_dim']}, "
        f"{flux.parameter_count(config) / 1e6:.2f}M parameters, fp32; LoRA rank {options.rank}; batch 1; "
        f"{options.resolution}² target + control, {options.text_tokens} text tokens; gradient checkpointing on"
    )
    result: dict[str, Any] = {"options": options.__dict__}
    variants = make_variants(options)

    samples = bench_steps(options, variants)
    step_ratio = ratio(samples["reference"], samples["ours"])
    result |= {"steps": samples, "step_ratio": step_ratio}

    if not args.skip_memory:
        memory = bench_memory(options, ["--smoke"] if options.smoke else [])
        result["memory"] = memory
        for name, sample in samples.items():
            sample.extra["peak RSS MiB"] = memory[name]["peak_rss_mib"]
            sample.extra["step +MiB"] = memory[name]["step_working_mib"]
            sample.extra["LoRA+Adam MiB"] = memory[name]["adapter_and_optimizer_mib"]
    print_table(
        "1. seconds per training step (interleaved)",
        list(samples.values()),
        extra_columns=("peak RSS MiB", "step +MiB", "LoRA+Adam MiB") if "memory" in result else (),
    )
    console.print(f"[bold]step-time ratio reference/ours: {step_ratio:.3f}[/] (>1: ours faster)")
    if "memory" in result:
        console.print(
            "memory: each variant alone in a subprocess; peak RSS during its steps (VmHWM reset after setup), "
            "'step +MiB' = that peak minus the RSS before the steps"
        )

    if not args.skip_caching:
        with tempfile.TemporaryDirectory(prefix="kontext-bench-cache-") as scratch:
            caching = bench_caching(options, variants, Path(scratch))
        result["caching"] = caching
        table = epoch_samples(caching)
        rows = [s for name in ("ours", "reference") for s in table[name]]
        print_table(f"3. whole runs, epochs ({options.pairs} pairs, {options.rounds} rounds, steps in lockstep)", rows)
        ours_epochs, reference_epochs = table["ours"][1 : 1 + options.epochs], table["reference"][1:]
        epoch_ratios = {
            f"epoch {e + 1}": reference_epochs[e].median / ours_epochs[e].median for e in range(options.epochs)
        }
        result["epoch_ratios"] = epoch_ratios
        later = statistics.median(ours_epochs[-1].seconds) if options.epochs > 1 else float("nan")
        console.print(
            "[bold]epoch ratios reference/ours:[/] "
            + ", ".join(f"{k} {v:.3f}" for k, v in epoch_ratios.items())
            + f"; ours epoch 1 (with encoding) / epoch {options.epochs}: {ours_epochs[0].median / later:.2f}"
        )
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
