"""Fault injection for the reliability bench and its tests: freeze a service, cut a TCP dependency.

The shared PostgreSQL server cannot be stopped (other people use it), so the scorer reaches it through a
`TcpProxy` on a loopback port; `cut()` closes every proxied connection and refuses new ones (what a crashed or
partitioned database looks like to a client), `restore()` forwards again. The listener stays open throughout (a
closed one could lose its port to someone else's ephemeral connection): while cut, a connection is accepted and
closed at once. A service started by
`shadow_distill.stack.Supervisor` is frozen with `frozen(sup, name)` (SIGSTOP/SIGCONT of its process group:
there but answering nothing).

    with TcpProxy("127.0.0.1", 5432) as proxy:          # scorer gets postgresql://...@127.0.0.1:{proxy.port}/db
        proxy.cut(); time.sleep(30); proxy.restore()
    with frozen(sup, "broker"):
        time.sleep(30)
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator

from message_bus.broker import free_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to (`host`, `target_port`), one pair of pump threads per connection."""

    def __init__(self, host: str, target_port: int, port: int | None = None):
        self.target = (host, target_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._up = True
        self.accepted = 0

    # ---- control -------------------------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy-accept", daemon=True).start()
        return self

    def cut(self) -> None:
        """Close every open connection; close new ones as soon as they are accepted."""
        with self._lock:
            self._up = False
            conns, self._conns = self._conns, set()
        for sock in conns:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def stop(self) -> None:
        self.cut()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- pumping -------------------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            if not self._up:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if not self._up:  # cut while connecting
                    _close(client), _close(upstream)
                    continue
                self._conns.update((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src), _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def frozen(sup, name: str) -> Iterator[None]:
    """SIGSTOP the service's process group for the body of the `with`, then SIGCONT it (also on error)."""
    sup.signal(name, signal.SIGSTOP)
    try:
        yield
    finally:
        sup.signal(name, signal.SIGCONT)
