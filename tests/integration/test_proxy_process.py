"""`meshctl proxy run` as a real process: admin API, reload, drain, large bodies, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
import trio

from meshctl.model.base import Duration
from meshctl.model.istio import HTTPRetry
from meshctl.model.proxyconfig import Listener, Settings
from tests.tools.rawapp import RawApp
from proxy_testkit import (
    MESHCTL,
    cluster,
    config,
    registry_only,
    curl,
    free_port,
    outbound_listener,
    route_to,
    vhost,
    write_config,
)

pytestmark = pytest.mark.e2e


def _cfg(up_port: int, lp: int, version: str = "v1", **route_kw):
    return config(
        version=version,
        listeners=[outbound_listener(lp)],
        vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, **route_kw),))],
        clusters=[cluster("reviews", 9080, [("127.0.0.1", up_port)])],
    )


def test_bad_config_file_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "proxy.yaml"
    bad.write_text(
        "version: v1\n"
        "workload: {name: a-0, service: a}\n"
        "listeners:\n"
        "- name: out\n"
        "  direction: outbound\n"
        "  address: 127.0.0.1\n"
        "  port: 15001\n"
        "  routeTabel: outbound\n"
    )
    r = subprocess.run([MESHCTL, "proxy", "run", "--config", str(bad), "--admin-port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"{bad}:8" in r.stderr
    assert "routeTabel" in r.stderr


def test_missing_file_and_busy_port_exit_2(tmp_path, upstream):
    r = subprocess.run([MESHCTL, "proxy", "run", "--config", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "nope.yaml: no such file" in r.stderr
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    path = write_config(_cfg(upstream.port, port), tmp_path / "p.json")
    r = subprocess.run([MESHCTL, "proxy", "run", "--config", str(path), "--admin-port", "0"],
                       capture_output=True, text=True, timeout=30)
    busy.close()
    assert r.returncode == 2
    assert f"127.0.0.1:{port}" in r.stderr


def test_admin_ready_config_and_stats(proxy_process, upstream):
    lp = free_port()
    p = proxy_process(registry_only(_cfg(upstream.port, lp)))  # unknown hosts: a local 502 NR
    assert httpx.get(p.admin + "/ready").status_code == 200
    cfg = httpx.get(p.admin + "/config", headers=p.auth).json()
    assert cfg["version"] == "v1"
    assert cfg["listeners"][0]["name"] == "outbound"
    for _ in range(3):
        r = httpx.get("http://reviews:9080/x", proxy=f"http://127.0.0.1:{lp}")
        assert r.status_code == 200
    httpx.get("http://nope:1/", proxy=f"http://127.0.0.1:{lp}")
    text = httpx.get(p.admin + "/stats").text
    c = "outbound|9080||reviews.default.svc.cluster.local"
    assert f'meshctl_cluster_upstream_rq_total{{cluster="{c}"}} 3' in text
    assert f'meshctl_cluster_upstream_rq_xx{{cluster="{c}",response_code_class="2xx"}} 3' in text
    assert f'meshctl_cluster_upstream_cx_active{{cluster="{c}"}} 1' in text
    assert 'meshctl_downstream_rq_total{listener="outbound"} 4' in text
    assert 'meshctl_response_flags_total{flag="NR"} 1' in text
    # it parses as Prometheus text
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(text)}
    assert "meshctl_cluster_upstream_rq" in names or "meshctl_cluster_upstream_rq_total" in names


def test_reload_on_file_change_and_bad_reload_keeps_old(proxy_process, upstreams):
    a, b = upstreams("a"), upstreams("b")
    lp = free_port()
    p = proxy_process(_cfg(a.port, lp))
    proxy = f"http://127.0.0.1:{lp}"
    assert httpx.get("http://reviews:9080/", proxy=proxy).json()["upstream"] == "a"
    write_config(_cfg(b.port, lp, version="v2"), p.config_path)
    deadline = time.monotonic() + 15  # the file watch: generous for a loaded machine
    while httpx.get(p.admin + "/config", headers=p.auth).json()["version"] != "v2":
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.1)
    assert httpx.get("http://reviews:9080/", proxy=proxy).json()["upstream"] == "b"
    # a broken file is rejected: v2 keeps serving
    p.config_path.write_text("{not json")
    p.proc.send_signal(signal.SIGHUP)
    # wait for the reload to be attempted (its rejection is logged), however slow the machine
    deadline = time.monotonic() + 15
    while "rejected" not in p.log():
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.1)
    assert httpx.get(p.admin + "/config", headers=p.auth).json()["version"] == "v2"
    assert httpx.get("http://reviews:9080/", proxy=proxy).json()["upstream"] == "b"
    assert "rejected" in p.log()


def test_sigterm_drains_in_flight_request_and_exits_0(proxy_process, upstream):
    lp = free_port()
    p = proxy_process(_cfg(upstream.port, lp))
    result = {}

    def slow_request():
        result["r"] = httpx.get("http://reviews:9080/slow?ms=800", proxy=f"http://127.0.0.1:{lp}", timeout=10)

    import threading

    t = threading.Thread(target=slow_request)
    t.start()
    deadline = time.monotonic() + 15
    while not upstream.requests:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    # draining: not ready, and no new connections are accepted
    try:
        assert httpx.get(p.admin + "/ready").status_code == 503
    except httpx.ConnectError:
        pass
    with pytest.raises(httpx.ConnectError):
        httpx.get("http://reviews:9080/", proxy=f"http://127.0.0.1:{lp}")
    t.join(10)
    assert result["r"].status_code == 200
    assert p.proc.wait(10) == 0


async def test_large_bodies_stream_in_bounded_memory(proxy_process, upstream):
    """200 MB up and down through a proxy process; its RSS stays far below the body size."""
    lp = free_port()
    p = proxy_process(_cfg(upstream.port, lp))
    size = 200 * 1024 * 1024
    base = p.rss_kb()
    r = await curl("-x", f"http://127.0.0.1:{lp}", "-o", "/dev/null", "-w", "%{size_download}",
                   f"http://reviews:9080/download?n={size}")
    assert int(r.stdout) == size
    # upload a stream of zeros, chunked
    proc = await trio.run_process(
        ["sh", "-c",
         f"head -c {size} /dev/zero | curl -sS --max-time 60 -x http://127.0.0.1:{lp} "
         f"-T - -X POST http://reviews:9080/upload"],  # -T -: streamed, chunked
        capture_stdout=True,
    )
    assert json.loads(proc.stdout) == {"received": size}
    grown_mb = (p.hwm_kb() - base) / 1024
    assert grown_mb < 40, f"proxy peak RSS grew by {grown_mb:.1f} MB for a {size >> 20} MB body"


def test_an_app_that_writes_head_and_body_separately_is_not_slowed_by_delayed_acks(tmp_path):
    """Python's http.server sends the head and the body in two writes without
    TCP_NODELAY; on a reused upstream connection the body would wait ~40 ms for
    the proxy's delayed ACK. Fresh client connections through the sidecar must
    stay about as fast as straight to the app."""
    import json as _json
    import socket as _socket
    import subprocess as _sp
    import sys as _sys
    import time as _time

    from meshctl.loader.proxyconfig import dump_proxy_config
    from meshctl.model.proxyconfig import Listener, ProxyConfig, Workload

    hello = Path(__file__).parents[1] / "e2e" / "hello_app.py"
    app_port, inbound, admin = free_port(), free_port(), free_port()
    app = _sp.Popen([_sys.executable, str(hello), str(app_port), "v1"])
    cfg = ProxyConfig(version="1", workload=Workload(name="hello-0", service="hello"), listeners=(
        Listener(name="inbound", direction="inbound", address="127.0.0.1", port=inbound, app_address="127.0.0.1", app_port=app_port),))
    (tmp_path / "p.json").write_text(_json.dumps(dump_proxy_config(cfg)))
    proxy = _sp.Popen([_sys.executable, "-m", "meshctl.proxy", "--config", str(tmp_path / "p.json"), "--admin-port", str(admin),
                       "--log-level", "warning"])
    try:
        deadline = _time.monotonic() + 15
        while _time.monotonic() < deadline:
            with _socket.socket() as s:
                if s.connect_ex(("127.0.0.1", inbound)) == 0 and s.connect_ex(("127.0.0.1", app_port)) == 0:
                    break
            _time.sleep(0.05)

        def one_request() -> float:
            t = _time.perf_counter()
            with _socket.create_connection(("127.0.0.1", inbound)) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
            return _time.perf_counter() - t

        one_request()  # warm the pool: the next ones reuse the upstream connection
        times = sorted(one_request() for _ in range(9))
        assert times[4] < 0.030, f"median {times[4] * 1000:.1f} ms: delayed ACK on the upstream leg?"
    finally:
        proxy.terminate()
        app.terminate()
        proxy.wait(10)
        app.wait(10)


def test_admin_config_and_mirror_answer_only_the_mesh_credential(proxy_process, upstream):
    """Any local user may connect to the admin port on loopback: /config (header values routes
    set, ext-authz API keys, collector URLs) and /mirror (paths with query strings, both answers'
    headers) answer only the mesh credential of the proxy's --state-dir; /ready and /stats stay open."""
    from meshctl.model.base import FrozenDict
    from meshctl.model.istio import Destination, HeaderOperations, Headers, PortSelector

    lp = free_port()
    route_kw = {"headers": Headers(request=HeaderOperations(set=FrozenDict({"x-api-key": "route-s3cr3t"}))),
                "mirror": Destination(host="reviews.default.svc.cluster.local", port=PortSelector(number=9080))}
    p = proxy_process(_cfg(upstream.port, lp, **route_kw))
    r = httpx.get("http://reviews:9080/x?token=query-s3cr3t", proxy=f"http://127.0.0.1:{lp}")
    assert r.status_code == 200
    auth = p.auth
    deadline = time.monotonic() + 15
    while not httpx.get(p.admin + "/mirror", headers=auth).json().get("recent"):  # the shadow's answer compared
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.1)
    other = {"authorization": "Bearer mesh.not-this-one"}
    for path in ("/config", "/mirror", "/traces"):
        for headers in ({}, other, {"authorization": "Basic eDp5"}, {"authorization": auth["authorization"][7:]}):
            r = httpx.get(p.admin + path, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["reason"] == "unauthenticated"
            assert "s3cr3t" not in r.text and "reviews" not in r.text
    cfg = httpx.get(p.admin + "/config", headers=auth)
    assert cfg.status_code == 200 and "route-s3cr3t" in cfg.text
    rep = httpx.get(p.admin + "/mirror", headers=auth).json()
    assert any(e["path"] == "/x?token=query-s3cr3t" for e in rep["recent"]), rep
    assert httpx.get(p.admin + "/traces", headers=auth).status_code == 200
    assert httpx.get(p.admin + "/ready").status_code == 200  # health and labels stay open
    assert "meshctl_downstream_rq_total" in httpx.get(p.admin + "/stats").text
    assert "meshctl_downstream_rq_total" in httpx.get(p.admin + "/metrics").text


def test_admin_without_a_state_dir_keeps_config_and_mirror_to_itself(tmp_path, upstream):
    """`proxy run --config` without --state-dir has no mesh credential to check: nobody gets /config."""
    path = write_config(_cfg(upstream.port, free_port()), tmp_path / "p.json")
    admin = free_port()
    proc = subprocess.Popen([MESHCTL, "proxy", "run", "--config", str(path), "--admin-port", str(admin)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # a process start-up: generous for a loaded machine
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        for p in ("/config", "/mirror"):
            r = httpx.get(f"http://127.0.0.1:{admin}{p}", headers={"authorization": "Bearer mesh.anything"})
            assert r.status_code == 401 and "--state-dir" in r.json()["error"], r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


# ------------------------------------------------------------------ an app that answers before reading the body

_EARLY = b"early answer"


class _EarlyApp(RawApp):
    """A raw-socket app that answers each request as soon as it has the head, before reading
    any of its body, as nginx's ``return 200`` or an app's auth rejection does. ``close``:
    the answer says ``connection: close`` and the connection is closed at once (the body
    unread: the kernel sends a reset); ``discard``: a keep-alive answer, then the body is
    read and dropped, and the connection serves the next request (nginx)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        super().__init__()

    def serve(self, c: socket.socket) -> None:
        buf = b""
        while (got := self.read_head(c, buf)) is not None:
            head, buf = got
            extra = b"connection: close\r\n" if self.mode == "close" else b""
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(_EARLY), extra, _EARLY))
            if self.mode == "close" or not self.drop_body(c, head, buf):
                return
            buf = b""


def _early_pair(proxy_process, mode: str):
    """client -> sidecar (outbound) -> sidecar (inbound) -> an _EarlyApp: (app, outbound port,
    the outbound sidecar's process)."""
    app = _EarlyApp(mode)
    in_port, out_port = free_port(), free_port()
    proxy_process(config(listeners=[Listener(name="inbound", direction="inbound", address="127.0.0.1", port=in_port,
                                             app_address="127.0.0.1", app_port=app.port)]), name="in")
    out = proxy_process(config(listeners=[outbound_listener(out_port)],
                               vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
                               clusters=[cluster("reviews", 9080, [("127.0.0.1", in_port)])]), name="out")
    return app, out_port, out


def _read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (content-length framed) off ``s``: status, headers, body."""
    got = b""
    while b"\r\n\r\n" not in got:
        data = s.recv(65536)
        assert data, f"connection closed before a response head: {got!r}"
        got += data
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        data = s.recv(65536)
        assert data, f"connection closed mid-body: {got!r}"
        body += data
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("mode", ["close", "discard"])
def test_an_answer_before_the_body_is_read_says_close_or_keeps_the_connection(proxy_process, mode):
    """The app answers a POST through a sidecar pair before any of its body is sent. The
    answer must say ``connection: close`` or the connection must carry the next request: a
    keep-alive answer followed by a close is what a sidecar in front met from the next one
    (it reused the connection for a POST, which then failed: 503 UR, the fortio -h2 tail)."""
    app, out_port, _ = _early_pair(proxy_process, mode)
    size = 64 * 1024
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", out_port), timeout=10)
            try:
                s.sendall(b"POST /upload HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: %d\r\n\r\n" % size)
                status, headers, body = _read_answer(s)
                assert (status, body) == (200, _EARLY)
                if headers.get("connection", "").lower() == "close":
                    s.close()
                    s = socket.create_connection(("127.0.0.1", out_port), timeout=10)
                else:
                    s.sendall(b"b" * size)  # the body, which frames the next request
                s.sendall(b"GET /again HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
                status, headers, body = _read_answer(s)
                assert (status, body) == (200, _EARLY), headers
            finally:
                s.close()
    finally:
        app.close()


def _cx_active(p, listener: str) -> int:
    for line in httpx.get(p.admin + "/stats", timeout=5).text.splitlines():
        if line.startswith(f'meshctl_downstream_cx_active{{listener="{listener}"}} '):
            return int(float(line.split()[-1]))
    raise AssertionError(f"no cx_active for {listener}")


def test_a_connection_in_its_lingering_close_is_counted_open_until_it_closes(proxy_process):
    """After an early answer the sidecar keeps the client's connection open for its lingering
    close (errors.linger: reading and dropping the unread body, up to 2 s): it is an open
    connection, and counts in cx_active (as it does in max_connections) until it closes."""
    app, out_port, out = _early_pair(proxy_process, "close")
    try:
        s = socket.create_connection(("127.0.0.1", out_port), timeout=10)
        try:
            s.sendall(b"POST /upload HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: 65536\r\n\r\n")
            status, headers, _ = _read_answer(s)
            assert status == 200 and headers.get("connection") == "close", headers
            time.sleep(0.3)  # the sidecar lingers: the body never comes, the client has not closed
            assert _cx_active(out, "outbound") == 1
        finally:
            s.close()
        deadline = time.monotonic() + 5
        while _cx_active(out, "outbound") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cx_active(out, "outbound") == 0
    finally:
        app.close()


class _AnswersWithoutReadingOnRetry(RawApp):
    """The first request: its whole body read, then 503 (keep-alive). Every later one: 200
    as soon as the head is in, then the connection is held open and never read again."""

    def __init__(self) -> None:
        self.requests = 0
        self.done = threading.Event()
        super().__init__()

    def close(self) -> None:
        self.done.set()
        super().close()

    def serve(self, c: socket.socket) -> None:
        buf = b""
        while (got := self.read_head(c, buf)) is not None:
            head, buf = got
            self.requests += 1
            if self.requests > 1:
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(_EARLY), _EARLY))
                self.done.wait(60)
                return
            if not self.drop_body(c, head, buf):
                return
            buf = b""
            c.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")


def test_a_retried_body_the_upstream_answers_without_reading_does_not_hang_the_request(proxy_process):
    """A 32 MB POST, kept whole for retries (retry_buffer_bytes 64 MB): the first try is read
    whole and answered 503; the retry is answered 200 at once by an upstream that never
    reads its body (more than loopback's socket buffers take). The client gets the 200, and its connection carries the next request:
    the retry's body is not written in one go before the answer is read (it would block on
    the unread socket for good), and its sender is not waited for once the answer is
    complete (the upstream connection is closed, not reused)."""
    app = _AnswersWithoutReadingOnRetry()
    port = free_port()
    settings = Settings(connect_timeout=Duration(1.0), drain_timeout=Duration(5.0), retry_buffer_bytes=64 << 20)
    proxy_process(config(listeners=[outbound_listener(port)], settings=settings,
                         vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080,
                                                                   retries=HTTPRetry(attempts=1, retry_on="5xx")),))],
                         clusters=[cluster("reviews", 9080, [("127.0.0.1", app.port)])]))
    size = 32 << 20
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=8)
        try:
            s.sendall(b"POST /upload HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: %d\r\n\r\n" % size)
            s.sendall(b"b" * size)
            status, headers, body = _read_answer(s)
            assert (status, body) == (200, _EARLY), headers
            assert headers.get("connection", "").lower() != "close"  # the client's body was all read
            s.sendall(b"GET /again HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
            status, headers, body = _read_answer(s)
            assert (status, body) == (200, _EARLY), headers
            assert app.requests == 3
        finally:
            s.close()
    finally:
        app.close()


@pytest.mark.parametrize("mode", ["close", "discard"])
def test_an_early_answer_reaches_the_client_while_a_large_body_is_in_flight(proxy_process, mode):
    """A 2 MB POST through a sidecar pair to an app that answers before reading the body:
    every time, the client gets the app's answer (not a 503 from a sidecar that lost it to
    the reset of a connection closed with the body unread), and nothing hangs; an answer
    that does not say ``connection: close`` leaves the connection usable."""
    app, out_port, _ = _early_pair(proxy_process, mode)
    size = 2 << 20
    try:
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", out_port), timeout=10)

            def send_body(s: socket.socket = s) -> None:
                try:
                    s.sendall(b"POST /upload HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: %d\r\n\r\n" % size)
                    block = b"b" * 65536
                    for _ in range(size // len(block)):
                        s.sendall(block)
                except OSError:
                    pass  # the connection was closed after the answer: the rest is not wanted

            sender = threading.Thread(target=send_body, daemon=True)
            sender.start()
            try:
                status, headers, body = _read_answer(s)
                assert (status, body) == (200, _EARLY), headers
                if headers.get("connection", "").lower() != "close":
                    # kept alive (the sidecar had the whole body by then): the connection
                    # must then carry the next request
                    sender.join(10)
                    s.sendall(b"GET /again HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
                    status, headers, body = _read_answer(s)
                    assert (status, body) == (200, _EARLY), headers
            finally:
                s.close()
                sender.join(10)
            assert not sender.is_alive()
    finally:
        app.close()
