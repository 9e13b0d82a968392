"""The memory benchmark and the table the admission check reads: the tracker counts what the code allocates, the
benchmark runs on a tiny config, the committed table is not stale, and its interpolation meets measured points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kontext_lora.api import memory, memory_table
from kontext_lora.api.spec import KontextLoRAJobSpec

from .test_bench_smoke import run_bench


def test_the_tracker_counts_live_storages_in_allocator_blocks_and_runs_fused_attention() -> None:
    from bench.meta_memory import meta_gpu

    with meta_gpu() as (tracker, _):
        a = torch.empty(1000, device="meta")  # 4000 bytes: one 4096-byte run of 512-byte blocks
        view = a.view(10, 100)  # a view: no new storage
        b = a * 2
        assert tracker.current == 2 * 4096
        del b
        assert (tracker.current, tracker.peak) == (4096, 8192)
        del a, view
        assert tracker.current == 0
        x = torch.empty(4, 8, device="meta", requires_grad=True)
        w = torch.empty(8, 8, device="meta", requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # CUDA autocast's lists, applied to meta tensors
            assert F.linear(x, w).dtype == torch.bfloat16
            assert F.layer_norm(F.linear(x, w), (8,)).dtype == torch.float32
        assert float(x.sum()) == 0.0  # .item() on meta: 0, so code that logs a loss runs
        q = torch.empty(1, 24, 4096, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
        before = tracker.current
        out = F.scaled_dot_product_attention(q, q, q)
        assert out.grad_fn.name() == "ScaledDotProductFlashAttentionBackward0"
        # output + logsumexp + the RNG seed and offset (one 512-byte block each): no attention scores
        assert tracker.current - before == 24 * 4096 * 128 * 2 + 24 * 4096 * 4 + 2 * 512


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path) -> None:
    output, result = run_bench("memory", tmp_path)
    assert "peak GPU memory of one training step" in output and "checkpoint-time preview" in output
    steps = result["steps"]
    assert len(steps) == 3 and all(s["peak"] > s["static"] > 0 for s in steps)
    with_checkpointing, without, int8 = steps
    assert without["peak"] > with_checkpointing["peak"]
    assert set(with_checkpointing["phases"]) == {"forward", "backward", "optimizer"}
    assert int8["static"] < with_checkpointing["static"]  # int8 base weights
    assert result["previews"][0]["phases"]["preview"] > result["previews"][0]["static"]
    assert result["vae_encode"]["peak"] > result["vae_encode"]["static"]


def test_the_committed_table_is_not_stale() -> None:
    """Re-measure the canary (the smoke config) with today's code and libraries: it must match what the table was
    measured with, else re-run `python -m bench.memory --table`."""
    import tempfile
    from pathlib import Path

    from bench.memory import SMOKE_TEXT_TOKENS, SMOKE_TRANSFORMER, SMOKE_VAE, MetaTrainer
    from bench.memory_table import canary_figures

    with tempfile.TemporaryDirectory() as workdir:
        now = canary_figures(MetaTrainer(SMOKE_TRANSFORMER, SMOKE_VAE, SMOKE_TEXT_TOKENS, Path(workdir)))
    recorded = {k: v for k, v in memory_table.CANARY.items() if k != "case"}
    for key, value in recorded.items():
        assert now[key] == pytest.approx(value, rel=0.02), (
            f"the canary's {key} is {now[key]} bytes today, {value} when kontext_lora/api/memory_table.py was "
            f"measured ({memory_table.MEASURED}): re-run python -m bench.memory --table"
        )


def test_the_table_covers_every_setting_the_spec_allows() -> None:
    from kontext_lora.api.spec import DatasetSpec, TargetModules

    resolutions = DatasetSpec.model_fields["resolution"].annotation.__args__
    assert memory.measured_resolution(256) == 512  # below the smallest measured: bounded by it
    for wanted in resolutions:
        resolution = memory.measured_resolution(wanted)
        assert resolution >= wanted
        assert resolution in memory_table.PREVIEW and resolution in memory_table.VAE_ENCODE
        for checkpointing in (True, False):
            assert (resolution, checkpointing) in memory_table.MATH_EXTRA
            for targets in TargetModules:
                for dropout in (False, True):
                    assert (resolution, checkpointing, targets.value, dropout) in memory_table.STEP


@pytest.mark.parametrize("check", memory_table.CHECKS, ids=lambda c: f"{c['case']['resolution']}-r{c['case']['rank']}")
def test_interpolation_meets_the_measured_points_it_did_not_see(check: dict) -> None:
    case = check["case"]
    spec = KontextLoRAJobSpec.model_validate(
        {
            "dataset": {"uri": "s3://pairs-bucket/x/", "resolution": case["resolution"], "heldOutPairs": 0},
            "output": {"uri": "s3://out-bucket/x/"},
            "lora": {
                "rank": case["rank"],
                "targetModules": case["targets"],
                "modulation": case["modulation"],
                "dropout": case["dropout"],
            },
            "training": {
                "batchSize": case["batch_size"],
                "gradientCheckpointing": case["checkpointing"],
                "attentionBackend": "math" if case["attention"] == "math" else "auto",
            },
        }
    )
    estimate = memory.estimate_peak(spec)
    assert estimate.what == f"the training step at {case['resolution']}²"
    # Peaks are convex in rank and batch: interpolation errs high (never low beyond rounding), and not by much.
    assert check["measured"] * 0.995 <= estimate.bytes <= check["measured"] * 1.06
