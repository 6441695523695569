"""A TCP proxy on loopback that injects network faults between a client and a real server.

Put it between kvproxy and a real ``redis-server`` to make Redis slow, hung or cut off mid-reply
without touching either program. The fault can be changed while connections are open, so a pooled
client connection feels it too:

- ``Pass()``: forward both ways untouched.
- ``Delay(seconds)``: hold every chunk of a *response* (server -> client) for ``seconds``.
- ``Stall()``: accept connections but forward nothing, either way (a hung server: the client's
  bytes sit in the kernel buffers, no reply ever comes).
- ``CutAfter(n)``: forward at most ``n`` response bytes per connection (counted from when the
  connection first sees this fault), then close both sides mid-reply.

One thread accepts, one thread per connection pumps both directions with ``select``; everything
is daemonic and ``close()`` ends it all.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType

_CHUNK = 65536
_POLL_S = 0.02


@dataclass(frozen=True)
class Pass:
    pass


@dataclass(frozen=True)
class Delay:
    seconds: float


@dataclass(frozen=True)
class Stall:
    pass


@dataclass(frozen=True, eq=False)
class CutAfter:
    """``eq=False``: two ``CutAfter(n)`` set one after the other are different faults, so each one
    restarts the per-connection byte count."""

    nbytes: int


Fault = Pass | Delay | Stall | CutAfter


class FaultProxy:
    """Listens on ``127.0.0.1:<free port>`` and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S * 5)
        self.port: int = self._listener.getsockname()[1]
        self._fault: Fault = Pass()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        """Connections accepted so far (to check traffic really went through the proxy)."""
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def fault(self) -> Fault:
        with self._lock:
            return self._fault

    def set_fault(self, fault: Fault) -> None:
        with self._lock:
            self._fault = fault

    def redis_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._acceptor.join(timeout=2)
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- threads --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            with self._lock:
                self.connections += 1
            thread = threading.Thread(
                target=self._serve, args=(client,), name="fault-proxy-conn", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        sent_under: dict[int, int] = {}  # id(CutAfter fault) -> response bytes sent under it
        try:
            while not self._closed.is_set():
                fault = self.fault
                if isinstance(fault, Stall):
                    # Read nothing, send nothing: the peer's bytes wait in the kernel. A client that
                    # gives up and closes is noticed once the fault is lifted.
                    time.sleep(_POLL_S)
                    continue
                if upstream is None:
                    # Connected lazily, so a connection accepted during a stall never reached Redis.
                    upstream = socket.create_connection(self.upstream, timeout=5)
                readable, _, _ = select.select([client, upstream], [], [], _POLL_S)
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    if sock is client:
                        upstream.sendall(data)
                        continue
                    fault = self.fault
                    if isinstance(fault, Delay):
                        time.sleep(fault.seconds)
                    elif isinstance(fault, CutAfter):
                        already = sent_under.setdefault(id(fault), 0)
                        allowed = max(fault.nbytes - already, 0)
                        if len(data) >= allowed:
                            client.sendall(data[:allowed])
                            return  # mid-reply: both sides are closed below
                        sent_under[id(fault)] = already + len(data)
                    client.sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):  # the peer may be gone already
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
