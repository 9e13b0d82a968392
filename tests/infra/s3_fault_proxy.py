"""A fault-injecting proxy in front of the test S3 server, for the fault-injection suite (tests/faults).

The trainer is pointed at the proxy's endpoint instead of MinIO's. The proxy forwards bytes both ways, but it
reads the HTTP requests going to the server (request line, headers, a Content-Length or chunked body), so a test
can pin the exact moment to cut storage: `hold(predicate)` stops the first matching request before it reaches the
server (a checkpoint's `COMPLETE` marker, the first dataset image) until the test releases it — typically after
stopping MinIO — and `release(drop=True)` then cuts the held connection, as a crashed server does. Every request
seen is recorded (method, path, time). When the server is down, new connections are accepted and closed at once,
which the client sees as a dropped connection (a retryable error, like a refused one).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .processes import free_port


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # URL path, percent-encoded as sent
    query: str
    at: float  # time.monotonic() when its headers arrived


@dataclass
class Hold:
    """Requests matching `predicate` wait at the proxy until `release()`; `hit` is set when the first arrives."""

    predicate: Callable[[Request], bool]
    hit: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    drop: bool = False
    request: Request | None = None

    def wait_hit(self, timeout: float) -> Request:
        if not self.hit.wait(timeout):
            raise TimeoutError(f"no request matched the hold within {timeout:.0f}s")
        assert self.request is not None
        return self.request

    def release(self, drop: bool = False) -> None:
        """Let held requests go on to the server, or (drop=True) close their connections without an answer."""
        self.drop = drop
        self.released.set()


class _Closed(Exception):
    pass


class S3FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.host = host
        self.upstream_port = upstream_port
        self.port = free_port()
        self.requests: list[Request] = []
        self.holds: list[Hold] = []
        self.refused_connections = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> S3FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, name="s3-proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        for hold in self.holds:
            hold.release(drop=True)
        if self._listener:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def hold(self, predicate: Callable[[Request], bool]) -> Hold:
        hold = Hold(predicate)
        with self._lock:
            self.holds.append(hold)
        return hold

    def seen(self, predicate: Callable[[Request], bool] = lambda r: True) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    # ---- connections ---------------------------------------------------------------------------------------

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _close(self, *socks: socket.socket | None) -> None:
        for sock in socks:
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._sockets.discard(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), name="s3-proxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            upstream = self._track(socket.create_connection((self.host, self.upstream_port), timeout=5))
            upstream.settimeout(None)
        except OSError:  # the server is down: the client sees its connection dropped
            with self._lock:
                self.refused_connections += 1
            self._close(client, upstream)
            return
        threading.Thread(target=self._pipe, args=(upstream, client), name="s3-proxy-down", daemon=True).start()
        reader = client.makefile("rb")
        try:
            while not self._stopped.is_set():
                head = self._read_head(reader)
                request = self._request(head)
                with self._lock:
                    self.requests.append(request)
                    holds = [h for h in self.holds if not h.released.is_set() and h.predicate(request)]
                for hold in holds:
                    if not hold.hit.is_set():
                        hold.request = request
                        hold.hit.set()
                    hold.released.wait()
                    if hold.drop:
                        raise _Closed
                upstream.sendall(head)
                self._forward_body(reader, upstream, head)
        except (_Closed, OSError, ValueError):
            pass
        finally:
            reader.close()
            self._close(client, upstream)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            self._close(source, sink)

    # ---- HTTP/1.1 framing (requests only: responses are piped as they come) ----------------------------------

    @staticmethod
    def _readline(reader) -> bytes:
        line = reader.readline(65537)
        if not line:
            raise _Closed
        return line

    def _read_head(self, reader) -> bytes:
        lines = [self._readline(reader)]
        while lines[-1] not in (b"\r\n", b"\n"):
            lines.append(self._readline(reader))
        return b"".join(lines)

    @staticmethod
    def _request(head: bytes) -> Request:
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        parts = urlsplit(target)
        return Request(method, parts.path, parts.query, time.monotonic())

    @staticmethod
    def _headers(head: bytes) -> dict[str, str]:
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return headers

    def _forward_body(self, reader, upstream: socket.socket, head: bytes) -> None:
        headers = self._headers(head)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = self._readline(reader)
                upstream.sendall(size_line)
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (trailer := self._readline(reader)) not in (b"\r\n", b"\n"):
                        upstream.sendall(trailer)
                    upstream.sendall(trailer)
                    return
                self._copy(reader, upstream, size + 2)  # data and its CRLF
        else:
            self._copy(reader, upstream, int(headers.get("content-length") or 0))

    @staticmethod
    def _copy(reader, upstream: socket.socket, count: int) -> None:
        while count > 0:
            chunk = reader.read1(min(count, 65536)) if hasattr(reader, "read1") else reader.read(min(count, 65536))
            if not chunk:
                raise _Closed
            upstream.sendall(chunk)
            count -= len(chunk)
