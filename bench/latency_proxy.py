"""A TCP proxy on loopback that adds a fixed one-way delay to every byte in both directions (an emulated WAN).

Loopback has ~0.05 ms round trips, so parallel downloads from a local MinIO are CPU-bound, not latency-bound;
a real object store is tens of milliseconds away. `tc netem` would need CAP_NET_ADMIN, which the sandbox lacks,
so this proxy delays each chunk it forwards until `delay` seconds after it was read, preserving order: a round
trip through it costs 2·delay more, bandwidth is not limited. It runs in its own thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator


class LatencyProxy:
    def __init__(self, target_host: str, target_port: int, delay_seconds: float):
        self.target = (target_host, target_port)
        self.delay = delay_seconds
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LatencyProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("latency proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pump(client_reader, server_writer), self._pump(server_reader, client_writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward chunks, each no earlier than `delay` after it arrived (order kept, no bandwidth cap)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(256 * 1024)
                queue.put_nowait((time.monotonic() + self.delay, chunk))
                if not chunk:
                    break
            await delivering
        except (ConnectionError, OSError):
            delivering.cancel()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()


@contextlib.contextmanager
def latency_proxy(host: str, port: int, delay_seconds: float) -> Iterator[LatencyProxy]:
    proxy = LatencyProxy(host, port, delay_seconds).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.latency_proxy HOST:PORT DELAY_SECONDS`: print the proxy's port, serve until killed.

    Benchmarks run it as a subprocess so that forwarding does not compete for the GIL with the clients measured.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    host, _, port = args[0].rpartition(":")
    proxy = LatencyProxy(host, int(port), float(args[1])).start()
    print(proxy.port, flush=True)
    try:
        threading.Event().wait()
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
