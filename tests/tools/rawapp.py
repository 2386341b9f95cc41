"""A loopback TCP server for tests that need an app speaking raw bytes: each accepted
connection is handed to ``serve(conn)`` in a thread of its own (the socket is closed
after it returns; an OSError, ssl's errors among them, ends it quietly). Subclasses set their own attributes before calling ``__init__``,
which starts accepting."""

from __future__ import annotations

import socket
import threading


class RawApp:
    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
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

    @staticmethod
    def read_head(c: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
        """The next message head off ``c`` (``buf``: bytes read before), without its blank
        line, and the bytes read after it; None if the peer closes first."""
        while b"\r\n\r\n" not in buf:
            data = c.recv(65536)
            if not data:
                return None
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        return head, rest

    @staticmethod
    def drop_body(c: socket.socket, head: bytes, buf: bytes) -> bool:
        """Read and drop the body ``head``'s content-length announces, ``buf`` being its
        first bytes (the bytes read with the head); False if the peer closes first."""
        left = max((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")), default=0) - len(buf)
        while left > 0:
            data = c.recv(min(left, 65536))
            if not data:
                return False
            left -= len(data)
        return True
