"""Less API work per job under bursts (bench/operator_scale.py): no status write before kopf has taken a new job
on, and status syncs of one job coalesced while one of them is waiting for the job's lock."""

from __future__ import annotations

import asyncio

from kontext_operator.handlers import FINALIZER, awaiting_creation
from kontext_operator.metrics import JobPhases
from kontext_operator.reconciler import Reconciler

from kontext_lora.api.operator_config import OperatorConfig


def test_new_jobs_wait_for_kopf_before_any_status_write() -> None:
    assert awaiting_creation({"metadata": {"name": "a"}})
    assert awaiting_creation({"metadata": {"name": "a", "finalizers": ["other.io/x"]}})
    assert not awaiting_creation({"metadata": {"name": "a", "finalizers": [FINALIZER]}})
    # Being deleted before kopf ever took it on: the status is not written either way (sync returns early).
    assert not awaiting_creation({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}})


def test_syncs_of_one_job_coalesce_while_one_waits() -> None:
    reconciler = Reconciler(OperatorConfig(), kube=None, phases=JobPhases())  # type: ignore[arg-type]
    calls: list[tuple[str, str]] = []
    release = asyncio.Event()

    async def fake_sync(key: tuple[str, str]) -> None:
        calls.append(key)
        await release.wait()

    reconciler._sync = fake_sync  # type: ignore[method-assign]

    async def scenario() -> None:
        first = asyncio.ensure_future(reconciler.sync("ns", "a"))
        await asyncio.sleep(0)  # the first sync holds the lock
        waiting = [asyncio.ensure_future(reconciler.sync("ns", "a")) for _ in range(5)]
        other = asyncio.ensure_future(reconciler.sync("ns", "b"))
        await asyncio.sleep(0.01)
        assert calls == [("ns", "a"), ("ns", "b")]
        release.set()
        await asyncio.gather(first, *waiting, other)

    asyncio.run(scenario())
    # One running, one queued behind it (it reads the indexes after the first): the other four were redundant.
    assert calls.count(("ns", "a")) == 2
    assert calls.count(("ns", "b")) == 1
    assert not reconciler._queued
