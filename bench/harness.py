"""Side-by-side measurement: ours against a reference, in one run, interleaved, reported as a ratio.

Timing the two variants in alternation (A B A B ...) rather than all of A then all of B keeps slow drifts of
the machine (thermal, other processes, page cache) from landing on one side only. Every benchmark in this
folder reports medians with their spread and the ratio reference/ours, never a lone wall time.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
if not console.is_terminal:  # logs and CI: wide enough that the tables do not wrap
    console.width = 140


@dataclass
class Sample:
    name: str
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Half the interquartile range, as a rough ± on the median."""
        if len(self.seconds) < 4:
            return (max(self.seconds) - min(self.seconds)) / 2
        q = statistics.quantiles(self.seconds, n=4)
        return (q[2] - q[0]) / 2


def interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    prepare: dict[str, Callable[[], object]] | None = None,
    on_result: Callable[[str, object], None] | None = None,
) -> dict[str, Sample]:
    """Run each variant `warmup` times, then `repeats` rounds of one call each, in alternating order.

    `prepare[name]()`, when given, runs untimed right before every call of `name` (switching an adapter, making
    a fresh download folder); `on_result(name, value)` receives what each timed call returned.
    """
    prepare = prepare or {}
    samples = {name: Sample(name) for name in variants}
    for _ in range(warmup):
        for name, fn in variants.items():
            if name in prepare:
                prepare[name]()
            fn()
    names = list(variants)
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else list(reversed(names))
        for name in order:
            if name in prepare:
                prepare[name]()
            began = time.perf_counter()
            value = variants[name]()
            samples[name].seconds.append(time.perf_counter() - began)
            if on_result is not None:
                on_result(name, value)
    return samples


def ratio(reference: Sample, ours: Sample) -> float:
    """How many times faster ours is (>1 = ours faster)."""
    return reference.median / ours.median


def machine() -> str:
    import os

    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews timings; every result records them."""
    import os

    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile by the nearest-rank method (p99 of 100 values is the 99th smallest)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def print_table(title: str, samples: list[Sample], unit: str = "s", extra_columns: tuple[str, ...] = ()) -> None:
    table = Table(title=title)
    table.add_column("variant")
    table.add_column(f"median ({unit})", justify="right")
    table.add_column("± (IQR/2)", justify="right")
    table.add_column("n", justify="right")
    for column in extra_columns:
        table.add_column(column, justify="right")
    for sample in samples:
        row = [sample.name, f"{sample.median:.4f}", f"{sample.spread:.4f}", str(len(sample.seconds))]
        row += [_fmt(sample.extra.get(column)) for column in extra_columns]
        table.add_row(*row)
    console.print(table)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"


def write_result(path: Path | None, payload: dict) -> None:
    """Optionally keep the figures as JSON (for docs/benchmarks.md), with the machine they came from."""
    if path is None:
        return
    payload = {
        "machine": machine(),
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if isinstance(value, Sample):
        return {**asdict(value), "median": value.median, "spread": value.spread}
    return str(value)
