"""Graceful stop: SIGTERM (Kubernetes deleting, evicting or preempting the pod) and SIGINT (Ctrl-C) save a checkpoint.

`StopSignals` replaces the SIGTERM and SIGINT handlers for the length of a run. What a first signal does depends
on where the run is:

- before training (downloading, encoding, loading the model, resuming): nothing is worth saving yet, so the handler
  raises `Interrupted` at once and the trainer exits without a checkpoint;
- inside `deferred()` (the training loop, its checkpoints, the final upload): the handler only notes the request.
  The loop finishes the optimiser step in progress (a checkpoint never holds a half-updated state), saves a
  checkpoint at that step unless it has just saved one, and raises `Interrupted`. A checkpoint save or the final
  upload already under way is finished first.

A second signal ends the process at once, as Ctrl-C pressed twice should: `on_abort` reports why (log line,
termination message), then `os._exit` — not an exception, whose unwinding would wait for transfers in flight
(boto3's transfer manager joins its threads, which may be blocked on the network). A checkpoint cut short has no
COMPLETE marker and is deleted by the next run. Either way the process exits 128 + the signal's number (143 for
SIGTERM, what Kubernetes reports for a terminated container; 130 for SIGINT).

The second signal is counted and acted on by a watcher thread, not by the Python-level handler: the kernel may
deliver a process-directed signal to any thread, and Python then runs the handler only when the main thread next
executes bytecode — never, while it waits on a lock for an upload held by a hung S3 server (seen in CI: the
abort waited out the test's 30 s). The C-level handler writes every signal's number to a wakeup socket
(`signal.set_wakeup_fd`) whichever thread it lands on; the watcher reads it at once.

`Interrupted` is a `KeyboardInterrupt`, so no `except Exception` swallows it and libraries unwind as they do for
Ctrl-C (boto3's transfer manager cancels its queued transfers). Handlers can only be installed from the main
thread; elsewhere (a run inside another program's worker thread) the process keeps its own handlers. In a
container the trainer is PID 1, which the kernel shields from signals it has no handler for: without these
handlers SIGTERM was ignored and every graceful stop waited out the grace period for its SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGTERM/SIGINT. `step`/`checkpoint`: where it saved (None when it stopped before training;
    `aborted`: only to describe a second signal, which does not raise)."""

    def __init__(
        self,
        signum: int,
        *,
        aborted: bool = False,
        step: int | None = None,
        total_steps: int | None = None,
        checkpoint: str | None = None,
    ):
        self.signum = signum
        self.aborted = aborted
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    def describe(self) -> str:
        name = self.signal_name
        if self.aborted:
            return (
                f"aborted by a second {name}: a checkpoint being written is left without its COMPLETE marker and "
                "deleted by the next run"
            )
        if self.checkpoint is None:
            return f"stopped by {name} before training: no new checkpoint (nothing trained yet in this run)"
        return f"stopped by {name} after step {self.step}/{self.total_steps}: checkpoint {self.checkpoint} saved"


class StopSignals:
    """SIGTERM/SIGINT handling of one run (see the module doc). Not installed: `requested` stays False.

    `on_abort(message)` runs on a second signal, just before the process exits (log it, write the termination
    message); it must not block.
    """

    def __init__(self, on_abort: Callable[[str], None] | None = None) -> None:
        self.signum: int | None = None  # the first signal
        self.on_abort = on_abort
        self._deferring: str | None = None  # what a first signal lets finish, while deferred
        self._previous: dict[int, Any] = {}
        self._lock = threading.RLock()  # RLock: the main thread's handler may interrupt itself
        self._delivered = 0  # signals the watcher has read
        self._handled = 0  # signals the main thread's handler has run for (Python may merge repeats)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else "no signal"

    def interrupted(self, *, step: int, total_steps: int, checkpoint: str) -> Interrupted:
        """The exception that ends the run once the checkpoint of `step` is saved (a stop was requested)."""
        assert self.signum is not None, "no stop was requested"
        return Interrupted(self.signum, step=step, total_steps=total_steps, checkpoint=checkpoint)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle SIGTERM and SIGINT until the block ends, then restore the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("not on the main thread: SIGTERM/SIGINT keep their handlers (no checkpoint on stop)")
            yield self
            return
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd requires it: the C handler must never block
        watcher = threading.Thread(target=self._watch, args=(reader,), name="stop-signals", daemon=True)
        watcher.start()
        previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()
            signal.set_wakeup_fd(previous_wakeup)
            writer.close()  # the watcher reads end-of-file and returns
            watcher.join(timeout=5)
            reader.close()

    @contextmanager
    def deferred(self, finishing: str) -> Iterator[None]:
        """While inside, a first signal is only noted (and `finishing`, what will happen first, logged): the caller
        stops at a safe point it checks with `requested`."""
        previous, self._deferring = self._deferring, finishing
        try:
            yield
        finally:
            self._deferring = previous

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler (main thread, between bytecodes): outside `deferred`, a first signal raises."""
        with self._lock:
            self._handled += 1
            first = self._handled == 1
            if self.signum is None:
                self.signum = signum
        if first and self._deferring is None:
            raise Interrupted(signum)

    def _watch(self, reader: socket.socket) -> None:
        """Read the signal numbers the C-level handler writes to the wakeup socket, as they arrive."""
        while data := reader.recv(64):
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._on_delivery(signum)

    def _on_delivery(self, signum: int) -> None:
        with self._lock:
            self._delivered += 1
            first = self._delivered == 1
            if self.signum is None:
                self.signum = signum
        if not first:
            self._abort(signum)
        deferring, name = self._deferring, signal_name(signum)
        if deferring is not None:
            again = "Ctrl-C" if signum == signal.SIGINT else name
            log.warning("%s received: %s (a second %s aborts at once)", name, deferring, again)

    def _abort(self, signum: int) -> NoReturn:
        aborted = Interrupted(signum, aborted=True)
        try:
            if self.on_abort is not None:
                self.on_abort(aborted.describe())
        finally:
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(aborted.exit_code)
