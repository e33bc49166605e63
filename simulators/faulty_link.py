"""A TCP link to a broker that a test can cut and restore: one device offline while the rest of the fleet is not.

    link = FaultyLink("127.0.0.1", broker_port)   # relays 127.0.0.1:<link.port> to the broker, bytes unchanged
    link.cut()       # every open connection is dropped; new ones are accepted and closed at once
    link.restore()   # connections are relayed again

TLS passes through untouched (the relay never reads the bytes), so a device with mTLS credentials connects
through it as it would to the broker. Threads: one accepting, two per relayed connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["FaultyLink"]

_CHUNK = 65536


class FaultyLink:
    """Relays connections from 127.0.0.1:`port` to `host`:`target_port`, until `cut()`; `restore()` relays again."""

    def __init__(self, host: str, target_port: int) -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = threading.Event()
        self.refused = 0  # connections accepted and closed while cut
        self._thread = threading.Thread(target=self._accept, name=f"link-{self.port}", daemon=True)
        self._thread.start()

    @property
    def is_cut(self) -> bool:
        """True between `cut()` and `restore()`."""
        return self._cut

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones (accepted, then closed) until `restore()`."""
        with self._lock:
            self._cut = True
            doomed, self._open = self._open, set()
        for sock in doomed:
            _close(sock)

    def restore(self) -> None:
        """Relay new connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop accepting and drop everything."""
        self._closed.set()
        self.cut()
        self._thread.join(5)
        self._listener.close()

    def __enter__(self) -> FaultyLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut:
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self._cut:  # cut while connecting
                    _close(client)
                    _close(upstream)
                    continue
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes one way until either side ends; then end both (a half-open relay would hide a cut)."""
        try:
            while data := source.recv(_CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open.discard(source)
            self._open.discard(sink)
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
