"""A real Prometheus (Debian's `prometheus` package) on loopback, scraping test processes, queried over its HTTP API.

Targets come from a file_sd file, so a test adds them after start (a trainer's or operator's metrics port) and
Prometheus picks them up within a second. The scrape interval is short (1 s by default) so a training run of a
few seconds leaves enough samples for `rate()` and `histogram_quantile()`.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .binaries import binary
from .processes import ServerProcess, free_port


class PrometheusQueryError(RuntimeError):
    pass


@dataclass
class Series:
    metric: dict[str, str]
    values: list[tuple[float, float]]

    @property
    def finite(self) -> list[float]:
        return [value for _, value in self.values if math.isfinite(value)]


@dataclass
class PrometheusServer:
    root: Path
    scrape_interval: str = "1s"
    port: int = field(default_factory=free_port)
    targets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scrape_seconds(self) -> float:
        return _seconds(self.scrape_interval)

    def _sd_file(self, job: str) -> Path:
        return self.root / "targets" / f"{job}.json"

    def start(self, jobs: tuple[str, ...] = ("trainer", "operator")) -> PrometheusServer:
        """Starts Prometheus with one scrape job per name, each reading its targets from a file_sd file."""
        self.root.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            self.targets.setdefault(job, [])
            self._write_targets(job)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "file_sd_configs": [{"files": [str(self._sd_file(job))], "refresh_interval": "1s"}],
                }
                for job in jobs
            ],
        }
        config_path = self.root / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ServerProcess(
            "prometheus",
            [
                binary("prometheus", system_fallback=True),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            self.root / "logs",
        ).start()
        self.process.wait_ready(lambda: _status(f"{self.url}/-/ready") == 200, timeout=60)
        return self

    def add_target(self, job: str, address: str, **labels: str) -> None:
        self.targets.setdefault(job, []).append({"targets": [address], "labels": labels})
        self._write_targets(job)

    def _write_targets(self, job: str) -> None:
        path = self._sd_file(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.targets[job]))
        tmp.replace(path)  # atomic: Prometheus never reads half a file

    def active_targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets", state="active")["activeTargets"]

    def wait_targets_up(self, job: str, count: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
        """Waits until `count` targets of `job` were scraped successfully; returns them."""
        deadline = time.monotonic() + timeout
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = [t for t in self.active_targets() if t["labels"].get("job") == job]
            up = [t for t in targets if t["health"] == "up"]
            if len(up) >= count:
                return up
            time.sleep(0.5)
        raise TimeoutError(f"{job}: {len(up)}/{count} targets up after {timeout}s: {self.active_targets()}")

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        """Instant query (`/api/v1/query`): one sample per series."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self._get("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return [Series({}, [(float(data["result"][0]), float(data["result"][1]))])]
        return [Series(r["metric"], [(float(r["value"][0]), float(r["value"][1]))]) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """Range query (`/api/v1/query_range`), what a Grafana time-series panel sends."""
        data = self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")
        return [Series(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]

    def label_values(self, label: str, match: str) -> list[str]:
        """What a Grafana `label_values(metric, label)` variable query lists."""
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(duration: str) -> float:
    """A Prometheus duration ("1s", "1m30s", "250ms") in seconds."""
    total, rest = 0.0, duration
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)", duration):
        total += int(number) * _UNITS[unit]
        rest = rest.replace(f"{number}{unit}", "", 1)
    if rest or not total:
        raise ValueError(f"not a duration: {duration!r}")
    return total
