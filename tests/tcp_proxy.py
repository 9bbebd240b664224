"""A loopback TCP proxy that can take a service away and bring it back, for the fault tests.

The client (a worker) talks to the proxy's port; the proxy forwards every byte to the service's port.
``outage()`` closes every open connection and the listening socket (new connections are refused, as
when the server has stopped) until ``restore()``; ``cut_when(marker)`` does the same the moment a
client sends bytes containing ``marker`` (e.g. the start of an upload's request line), before those
bytes reach the service. ``retarget(port)`` points it at another server (a restarted one).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_marker: bytes | None = None
        self.cuts = 0  # how many times a marker cut the service away
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    # --- control -------------------------------------------------------------------------------
    def restore(self) -> None:
        """Listen (again, on the same port) and forward."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def outage(self) -> None:
        """The service is gone: open connections are cut and new ones refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        for sock in [*sockets, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut_when(self, marker: bytes) -> None:
        self.cut_marker = marker

    def retarget(self, port: int) -> None:
        self.target_port = port

    @property
    def down(self) -> bool:
        return self._listener is None

    # --- forwarding ----------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: an outage
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client and self.cut_marker is not None and self.cut_marker in chunk:
                    self.cut_marker = None
                    self.cuts += 1
                    self.outage()
                    return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
