"""A loopback TCP server for tests that need an app speaking raw bytes: each accepted
connection is handed to ``serve(conn)`` in a thread of its own (the socket is closed
after it returns). Subclasses set their own attributes before calling ``__init__``,
which starts accepting."""

from __future__ import annotations

import socket
import threading


class RawApp:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, c: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with c:
            try:
                self.serve(c)
            except OSError:
                pass
