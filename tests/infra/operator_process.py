"""The kontext-lora operator as a real subprocess for tests, running under its least-privilege ServiceAccount.

`OperatorIdentity.install(plane)` creates the operator's ServiceAccount, a ClusterRole with exactly the rules of
`kontext_operator.rbac` and the binding, and writes a kubeconfig with a token from the TokenRequest API (not the
admin certificate), so every test proves those rules suffice. `OperatorProcess` starts `kontext-lora operator`
with that kubeconfig and a config file, waits until its health endpoint answers, and can be stopped, killed
with SIGKILL (restart idempotency, fault injection) and started again.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .controlplane import ControlPlane
from .processes import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
KONTEXT_LORA = REPO / ".venv" / "bin" / "kontext-lora"
DEPLOY = REPO / "deploy"
SYSTEM_NAMESPACE = "kontext-lora-system"
SERVICE_ACCOUNT = "kontext-lora-operator"


@dataclass
class OperatorIdentity:
    kubeconfig: Path

    @classmethod
    def install(cls, plane: ControlPlane) -> OperatorIdentity:
        from kontext_operator.rbac import cluster_role

        plane.kubectl("create", "namespace", SYSTEM_NAMESPACE, check=False)
        role = cluster_role(SERVICE_ACCOUNT)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": SERVICE_ACCOUNT},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": SYSTEM_NAMESPACE}],
        }
        account = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": SYSTEM_NAMESPACE},
        }
        documents = "---\n".join(yaml.safe_dump(doc) for doc in (account, role, binding))
        plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=documents)
        token = plane.kubectl(
            "create", "token", SERVICE_ACCOUNT, "-n", SYSTEM_NAMESPACE, "--duration=24h"
        ).stdout.strip()
        return cls(plane.write_kubeconfig(SERVICE_ACCOUNT, token=token))


def install_deploy_manifests(plane: ControlPlane) -> None:
    """The admission policy and kopf's peering CRDs + the ClusterKopfPeering, as the chart installs them."""
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(DEPLOY / "kopf-peering-crds.yaml"))
    plane.wait_established("clusterkopfpeerings.kopf.dev")
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(DEPLOY / "kopf-peering.yaml"))
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(DEPLOY / "admission-policy.yaml"))


@dataclass
class OperatorProcess:
    """`kontext-lora operator` in a subprocess. `config` is the operator config (the chart's values)."""

    root: Path
    kubeconfig: Path
    namespaces: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    standalone: bool = True
    priority: int | None = None
    peering: str | None = None
    name: str = "operator"
    extra_args: list[str] = field(default_factory=list)
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    process: ServerProcess | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / f"{self.name}.log"

    def argv(self) -> list[str]:
        argv = [str(KONTEXT_LORA), "operator", "--log-format", "full", "--verbose"]
        for namespace in self.namespaces:
            argv += ["--namespace", namespace]
        if self.standalone:
            argv.append("--standalone")
        else:
            argv += ["--peering", self.peering or "kontext-lora"]
            if self.priority is not None:
                argv += ["--priority", str(self.priority)]
        return argv + self.extra_args

    def start(self, timeout: float = 60) -> OperatorProcess:
        config_path = self.root / f"{self.name}-config.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(
            yaml.safe_dump({**self.config, "metricsPort": self.metrics_port, "healthPort": self.health_port})
        )
        env = {
            "KUBECONFIG": str(self.kubeconfig),
            "KONTEXT_LORA_OPERATOR_CONFIG": str(config_path),
            "POD_ID": f"{self.name}-{self.starts}",  # kopf's peering identity
            "PYTHONUNBUFFERED": "1",
        }
        self.process = ServerProcess(self.name, self.argv(), self.root / "logs", env=env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n")
        self.process.start()
        self.starts += 1
        self.process.wait_ready(self.healthy, timeout=timeout, interval=0.1)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizers, no last patches, as when a node dies."""
        if self.process and self.process.running:
            self.process.signal(signal.SIGKILL)
            self.process.process.wait(10)

    def stop(self) -> None:
        if self.process:
            self.process.stop(grace=15)

    def restart(self, timeout: float = 60) -> OperatorProcess:
        self.kill()
        return self.start(timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def metric_value(self, name: str, **labels: str) -> float | None:
        """The value of one sample of the Prometheus text, or None when absent."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            metric, _, label_text = sample.partition("{")
            if metric != name:
                continue
            found = ",".join(sorted(part for part in label_text.rstrip("}").split(",") if part))
            if found == wanted:
                return float(value)
        return None

    def rss_mib(self) -> float:
        """Resident memory of the operator process (MiB)."""
        status = Path(f"/proc/{self.process.process.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return kib / 1024

    def log_tail(self, lines: int = 80) -> str:
        return self.process.log_tail(lines) if self.process else "(not started)"


def kubectl_json(plane: ControlPlane, *args: str) -> Any:
    result = plane.kubectl(*args, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)
