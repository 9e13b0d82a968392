"""KWOK fake nodes: GPU nodes labelled as NVIDIA GPU Feature Discovery labels them, and CPU-only nodes.

KWOK (sigs.k8s.io/kwok) keeps the nodes Ready and moves pods bound to them to Running. Pods never finish
on their own here (the stock pod-complete stage is left out on purpose): a test decides how a pod ends by
annotating it with `kwok.kontext-lora.io/exit-code` — `"0"` for Succeeded, anything else for Failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .binaries import binary
from .controlplane import ControlPlane
from .processes import ServerProcess

MANAGED_ANNOTATION = "kwok.x-k8s.io/node"
EXIT_CODE_ANNOTATION = "kwok.kontext-lora.io/exit-code"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class FakeNode:
    name: str
    gpu_product: str | None = None
    gpu_memory_mib: int | None = None
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    extra_labels: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> dict:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            **self.extra_labels,
        }
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": "110"}
        spec: dict = {}
        if self.gpus:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.gpu_product,
                "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
                "nvidia.com/gpu.count": str(self.gpus),
            }
            resources["nvidia.com/gpu"] = str(self.gpus)
            spec["taints"] = [GPU_TAINT]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": {MANAGED_ANNOTATION: "fake"}},
            "spec": spec,
            "status": {"capacity": resources, "allocatable": resources},
        }


# What DESIGN.md and the foundation issue ask for, plus a stock 24 GB RTX 4090 that 48 GB classes must skip.
DEFAULT_NODES = (
    FakeNode("gpu-l40s-0", "NVIDIA-L40S", 46068, gpus=4),
    FakeNode("gpu-l40s-1", "NVIDIA-L40S", 46068, gpus=4),
    FakeNode("gpu-rtx4090-48g-0", "NVIDIA-GeForce-RTX-4090", 49140, gpus=2),
    FakeNode("gpu-rtx4090-48g-1", "NVIDIA-GeForce-RTX-4090", 49140, gpus=2),
    FakeNode("gpu-rtx4090-24g-0", "NVIDIA-GeForce-RTX-4090", 24564, gpus=2),
    FakeNode("cpu-0"),
    FakeNode("cpu-1"),
)

STAGES_DIR = Path(__file__).parent / "kwok-stages"


class Kwok:
    def __init__(self, plane: ControlPlane):
        self.plane = plane
        self.process = ServerProcess(
            "kwok",
            [
                binary("kwok"),
                f"--kubeconfig={plane.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={MANAGED_ANNOTATION}=fake",
                "--node-lease-duration-seconds=40",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.0.0.1",
                f"--config={STAGES_DIR / 'pod-stages.yaml'}",
            ],
            plane.root / "logs",
        )

    def start(self, nodes: tuple[FakeNode, ...] = DEFAULT_NODES, timeout: float = 60) -> Kwok:
        self.process.start()
        self.add_nodes(nodes, timeout)
        return self

    def add_nodes(self, nodes: tuple[FakeNode, ...], timeout: float = 60) -> None:
        manifests = "---\n".join(yaml.safe_dump(node.manifest()) for node in nodes)
        self.plane.kubectl("apply", "--server-side", "-f", "-", input=manifests)
        deadline = time.monotonic() + timeout
        names = [node.name for node in nodes]
        while time.monotonic() < deadline:
            if not self.process.running:
                raise RuntimeError(f"kwok exited:\n{self.process.log_tail()}")
            out = self.plane.kubectl(
                "get",
                "nodes",
                *names,
                "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
                check=False,
            ).stdout.split()
            if out.count("True") == len(names):
                return
            time.sleep(0.3)
        raise TimeoutError(f"KWOK nodes not Ready after {timeout}s:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop()
