"""Operator scale benchmark: the real operator process on the real control plane with KWOK GPU nodes.

    python -m bench.operator_scale            # 100, then 1,000 more KontextLoRAJobs
    python -m bench.operator_scale --smoke    # 5, then 20 (CI)

Starts etcd + kube-apiserver + controller-manager + scheduler and KWOK's fake nodes (tests/infra), installs the CRD,
the admission policy and the operator's least-privilege identity, and runs `kontext-lora operator` as a subprocess
(tests/infra/operator_process.py; without `--verbose`, as the chart runs it). Then, per phase, in its own namespace:

- burst: N jobs created at once by 8 client threads; latency of each = (its first batch Job's ADDED event) − (its
  KontextLoRAJob's ADDED event), both timestamped on arrival by watches in this process (one clock);
- settle: time from the first create until every job is either scheduled (pod bound to a node: reason Running or
  Starting) or Pending with the scheduler's reason in its status (reason Unschedulable, message "... Insufficient
  nvidia.com/gpu"); the KWOK nodes have 4+4 L40S and 2+2 RTX 4090 48 GB GPUs, so 12 jobs run and the rest wait;
- steady: afterwards, with the phase's jobs present, single jobs applied one at a time (0.3 s apart): the latency a
  user sees on a cluster that already holds that many jobs.

The operator's RSS is sampled every 0.2 s (psutil; peak reported) and its CPU seconds counted per phase. There is no
reference implementation to compare with here: the goals (p99 < 1 s at 100 jobs, RSS < 200 MB at 1,000) are the
yardstick; the control plane, KWOK and the operator share the machine's cores, which the load average records.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import console, load_average, machine, percentile, write_result

GPU_CLASSES = ("L40S-48GB", "RTX4090-48GB")
SCHEDULED_REASONS = ("Running", "Starting")


# ---- watching ------------------------------------------------------------------------------------------------


@dataclass
class Seen:
    added: dict[str, float] = field(default_factory=dict)  # name -> first ADDED arrival (monotonic)
    settled: dict[str, float] = field(default_factory=dict)  # name -> first time its status was settled
    state: dict[str, tuple[str | None, str | None, str | None]] = field(default_factory=dict)  # phase, reason, msg


class Watcher:
    """Watch one kind in one namespace from now on; record arrival times (and settled states for jobs)."""

    def __init__(self, api_client: Any, namespace: str, kind: str):
        self.api = api_client
        self.namespace = namespace
        self.kind = kind
        self.seen = Seen()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)
        self._watch: Any = None

    def _list(self, **kwargs: Any) -> Any:
        from kubernetes import client

        if self.kind == "jobs":
            return client.BatchV1Api(self.api).list_namespaced_job(self.namespace, **kwargs)
        return client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            "kontext-lora.io", "v1alpha1", self.namespace, "kontextlorajobs", **kwargs
        )

    def _run(self) -> None:
        from kubernetes import watch

        listing = self.api.sanitize_for_serialization(self._list())
        version = listing["metadata"]["resourceVersion"]
        self._ready.set()
        while not self._stop.is_set():
            self._watch = watch.Watch()
            try:
                for event in self._watch.stream(self._list, resource_version=version, timeout_seconds=120):
                    now = time.monotonic()
                    body = event["object"]
                    body = body if isinstance(body, dict) else self.api.sanitize_for_serialization(body)
                    version = body["metadata"].get("resourceVersion", version)
                    self._record(event["type"], body, now)
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.2)

    def _record(self, kind: str, body: dict, now: float) -> None:
        name = body["metadata"]["name"]
        with self.lock:
            if kind == "ADDED":
                self.seen.added.setdefault(name, now)
            if self.kind != "jobs":
                status = body.get("status") or {}
                state = (status.get("phase"), status.get("reason"), status.get("message"))
                self.seen.state[name] = state
                if name not in self.seen.settled and settled(*state):
                    self.seen.settled[name] = now

    def start(self) -> Watcher:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"could not list {self.kind} in {self.namespace}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()


# A job's first batch Job, the one the operator makes as soon as it sees the job: its preparation Job (the GPU Job
# `-trainer` follows once the preparation completed; before the preparation phase it was the first).
FIRST_JOB = "-prepare"


def settled(phase: str | None, reason: str | None, message: str | None) -> bool:
    """Scheduled (the pod is bound to a node), or Pending with the scheduler's reason in the status."""
    if phase is None:
        return False
    if phase != "Pending":
        return True
    return reason in SCHEDULED_REASONS or (reason == "Unschedulable" and bool(message))


