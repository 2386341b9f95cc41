"""A small HTTP/2-only (h2c prior knowledge) app for tests, on the h2 library
in a thread: independent of meshctl's codec. Endpoints:

  /echo          JSON of method, path, headers, body; trailers ("x-trailer": "yes")
                 when the request has "x-want-trailers"
  /download?n=N  N bytes (flow controlled)
  /status?code=C that status, empty body
  /refuse?key=K  RST_STREAM(REFUSED_STREAM) on the first request with key K
  /early         "early answer", complete (END_STREAM), as soon as the request head is in,
                 before any of the body, and no RST_STREAM after it (RFC 9113 8.1: optional)
  /early-reset   the same, then RST_STREAM(NO_ERROR)
The streams the client reset are in ``resets``.
With ``hold`` set, every request is recorded and never answered (a stuck upstream).
"""

from __future__ import annotations

import json
import socket
import threading
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events


class H2App:
    def __init__(self, max_concurrent_streams: int = 100) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, list]] = []
        self.hits: dict[str, int] = {}
        self.max_open = 0  # most streams open at once on one connection
        self.resets: list[int] = []  # streams the client reset (RST_STREAM)
        self.max_concurrent_streams = max_concurrent_streams
        self.hold = False  # record requests, answer none
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.local_settings.max_concurrent_streams = self.max_concurrent_streams
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        reqs: dict[int, dict] = {}
        pending: dict[int, list] = {}  # sid -> [bytes left, trailers]
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        reqs[ev.stream_id] = {"headers": ev.headers, "body": b""}
                        path = dict(ev.headers).get(":path")
                        if path in ("/early", "/early-reset") and not ev.stream_ended:
                            reqs[ev.stream_id]["answered"] = True
                            conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", "12")])
                            conn.send_data(ev.stream_id, b"early answer", end_stream=True)
                            if path == "/early-reset":  # "stop sending, no error" (RFC 9113 8.1)
                                conn.reset_stream(ev.stream_id, error_code=h2.errors.ErrorCodes.NO_ERROR)
                    elif isinstance(ev, h2.events.DataReceived):
                        if ev.stream_id in reqs:
                            reqs[ev.stream_id]["body"] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        if ev.stream_id in reqs:
                            reqs[ev.stream_id]["trailers"] = ev.headers
                    elif isinstance(ev, h2.events.StreamEnded):
                        rq = reqs.pop(ev.stream_id, None)
                        if rq is not None and not rq.get("answered"):
                            self._answer(conn, ev.stream_id, rq, pending)
                    elif isinstance(ev, h2.events.StreamReset):
                        with self.lock:
                            self.resets.append(ev.stream_id)
                        reqs.pop(ev.stream_id, None)
                        pending.pop(ev.stream_id, None)
                open_now = len(reqs) + len(pending)
                if open_now > self.max_open:
                    with self.lock:
                        self.max_open = max(self.max_open, open_now)
                for sid in list(pending):
                    self._push(conn, sid, pending)
                s.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            s.close()

    def _push(self, conn, sid: int, pending: dict) -> None:
        left, trailers = pending[sid]
        try:
            while left:
                win = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if win <= 0:
                    return
                chunk, left = left[:win], left[win:]
                pending[sid][0] = left
                conn.send_data(sid, chunk)
            if trailers:
                conn.send_headers(sid, trailers, end_stream=True)
            else:
                conn.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        del pending[sid]

    def _answer(self, conn, sid: int, rq: dict, pending: dict) -> None:
        hdrs = rq["headers"]
        d = dict(hdrs)
        path = d.get(":path", "/")
        url = urlsplit(path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.lock:
            self.requests.append((d.get(":method", ""), path, hdrs))
        if self.hold:
            return
        if url.path == "/refuse":
            k = q.get("key", "k")
            with self.lock:
                self.hits[k] = self.hits.get(k, 0) + 1
                first = self.hits[k] == 1
            if first:
                conn.reset_stream(sid, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
                return
        if url.path == "/status":
            conn.send_headers(sid, [(":status", q.get("code", "200"))], end_stream=True)
            return
        if url.path == "/download":
            n = int(q.get("n", "0"))
            conn.send_headers(sid, [(":status", "200"), ("content-length", str(n))])
            pending[sid] = [b"d" * n, None]
            return
        body = json.dumps({
            "method": d.get(":method"), "path": path, "authority": d.get(":authority"),
            "headers": [[k, v] for k, v in hdrs if not k.startswith(":")],
            "body": rq["body"].decode("latin-1"),
            "trailers": [[k, v] for k, v in rq.get("trailers", [])],
        }).encode()
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json"), ("x-app", "h2")])
        trailers = [("x-trailer", "yes")] if "x-want-trailers" in d else None
        pending[sid] = [body, trailers]
