"""Whether this replica may act: kopf's peering rule, for the writes that do not come from kopf's handlers.

kopf pauses its own watch of KontextLoRAJobs (and so its handlers) while a peer with a higher priority, or with the
same priority, is alive in the shared ClusterKopfPeering. The operator's Job and pod watches (watches.py) are not
kopf's, so the status writes, Events and re-creations they trigger, and the TTL and retry timers, ask this gate.
It watches the same ClusterKopfPeering object (a single-object watch) and applies kopf's rule to the same records
(`status: {identity: {priority, lifetime, lastseen}}`, kopf's keep-alives): paused while any other live peer has
a priority >= ours; a peer is dead once `lastseen + lifetime` has passed, and the gate re-evaluates at that
moment. Until the object has been read, and while it is missing, the gate is closed (kopf, whose peering is
mandatory here, is paused then too). `--standalone`: always open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .kube import Kube
from .timestamps import parse_time
from .watches import Trimmed, Watch

PEERING_PATH = "/apis/kopf.dev/v1/clusterkopfpeerings"
DEFAULT_LIFETIME = 60

logger = logging.getLogger("kontext_operator")


@dataclass(frozen=True)
class PeeringIdentity:
    """This replica in the peering: the ClusterKopfPeering's name, kopf's identity for us, our priority."""

    name: str
    identity: str
    priority: int


def blocking_peers(records: dict[str, Any], me: PeeringIdentity, now: datetime) -> tuple[list[str], datetime | None]:
    """kopf's rule: the live peers other than us with a priority >= ours, and when the first of them expires."""
    blocking: list[str] = []
    expiry: datetime | None = None
    for identity, record in records.items():
        if identity == me.identity or not isinstance(record, dict):
            continue
        lastseen = parse_time(record.get("lastseen"))
        try:
            lifetime = int(record.get("lifetime", DEFAULT_LIFETIME))
            priority = int(record.get("priority", 0))
        except (TypeError, ValueError):
            continue
        deadline = (lastseen or now) + timedelta(seconds=lifetime)
        if deadline <= now or priority < me.priority:
            continue
        blocking.append(f"{identity} (priority {priority})")
        expiry = deadline if expiry is None else min(expiry, deadline)
    return blocking, expiry


class PeeringGate:
    """Open when this replica may act. `on_change(active)` is called on the loop whenever that flips."""

    def __init__(self, me: PeeringIdentity | None, on_change: Callable[[bool], None]):
        self.me = me
        self.on_change = on_change
        self.active = me is None  # standalone: always
        self._records: dict[str, Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watch: Watch | None = None
        self._announced = False

    def start(self, kube: Kube) -> None:
        if self.me is None:
            return
        self._watch = Watch(
            kube,
            PEERING_PATH,
            scope=None,
            sink=self,
            trim=self._trim,
            loop=asyncio.get_running_loop(),
            field_selector=f"metadata.name={self.me.name}",
            name=f"watch clusterkopfpeering {self.me.name}",
        ).start()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._timer is not None:
            self._timer.cancel()

    @staticmethod
    def _trim(body: dict[str, Any]) -> Trimmed:
        return {"status": dict(body.get("status") or {})}

    # the watch's sink (on the loop)
    def replace(self, scope: str | None, items: list[Trimmed]) -> None:
        self._records = items[0]["status"] if items else None
        self.evaluate()

    def apply(self, kind: str, item: Trimmed) -> None:
        self._records = None if kind == "DELETED" else item["status"]
        self.evaluate()

    def evaluate(self) -> None:
        if self.me is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._records is None:
            self._set(False, f"the ClusterKopfPeering {self.me.name} does not exist (yet)")
            return
        now = datetime.now(UTC)
        blocking, expiry = blocking_peers(self._records, self.me, now)
        if blocking:
            self._set(False, f"peers with the same or a higher priority are alive: {', '.join(sorted(blocking))}")
            if expiry is not None:
                delay = (expiry - now).total_seconds() + 0.1
                self._timer = asyncio.get_running_loop().call_later(delay, self.evaluate)
        else:
            self._set(True, "no live peer with the same or a higher priority")

    def _set(self, active: bool, why: str) -> None:
        if active == self.active and self._announced:
            return
        changed = active != self.active
        self.active, self._announced = active, True
        logger.info("%s the Job and pod watches' writes: %s", "resuming" if active else "pausing", why)
        if changed:
            self.on_change(active)
