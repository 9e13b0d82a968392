"""Data-pull benchmark: the trainer's S3 downloader against sequential boto3 `get_object`, from MinIO on loopback.

    python -m bench.data_pull                 # 60 pairs of 1024² PNGs (+ captions), ~215 MB
    python -m bench.data_pull --smoke         # 4 small pairs (CI)

The dataset is generated deterministically (the demo's synthetic scenes at 1024², with film-grain noise so PNG
compression lands at ~1.8 MB an image) and cached under ~/.cache/kontext-lora/bench/; it is uploaded to a fresh
MinIO (tests/infra/minio.py) and pulled, per round, into a fresh folder by

- ours: `S3Storage.list()` + `S3Storage.fetch()` — exactly what the trainer's dataset stage does (boto3 transfer
  manager, 8 concurrent transfers, ETag manifest);
- reference: `list_objects_v2` then one `get_object` after another, each body written to its file.

Rounds alternate the two (fresh folders each time), medians ± IQR/2, ratio reference/ours. Then a second run of
ours over a complete local cache must download nothing (0 GetObject, 0 bytes; asserted). Finally the same
comparison through a latency-injecting proxy (`bench/latency_proxy.py`, an emulated RTT; labelled as such), the
regime of a real object store that is tens of milliseconds away instead of 0.05 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import Sample, console, interleaved, load_average, machine, print_table, ratio, write_result

PREFIX = "pairs/"
GRAIN_SIGMA = 4.0  # film-grain noise: makes PNGs compress like photographs (~1.8 MB at 1024²)


@dataclass(frozen=True)
class DatasetShape:
    pairs: int
    size: int

    @property
    def key(self) -> str:
        return f"pull-v1-{self.pairs}x{self.size}-grain{GRAIN_SIGMA:g}"


def dataset_cache() -> Path:
    from tests.infra.binaries import cache_dir

    return cache_dir() / "bench"


def generate_dataset(shape: DatasetShape) -> Path:
    """`control/pair-NNN.png`, `target/pair-NNN.png` + `.txt` captions; made once, bit-identical every time."""
    root = dataset_cache() / shape.key
    if (root / "COMPLETE").is_file():
        return root
    import numpy as np
    from kontext_trainer.data.synthetic import render_pair
    from PIL import Image

    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)

    def write(index: int) -> None:
        control, target, caption = render_pair(5000 + index, size=shape.size)
        rng = np.random.default_rng(index)
        for role, image in (("control", control), ("target", target)):
            pixels = np.asarray(image, dtype=np.float32)
            pixels = pixels + rng.normal(0.0, GRAIN_SIGMA, pixels.shape).astype(np.float32)
            path = partial / role / f"pair-{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path)
        (partial / "target" / f"pair-{index:03d}.txt").write_text(caption + "\n")

    console.print(f"generating {shape.pairs} pairs of {shape.size}² PNGs into {root} (once)")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(write, range(shape.pairs)))
    (partial / "COMPLETE").write_text("")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def dataset_files(root: Path) -> list[tuple[Path, str]]:
    return sorted(
        (path, PREFIX + path.relative_to(root).as_posix())
        for path in root.rglob("*")
        if path.is_file() and path.name != "COMPLETE"
    )


# ---- counting what goes over the wire ------------------------------------------------------------------------


@dataclass
class WireCounter:
    """API calls by operation and GetObject body bytes, from botocore's event hooks on one client."""

    calls: Counter = field(default_factory=Counter)
    get_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.s3", self._before)
        client.meta.events.register("after-call.s3.GetObject", self._after_get)

    def _before(self, model: Any, **_: Any) -> None:
        with self.lock:
            self.calls[model.name] += 1

    def _after_get(self, parsed: dict, **_: Any) -> None:
        with self.lock:
            self.get_bytes += int(parsed.get("ContentLength") or 0)


# ---- the two downloaders -------------------------------------------------------------------------------------