# ---- operator resources ----------------------------------------------------------------------------------------


class Sampler:
    """RSS and CPU of one process, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.process.memory_info().rss

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- phases ----------------------------------------------------------------------------------------------------


def manifest(name: str, index: int) -> dict[str, Any]:
    from tests.infra.klj import job_manifest

    gpu = GPU_CLASSES[index % len(GPU_CLASSES)]
    return job_manifest(name, resources={"gpu": gpu, "cpu": "1", "memory": "1Gi"})


def create_all(api_client: Any, namespace: str, names: list[str], threads: int = 8) -> float:
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)

    def create(item: tuple[int, str]) -> None:
        index, name = item
        custom.create_namespaced_custom_object(
            "kontext-lora.io", "v1alpha1", namespace, "kontextlorajobs", manifest(name, index)
        )

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(create, enumerate(names)))
    return time.perf_counter() - began


def wait(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def latencies(kljs: Watcher, jobs: Watcher, names: list[str]) -> list[float]:
    with kljs.lock, jobs.lock:
        return [jobs.seen.added[f"{n}{FIRST_JOB}"] - kljs.seen.added[n] for n in names]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


def cluster_cpu(processes: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far of each control-plane process (and KWOK), by name."""
    totals = {}
    for name, process in processes.items():
        try:
            times = process.cpu_times()
            totals[name] = times.user + times.system
        except Exception:  # a process that exited: not counted
            totals[name] = 0.0
    return totals


def run_phase(
    api_client: Any,
    plane: Any,
    namespace: str,
    count: int,
    steady: int,
    sampler: Sampler,
    timeout: float,
    servers: dict[str, Any],
) -> dict[str, Any]:
    from tests.infra.klj import Kljs

    kljs_watch, jobs_watch = Watcher(api_client, namespace, "kontextlorajobs").start(), None
    jobs_watch = Watcher(api_client, namespace, "jobs").start()
    names = [f"scale-{i:04d}" for i in range(count)]
    cpu_before, rss_before, servers_before = sampler.cpu_seconds(), sampler.rss(), cluster_cpu(servers)
    sampler.peak_rss = rss_before
    began = time.monotonic()
    create_seconds = create_all(api_client, namespace, names)
    wait(lambda: all(f"{n}{FIRST_JOB}" in jobs_watch.seen.added for n in names), timeout, f"{count} Jobs")
    all_jobs = time.monotonic() - began
    wait(lambda: all(n in kljs_watch.seen.settled for n in names), timeout, f"{count} jobs to settle", 0.5)
    with kljs_watch.lock:
        settle_seconds = max(kljs_watch.seen.settled[n] for n in names) - began
        states = [kljs_watch.seen.state[n] for n in names]
    burst = summary(latencies(kljs_watch, jobs_watch, names))
    phase_cpu = sampler.cpu_seconds() - cpu_before
    servers_after = cluster_cpu(servers)
    server_cpu = {name: servers_after[name] - servers_before[name] for name in servers}
    phase_peak = sampler.peak_rss

    # Steady state: one job at a time on a cluster that holds the phase's jobs.
    kljs = Kljs(plane, namespace, api_client)
    steady_names = [f"steady-{i:03d}" for i in range(steady)]
    for index, name in enumerate(steady_names):
        kljs.custom.create_namespaced_custom_object(
            "kontext-lora.io", "v1alpha1", namespace, "kontextlorajobs", manifest(name, index)
        )
        wait(lambda name=name: f"{name}{FIRST_JOB}" in jobs_watch.seen.added, 60, f"the Job of {name}", 0.02)
        time.sleep(0.3)
    steady_summary = summary(latencies(kljs_watch, jobs_watch, steady_names)) if steady_names else None
    kljs_watch.stop()
    jobs_watch.stop()
    reasons: dict[str, int] = {}
    for phase, reason, message in states:
        key = f"{phase}/{reason}" + (
            " (Insufficient nvidia.com/gpu)" if message and "Insufficient nvidia.com/gpu" in message else ""
        )
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "namespace": namespace,
        "jobs": count,
        "create_seconds": create_seconds,
        "all_jobs_created_seconds": all_jobs,
        "settle_seconds": settle_seconds,
        "burst_latency": burst,
        "steady_latency": steady_summary,
        "states": reasons,
        "operator_cpu_seconds": phase_cpu,
        "cluster_cpu_seconds": server_cpu,
        "operator_rss_before_mb": rss_before / 1e6,
        "operator_peak_rss_mb": phase_peak / 1e6,
        "operator_rss_after_mb": sampler.rss() / 1e6,
    }


