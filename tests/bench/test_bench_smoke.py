"""Every benchmark's smoke mode runs and prints its figures (CI keeps them working). No timing assertions:
benchmarks are measured side by side and reported, not asserted (see docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bench(module: str, tmp_path: Path, *args: str, timeout: float = 600) -> tuple[str, dict]:
    result_path = tmp_path / f"{module}.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    completed = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--smoke", "--json", str(result_path), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output, json.loads(result_path.read_text())


@pytest.mark.slow
def test_train_step_smoke(tmp_path: Path) -> None:
    output, result = run_bench("train_step", tmp_path)
    assert "step-time ratio reference/ours" in output
    assert "epoch ratios reference/ours" in output
    assert result["step_ratio"] > 0
    assert set(result["memory"]) == {"ours", "reference"}
    assert all(m["peak_rss_mib"] > 0 for m in result["memory"].values())
    ours_runs = result["caching"]["runs"]["ours"]
    assert ours_runs and len(ours_runs[0]["epochs"]) == 2


@pytest.mark.slow
def test_gpu_step_smoke(tmp_path: Path) -> None:
    output, result = run_bench("gpu_step", tmp_path)
    assert "ratio reference/ours (step time)" in output
    assert "model FLOPs per step" in output and "expected peak memory" in output
    assert result["ratio"] > 0
    # The FLOP counter on meta agrees with the analytic count of the same config.
    assert result["flops"]["forward"] == pytest.approx(result["flops"]["analytic"], rel=0.1)
    assert result["flops"]["model"] > result["flops"]["forward"]


@pytest.mark.slow
def test_gpu_step_speed_options_smoke(tmp_path: Path) -> None:
    output, result = run_bench("gpu_step", tmp_path, "--speed", "--steps", "1", "--warmup", "1")
    assert "speed options: seconds per training step" in output
    assert set(result["speed"]["ratios"]) == {"eager", "compiled", "flash", "math"}  # + efficient, cudnn on CUDA
    assert all(ratio > 0 for ratio in result["speed"]["ratios"].values())


@pytest.mark.slow
def test_recipe_ablation_smoke(tmp_path: Path) -> None:
    output, result = run_bench("recipe_ablation", tmp_path)
    assert "recipe ablation on the toy base" in output
    assert [row["variant"] for row in result["rows"]] == ["shift", "weighted"]
    assert all(row["mean"] > 0 for row in result["rows"]) and result["base_score"] > 0  # PSNR dB
    assert result["rows"][0]["vs_baseline"] is None and result["rows"][1]["vs_baseline"] is not None


@pytest.mark.slow
def test_gpu_step_smoke_quantized(tmp_path: Path) -> None:
    output, result = run_bench("gpu_step", tmp_path, "--quantize", "int8", "--only", "ours")
    assert "base quantized int8" in output
    assert set(result["samples"]) == {"ours"}


@pytest.mark.s3
@pytest.mark.slow
def test_data_pull_smoke(tmp_path: Path) -> None:
    output, result = run_bench("data_pull", tmp_path)
    assert "ratio reference/ours on loopback" in output
    assert result["loopback"]["ratio"] > 0
    hit = result["loopback"]["cache_hit"]
    assert hit["downloaded"] == 0 and hit["bytes"] == 0 and hit["calls"].get("GetObject", 0) == 0
    assert result["loopback"]["calls"]["ours"].get("HeadObject", 0) == 0
    assert result["latency"]


@pytest.mark.cluster
@pytest.mark.slow
def test_operator_scale_smoke(tmp_path: Path) -> None:
    output, result = run_bench("operator_scale", tmp_path)
    assert "goal p99 < 1 s" in output and "goal RSS < 200 MB" in output
    assert [p["jobs"] for p in result["phases"]] == [5, 20]
    for phase in result["phases"]:
        assert phase["burst_latency"]["n"] == phase["jobs"]
        assert sum(phase["states"].values()) == phase["jobs"]
    assert result["operator_peak_rss_mb"] > 0


@pytest.mark.slow
def test_scaling_smoke(tmp_path: Path) -> None:
    output, result = run_bench("scaling", tmp_path)
    assert "ratio world 2/world 1" in output and "efficiency" in output
    assert set(result["samples_per_second"]) == {"1", "2"} and result["ratio"] > 0
