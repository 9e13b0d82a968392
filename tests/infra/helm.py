"""The real `helm` binary (built from the Go module proxy by tests/cluster/build_binaries.sh) with a private home.

Helm keeps its cache, config and repositories under throw-away folders here, so tests neither read nor write the
user's `~/.config/helm`. `kube_version` is what `helm lint`/`helm template` assume without a cluster: the
version the test control plane runs (a source-built helm otherwise assumes v1.20, below the chart's kubeVersion).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .binaries import REPO, binary, cache_dir

CHART = REPO / "charts" / "kontext-lora"
BUILD_SCRIPT = REPO / "tests" / "cluster" / "build_binaries.sh"


def cluster_kube_version() -> str:
    """The Kubernetes version of the test control plane (the build script's pinned default)."""
    match = re.search(r'KUBERNETES_VERSION="\$\{KUBERNETES_VERSION:-(v[0-9.]+)\}"', BUILD_SCRIPT.read_text())
    assert match, f"no KUBERNETES_VERSION default in {BUILD_SCRIPT}"
    return match[1]


def monitoring_crds() -> list[Path]:
    """The Prometheus operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs (component `monitoring-crds`)."""
    folder = cache_dir() / "crds"
    kinds = ("servicemonitors", "podmonitors", "prometheusrules")
    paths = [folder / f"monitoring.coreos.com_{kind}.yaml" for kind in kinds]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} is missing: run `bash {BUILD_SCRIPT.relative_to(REPO)} monitoring-crds` (or `make test`)"
        )
    return paths


class HelmError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"helm {' '.join(map(str, self.cmd[1:]))} exited {self.returncode}:\n{self.stdout}\n{self.stderr}"


@dataclass
class Helm:
    home: Path
    kubeconfig: Path | None = None
    kube_version: str = ""

    def __post_init__(self) -> None:
        self.kube_version = self.kube_version or cluster_kube_version()

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        if self.kubeconfig:
            env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def run(self, *args: str | Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = [str(binary("helm")), *map(str, args)]
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise HelmError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def values_file(self, values: dict[str, Any] | None, name: str = "values") -> list[str]:
        if not values:
            return []
        path = self.home / f"{name}-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values))
        return ["--values", str(path)]

    def lint(self, values: dict[str, Any] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(
            "lint", CHART, "--strict", "--kube-version", self.kube_version, *self.values_file(values), check=check
        )

    def template_text(
        self,
        values: dict[str, Any] | None = None,
        release: str = "kl",
        namespace: str = "kontext-lora",
        *extra: str,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        return self.run(
            "template",
            release,
            CHART,
            "--namespace",
            namespace,
            "--kube-version",
            self.kube_version,
            *self.values_file(values),
            *extra,
            check=check,
        )

    def template(
        self, values: dict[str, Any] | None = None, release: str = "kl", namespace: str = "kontext-lora", *extra: str
    ) -> list[dict[str, Any]]:
        """The rendered manifests, parsed."""
        text = self.template_text(values, release, namespace, *extra).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one manifest of a kind (and name)."""
    matches = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} {name or ''} in {[m['kind'] for m in manifests]}"
    return matches[0]