# ---- main ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="5 then 20 jobs (CI).")
    parser.add_argument("--phases", default=None, help="Comma-separated burst sizes (default 100,1000; smoke 5,20).")
    parser.add_argument("--steady", type=int, default=None, help="Single jobs per phase after the burst (20; smoke 3).")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds a phase may take.")
    parser.add_argument("--verbose-operator", action="store_true", help="Run the operator with --verbose.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep logs and data here (default: a temp dir).")
    parser.add_argument(
        "--operator-source",
        type=Path,
        default=None,
        help="Run the operator from another source tree (e.g. `git archive` of an older commit) to compare versions.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kubernetes import config

    from tests.infra.controlplane import ControlPlane
    from tests.infra.kwok import Kwok
    from tests.infra.operator_process import OperatorIdentity, OperatorProcess, install_deploy_manifests

    phases = [int(v) for v in (args.phases or ("5,20" if args.smoke else "100,1000")).split(",")]
    steady = args.steady if args.steady is not None else (3 if args.smoke else 20)
    console.print(f"[bold]operator scale benchmark[/]: {machine()}, load {load_average()}; phases {phases}")
    result: dict[str, Any] = {"phases": []}
    with tempfile.TemporaryDirectory(prefix="kontext-bench-scale-") as scratch:
        root = args.workdir or Path(scratch)
        plane = ControlPlane.start(root / "plane")
        kwok = operator = sampler = None
        try:
            kwok = Kwok(plane).start()
            plane.kubectl(
                "apply", "--server-side", "-f", str(Path(__file__).parents[1] / "crds" / "kontextlorajob.yaml")
            )
            plane.wait_established("kontextlorajobs.kontext-lora.io")
            install_deploy_manifests(plane)
            identity = OperatorIdentity.install(plane)
            namespaces = [f"scale-{i}" for i in range(len(phases))]
            for namespace in namespaces:
                plane.kubectl("create", "namespace", namespace)
                plane.kubectl(
                    "create", "secret", "generic", "s3-credentials", "-n", namespace,
                    "--from-literal=AWS_ACCESS_KEY_ID=x", "--from-literal=AWS_SECRET_ACCESS_KEY=y",
                )  # fmt: skip
            operator = OperatorProcess(root=root / "operator", kubeconfig=identity.kubeconfig, namespaces=namespaces)
            if args.operator_source:
                source = args.operator_source.resolve()
                paths = [source / "operator", source / "trainer", source, os.environ.get("PYTHONPATH", "")]
                os.environ["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths if str(p))
                result["operator_source"] = str(source)
            if not args.verbose_operator:
                operator.argv = _without_verbose(operator.argv)  # type: ignore[method-assign]
            operator.start()
            api = config.new_client_from_config(config_file=str(plane.kubeconfig))
            sampler = Sampler(operator.process.process.pid).start()
            servers = _server_processes([*plane.processes, kwok.process])
            # The first job after start also waits for the apiserver's watch cache of the new CRD: not measured.
            create_all(api, namespaces[0], ["warm-up"])
            wait(lambda: _job_exists(api, namespaces[0], f"warm-up{FIRST_JOB}"), 60, "the warm-up Job")
            result["operator_rss_idle_mb"] = sampler.rss() / 1e6
            for namespace, count in zip(namespaces, phases, strict=True):
                console.print(f"phase: {count} jobs in {namespace} (load {load_average()})")
                phase = run_phase(api, plane, namespace, count, steady, sampler, args.timeout, servers)
                result["phases"].append(phase)
                _print_phase(phase, sum(p["jobs"] + steady for p in result["phases"]) + 1)
            result["operator_peak_rss_mb"] = sampler.peak_rss / 1e6
            result["load_after"] = load_average()
        finally:
            if sampler is not None:
                sampler.stop()
            if operator is not None:
                operator.stop()
            if kwok is not None:
                kwok.stop()
            plane.stop()
    _print_goals(result, phases)
    write_result(args.json, result)
    return 0


def _server_processes(processes: list[Any]) -> dict[str, Any]:
    import psutil

    return {p.name: psutil.Process(p.process.pid) for p in processes if p.process is not None}


def _without_verbose(original):
    def argv() -> list[str]:
        return [a for a in original() if a != "--verbose"]

    return argv


def _job_exists(api: Any, namespace: str, name: str) -> bool:
    from kubernetes import client

    try:
        client.BatchV1Api(api).read_namespaced_job(name, namespace)
        return True
    except client.ApiException:
        return False


def _print_phase(phase: dict[str, Any], total_jobs: int) -> None:
    from rich.table import Table

    table = Table(title=f"{phase['jobs']} KontextLoRAJobs at once (operator knows {total_jobs} jobs afterwards)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    burst, steady = phase["burst_latency"], phase["steady_latency"]
    rows = [
        ("create calls (8 threads)", f"{phase['create_seconds']:.2f} s"),
        ("apply → Job created, burst p50 / p99 / max", _ms(burst)),
        ("apply → Job created, one at a time after the burst p50 / p99 / max", _ms(steady) if steady else "-"),
        ("until every Job exists", f"{phase['all_jobs_created_seconds']:.2f} s"),
        ("until all scheduled or Pending with a reason", f"{phase['settle_seconds']:.2f} s"),
        ("final states", ", ".join(f"{k}: {v}" for k, v in sorted(phase["states"].items()))),
        ("operator CPU until settled", f"{phase['operator_cpu_seconds']:.1f} s"),
        (
            "control plane + KWOK CPU until settled",
            ", ".join(f"{k} {v:.1f}" for k, v in sorted(phase["cluster_cpu_seconds"].items(), key=lambda kv: -kv[1]))
            + " s",
        ),
        (
            "operator RSS before / peak / after",
            f"{phase['operator_rss_before_mb']:.0f} / {phase['operator_peak_rss_mb']:.0f} / "
            f"{phase['operator_rss_after_mb']:.0f} MB",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _ms(values: dict[str, float]) -> str:
    return f"{values['p50'] * 1000:.0f} / {values['p99'] * 1000:.0f} / {values['max'] * 1000:.0f} ms (n={values['n']})"


def _print_goals(result: dict[str, Any], phases: list[int]) -> None:
    first, last = result["phases"][0], result["phases"][-1]
    console.print(
        f"[bold]goal p99 < 1 s at {phases[0]} jobs:[/] burst p99 {first['burst_latency']['p99']:.3f} s, "
        f"one-at-a-time p99 {(first['steady_latency'] or first['burst_latency'])['p99']:.3f} s"
    )
    console.print(
        f"[bold]goal RSS < 200 MB at {sum(phases)} jobs:[/] operator peak RSS {result['operator_peak_rss_mb']:.0f} MB "
        f"(idle after start {result['operator_rss_idle_mb']:.0f} MB); after the last phase "
        f"{last['operator_rss_after_mb']:.0f} MB"
    )


if __name__ == "__main__":
    sys.exit(main())
