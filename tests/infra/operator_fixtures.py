"""pytest fixtures for tests that run the operator: its least-privilege identity, the process, job helpers.

Imported by the conftest.py of tests/cluster and tests/e2e.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster

from .klj import Kljs
from .node_agent import NodeAgent
from .operator_process import OperatorIdentity, OperatorProcess, install_deploy_manifests


@pytest.fixture(scope="session")
def operator_identity(crd: Cluster) -> OperatorIdentity:
    """The operator's ServiceAccount bound to exactly kontext_operator.rbac's rules, plus the admission policy
    and kopf's peering CRDs as the chart installs them."""
    install_deploy_manifests(crd.plane)
    return OperatorIdentity.install(crd.plane)


@pytest.fixture
def start_operator(
    crd: Cluster, operator_identity: OperatorIdentity, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start `kontext-lora operator` processes serving the test's namespace; stopped after the test."""
    started: list[OperatorProcess] = []

    def start(**kwargs) -> OperatorProcess:
        kwargs.setdefault("namespaces", [namespace])
        process = OperatorProcess(
            root=tmp_path, kubeconfig=operator_identity.kubeconfig, name=f"operator-{len(started)}", **kwargs
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
        if process.process and process.process.process and process.process.process.returncode not in (0, None, -9):
            print(f"\n--- {process.name} exited {process.process.process.returncode}:\n{process.log_tail()}")
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for process in started:
            print(f"\n--- {process.name} log ({process.log_path}):\n{process.log_tail(60)}")


@pytest.fixture
def operator(start_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    return start_operator()


@pytest.fixture
def kljs(crd: Cluster, namespace: str) -> Iterator[Kljs]:
    api = crd.api_client()
    try:
        yield Kljs(crd.plane, namespace, api)
    finally:
        api.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the test item, so fixtures can print the operator's log when a test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


KWOK_L40S_NODES = ("gpu-l40s-0", "gpu-l40s-1")
# KWOK's CPU nodes would take preparation pods (which no process runs there): cordoned while a node agent's CPU node
# must get them.
KWOK_CPU_NODES = ("cpu-0", "cpu-1")


@pytest.fixture
def agent_node(crd: Cluster, tmp_path: Path) -> Iterator[NodeAgent]:
    """A node-agent GPU node (L40S labels) that is the only schedulable L40S node while the test runs, and its CPU
    node, the only schedulable CPU node (preparation pods run there).

    The two KWOK L40S nodes match the L40S class as well; they are cordoned (as an admin drains nodes) so the
    real scheduler must pick the agent's node, while the RTX 4090 and 24 GB KWOK nodes stay as decoys that the
    class's affinity has to rule out (and that preparation pods, which tolerate no GPU taint, cannot take). The KWOK
    CPU nodes are cordoned too. All are uncordoned afterwards.
    """
    agent = NodeAgent(crd.plane, tmp_path / "node-agent", name=f"agent-l40s-{uuid.uuid4().hex[:6]}")
    with serving(crd, agent):
        yield agent


@contextlib.contextmanager
def serving(cluster: Cluster, agent: NodeAgent) -> Iterator[NodeAgent]:
    """The agent started, and its nodes the only schedulable L40S and CPU nodes until it stops."""
    agent.start()
    nodes = (*KWOK_L40S_NODES, *KWOK_CPU_NODES)
    cluster.kubectl("cordon", *nodes)
    try:
        yield agent
    finally:
        cluster.kubectl("uncordon", *nodes, check=False)
        agent.stop()