@dataclass
class Target:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str

    @contextmanager
    def environment(self) -> Iterator[None]:
        """The environment a trainer pod gets (credentials Secret + endpoint), for S3Storage's boto3 session."""
        values = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def ours(target: Target, destination: Path, counter: WireCounter | None = None) -> dict[str, int]:
    from kontext_trainer.storage import Location, S3Settings, S3Storage

    from kontext_lora.api.spec import StorageSpec

    settings = S3Settings.from_spec(StorageSpec(endpoint=target.endpoint, region=target.region))
    storage = S3Storage(Location.parse(f"s3://{target.bucket}/{PREFIX}"), settings)
    if counter is not None:
        counter.attach(storage.client)
    keys = [o.key for o in storage.list()]
    storage.fetch(keys, destination)
    return {"downloaded": storage.last_fetch.downloaded, "reused": storage.last_fetch.reused}


def reference(target: Target, destination: Path, counter: WireCounter | None = None) -> dict[str, int]:
    import boto3
    from botocore.config import Config

    # A fresh session, as in a new process (ours builds one per S3Storage too): no warm model cache on either side.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=target.endpoint,
        region_name=target.region,
        aws_access_key_id=target.access_key,
        aws_secret_access_key=target.secret_key,
        config=Config(s3={"addressing_style": "path"}),
    )
    if counter is not None:
        counter.attach(client)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=PREFIX):
        keys += [item["Key"] for item in page.get("Contents", [])]
    for key in keys:
        path = destination / key[len(PREFIX) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=target.bucket, Key=key)["Body"]
        with path.open("wb") as handle:
            for chunk in body.iter_chunks(1024 * 1024):
                handle.write(chunk)
    return {"downloaded": len(keys), "reused": 0}


def compare(target: Target, scratch: Path, rounds: int, label: str, server_pid: int | None = None) -> dict[str, Any]:
    """Interleaved rounds, a fresh folder per call; returns samples, ratio and one round's wire counts.

    Besides wall time, each call's CPU seconds in this process (the client) and in the MinIO server are kept:
    on a 2-core machine they explain where a parallel download's time goes.
    """
    import psutil

    server = psutil.Process(server_pid) if server_pid else None
    cpu: dict[str, dict[str, list[float]]] = {n: {"client": [], "server": []} for n in ("ours", "reference")}
    folders: dict[str, Path] = {}
    counters = {"ours": WireCounter(), "reference": WireCounter()}
    first = {"ours": True, "reference": True}

    def fresh(name: str) -> Callable[[], None]:
        def prepare() -> None:
            if name in folders:
                shutil.rmtree(folders[name], ignore_errors=True)
            folders[name] = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))

        return prepare

    def run(name: str, fn: Callable[..., dict[str, int]]) -> Callable[[], dict[str, int]]:
        def call() -> dict[str, int]:
            counter = counters[name] if first[name] else None  # count one round's traffic
            first[name] = False
            client_cpu, server_cpu = time.process_time(), _cpu(server)
            stats = fn(target, folders[name], counter)
            cpu[name]["client"].append(time.process_time() - client_cpu)
            cpu[name]["server"].append(_cpu(server) - server_cpu)
            return stats

        return call

    with target.environment():
        samples = interleaved(
            {"ours": run("ours", ours), "reference": run("reference", reference)},
            repeats=rounds,
            warmup=0,
            prepare={"ours": fresh("ours"), "reference": fresh("reference")},
        )
        cached = _cache_hit_run(target, folders["ours"])
    for name, sample in samples.items():
        sample.name = f"{name} ({label})"
        sample.extra["client CPU s"] = statistics.median(cpu[name]["client"])
        if server is not None:
            sample.extra["MinIO CPU s"] = statistics.median(cpu[name]["server"])
    return {
        "samples": samples,
        "ratio": ratio(samples["reference"], samples["ours"]),
        "calls": {name: dict(c.calls) for name, c in counters.items()},
        "bytes": {name: c.get_bytes for name, c in counters.items()},
        "cache_hit": cached,
    }


def _cpu(process: Any) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def _cache_hit_run(target: Target, folder: Path) -> dict[str, Any]:
    """Ours again over the complete folder the last round left: it must download nothing."""
    counter = WireCounter()
    began = time.perf_counter()
    stats = ours(target, folder, counter)
    seconds = time.perf_counter() - began
    if stats["downloaded"] != 0 or counter.calls.get("GetObject", 0) != 0 or counter.get_bytes != 0:
        raise AssertionError(f"a complete local cache was downloaded again: {stats}, {dict(counter.calls)}")
    return {"seconds": seconds, "calls": dict(counter.calls), "bytes": counter.get_bytes, **stats}


# ---- servers -------------------------------------------------------------------------------------------------


@contextmanager
def proxied(endpoint: str, delay: float) -> Iterator[str]:
    """`endpoint` seen through bench.latency_proxy in a subprocess (one-way `delay` seconds each way)."""
    host_port = endpoint.removeprefix("http://")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.latency_proxy", host_port, str(delay)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        port = int(process.stdout.readline().strip())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def upload(minio: Any, bucket: str, files: list[tuple[Path, str]]) -> None:
    client = minio.client()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: client.upload_file(str(item[0]), bucket, item[1]), files))


# ---- main ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.data_pull", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 small pairs, 2 rounds (CI).")
    parser.add_argument("--pairs", type=int, default=None, help="Pairs (default 60; smoke 4).")
    parser.add_argument("--size", type=int, default=None, help="Image side in pixels (default 1024; smoke 256).")
    parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds on loopback (default 7).")
    parser.add_argument(
        "--latency-ms", default=None, help="Emulated RTTs for the WAN part, comma-separated (20,50; 0: skip)."
    )
    parser.add_argument("--latency-rounds", type=int, default=None, help="Rounds through the proxy (default 3).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tests.infra.minio import MinioServer

    shape = DatasetShape(args.pairs or (4 if args.smoke else 60), args.size or (256 if args.smoke else 1024))
    rounds = args.rounds or (2 if args.smoke else 7)
    latencies = [float(v) for v in (args.latency_ms or ("10" if args.smoke else "20,50")).split(",") if float(v) > 0]
    latency_rounds = args.latency_rounds or (1 if args.smoke else 3)
    root = generate_dataset(shape)
    files = dataset_files(root)
    total_bytes = sum(path.stat().st_size for path, _ in files)
    images = [p for p, _ in files if p.suffix == ".png"]
    console.print(
        f"[bold]data-pull benchmark[/]: {machine()}, load {load_average()}\n"
        f"{shape.pairs} pairs of {shape.size}² PNGs + captions: {len(files)} objects, {total_bytes / 1e6:.1f} MB "
        f"({sum(p.stat().st_size for p in images) / len(images) / 1e6:.2f} MB per image)"
    )
    result: dict[str, Any] = {
        "pairs": shape.pairs,
        "size": shape.size,
        "objects": len(files),
        "bytes": total_bytes,
    }
    minio = MinioServer().start()
    try:
        bucket = minio.create_bucket("bench-pull")
        upload(minio, bucket, files)
        with tempfile.TemporaryDirectory(prefix="kontext-bench-pull-") as scratch:
            target = Target(minio.endpoint, bucket, minio.access_key, minio.secret_key, minio.region)
            pid = minio.process.process.pid
            result["loopback"] = compare(target, Path(scratch), rounds, "loopback", pid)
            result["latency"] = {}
            for latency_ms in latencies:
                with proxied(minio.endpoint, latency_ms / 2000) as endpoint:
                    slow = Target(endpoint, bucket, minio.access_key, minio.secret_key, minio.region)
                    label = f"+{latency_ms:g} ms RTT"
                    result["latency"][label] = compare(slow, Path(scratch), latency_rounds, label, pid)
    finally:
        minio.cleanup()

    parts = [result["loopback"], *result["latency"].values()]
    rows: list[Sample] = []
    for part in parts:
        for sample in part["samples"].values():
            sample.extra["MB/s"] = total_bytes / sample.median / 1e6
            rows.append(sample)
    print_table(
        "seconds to pull the dataset (interleaved, fresh folder per run)",
        rows,
        extra_columns=("MB/s", "client CPU s", "MinIO CPU s"),
    )
    console.print(f"[bold]ratio reference/ours on loopback: {result['loopback']['ratio']:.2f}x[/]")
    for label, part in result["latency"].items():
        console.print(f"[bold]ratio reference/ours with an emulated {label[1:]} (proxy): {part['ratio']:.2f}x[/]")
    part = result["loopback"]
    console.print(f"requests per pull: ours {part['calls']['ours']}, reference {part['calls']['reference']}")
    hit = result["loopback"]["cache_hit"]
    console.print(
        f"second run over a complete local cache: {hit['downloaded']} objects / {hit['bytes']} bytes downloaded, "
        f"{hit['reused']} reused, requests {hit['calls']}, {hit['seconds']:.3f} s"
    )
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
