"""gRPC through a sidecar pair (client -> outbound proxy -> inbound proxy -> app)
with real grpcio clients and servers; the service is defined with generic
handlers and raw bytes, so no protoc is needed."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trio

from meshctl.model.istio import (
    FaultAbort,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    Percent,
    StringMatch,
)
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener

from proxy_testkit import cluster, config, free_port, outbound_listener, route_to, running_proxy, vhost

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class EchoApp:
    """mesh.Echo: Say (unary), Count (server streaming), Chat (bidi)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.hits: dict[bytes, int] = {}
        self.metadata: list[dict] = []
        self.cancelled = threading.Event()
        handler = grpc.method_handlers_generic_handler("mesh.Echo", {
            "Say": grpc.unary_unary_rpc_method_handler(self.say),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Greet": grpc.unary_unary_rpc_method_handler(self.greet),  # protobuf-typed (echo.proto)
        })
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def say(self, req: bytes, ctx) -> bytes:
        with self.lock:
            self.hits[req] = self.hits.get(req, 0) + 1
            n = self.hits[req]
            self.metadata.append(dict(ctx.invocation_metadata()))
        if req.startswith(b"sleep:"):
            t0 = time.monotonic()
            while time.monotonic() - t0 < float(req[6:]):
                if not ctx.is_active():
                    self.cancelled.set()
                    return b""
                time.sleep(0.02)
        if req.startswith(b"fail-once:") and n == 1:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if req == b"not-found":
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        ctx.set_trailing_metadata((("x-app-trailer", self.name),))
        return self.name.encode() + b": hello " + req

    def greet(self, req: bytes, ctx) -> bytes:
        """mesh.Msg in, mesh.Msg out: field 1 (text) is the only field, so the
        wire form is 0x0a, a varint length and the UTF-8 bytes."""
        text = _pb_text(req)
        return _pb_msg(f"{self.name}: hello {text}")

    def count(self, req: bytes, ctx):
        for i in range(int(req)):
            yield b"%d" % i

    def chat(self, it, ctx):
        for m in it:
            yield b"echo:" + m

    def stop(self) -> None:
        self.server.stop(0)


def _pb_text(data: bytes) -> str:
    if not data:
        return ""
    assert data[0] == 0x0A, data
    n, shift, i = 0, 0, 1
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    return data[i:i + n].decode()


def _pb_msg(text: str) -> bytes:
    raw = text.encode()
    n, out = len(raw), bytearray([0x0A])
    while True:
        if n < 0x80:
            out.append(n)
            break
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out) + raw


@pytest.fixture
def echo_apps():
    made = []

    def make(name: str = "a") -> EchoApp:
        a = EchoApp(name)
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()


@asynccontextmanager
async def sidecar_pair(app: EchoApp, *routes, extra_apps=()):
    """Client sidecar (outbound) -> server sidecar (inbound) -> app. Returns the outbound port."""
    in_port = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=in_port,
                       app_address="127.0.0.1", app_port=app.port, service="echo")
    server_cfg = config(listeners=[inbound])
    out_port = free_port()
    clusters = [cluster("echo", 9090, [("127.0.0.1", in_port)], protocol="grpc")]
    for sub, other in extra_apps:
        clusters.append(cluster("echo", 9090, [("127.0.0.1", other.port)], subset=sub, protocol="grpc"))
    client_cfg = config(
        listeners=[outbound_listener(out_port)],
        vhosts=[vhost("echo", 9090, tuple(routes) or (route_to("echo", 9090),))],
        clusters=clusters,
    )
    async with running_proxy(server_cfg), running_proxy(client_cfg) as rt:
        yield out_port, rt


def _channel(port: int):
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "echo:9090"),
                                                               ("grpc.enable_retries", 0)])


def _run(fn):
    return trio.to_thread.run_sync(fn)


async def test_unary_server_streaming_and_bidi_through_a_sidecar_pair(echo_apps):
    app = echo_apps("a")
    async with sidecar_pair(app) as (port, rt):
        def calls():
            with _channel(port) as ch:
                say = ch.unary_unary("/mesh.Echo/Say")
                resp, call = say.with_call(b"world", metadata=(("x-client", "1"),), timeout=10)
                count = list(ch.unary_stream("/mesh.Echo/Count")(b"50", timeout=10))
                chat = list(ch.stream_stream("/mesh.Echo/Chat")(iter([b"a", b"b" * 100000, b"c"]), timeout=10))
                return resp, dict(call.trailing_metadata()), count, chat

        resp, trailers, count, chat = await _run(calls)
        # istio_request_messages_total / istio_response_messages_total, summed over the three calls:
        # client sent 1 + 1 + 3 messages, server answered 1 + 50 + 3.
        from prometheus_client.parser import text_string_to_metric_families

        def recorded():
            calls, totals = 0, {}
            for fam in text_string_to_metric_families(rt.telemetry.render()):
                for sm in fam.samples:
                    if sm.name == "istio_requests_total":
                        calls += sm.value
                    if sm.name in ("istio_request_messages_total", "istio_response_messages_total"):
                        totals[sm.name] = totals.get(sm.name, 0) + sm.value
            return calls, totals

        # The client has its last message and trailers a moment before the sidecar's stream
        # task records the stream (as in Envoy, on completion): wait, bounded, until all
        # three calls are recorded, then check their message counts.
        with trio.move_on_after(5):
            while recorded()[0] < 3:
                await trio.sleep(0.01)
        calls, totals = recorded()
        assert calls == 3, calls
        assert totals == {"istio_request_messages_total": 5, "istio_response_messages_total": 54}, totals
        assert resp == b"a: hello world"
        assert trailers["x-app-trailer"] == "a"  # trailers carried end to end
        assert count == [b"%d" % i for i in range(50)]
        assert chat == [b"echo:a", b"echo:" + b"b" * 100000, b"echo:c"]
        md = app.metadata[-1]
        assert md["x-client"] == "1"
        assert md.get("x-request-id")  # the proxies' own headers reached the app


async def test_grpc_status_and_message_carried_end_to_end(echo_apps):
    app = echo_apps("a")
    async with sidecar_pair(app) as (port, rt):
        def call():
            with _channel(port) as ch:
                ok = ch.unary_unary("/mesh.Echo/Say")(b"x", timeout=10)
                try:
                    ch.unary_unary("/mesh.Echo/Say")(b"not-found", timeout=10)
                except grpc.RpcError as e:
                    return ok, e.code(), e.details()
        ok, code, details = await _run(call)
        assert ok == b"a: hello x"
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == "no such thing"
        # Istio's grpc_response_status label: 0 for the good call, 5 (NOT_FOUND) for the other.
        from prometheus_client.parser import text_string_to_metric_families

        seen = {}
        for fam in text_string_to_metric_families(rt.telemetry.render()):
            if fam.name == "istio_requests":
                for sm in fam.samples:
                    if sm.name == "istio_requests_total" and sm.labels["request_protocol"] == "grpc":
                        seen[sm.labels["grpc_response_status"]] = sm.value
        assert seen == {"0": 1, "5": 1}, seen


async def test_retry_on_grpc_unavailable(echo_apps):
    app = echo_apps("a")
    route = route_to("echo", 9090, retries=HTTPRetry(attempts=2, retry_on="unavailable"))
    async with sidecar_pair(app, route) as (port, _):
        def call():
            with _channel(port) as ch:
                return ch.unary_unary("/mesh.Echo/Say")(b"fail-once:k", timeout=10)
        assert await _run(call) == b"a: hello fail-once:k"
        assert app.hits[b"fail-once:k"] == 2


async def test_routing_on_the_method_path(echo_apps):
    a, b = echo_apps("a"), echo_apps("b")
    to_b = route_to("echo", 9090, subsets={"v2": 100}, match=(HTTPMatchRequest(uri=StringMatch(prefix="/mesh.Echo/Say")),))
    rest = route_to("echo", 9090)
    async with sidecar_pair(a, to_b, rest, extra_apps=[("v2", b)]) as (port, _):
        def calls():
            with _channel(port) as ch:
                return ch.unary_unary("/mesh.Echo/Say")(b"x", timeout=10), list(ch.unary_stream("/mesh.Echo/Count")(b"2", timeout=10))
        said, counted = await _run(calls)
        assert said == b"b: hello x"  # Say went to the v2 subset's app directly
        assert counted == [b"0", b"1"]
        assert b.hits == {b"x": 1} and a.hits == {}


async def test_fault_abort_with_grpc_status(echo_apps):
    app = echo_apps("a")
    route = route_to("echo", 9090, fault=HTTPFaultInjection(
        abort=FaultAbort(grpc_status="UNAVAILABLE", percentage=Percent(100.0))))
    async with sidecar_pair(app, route) as (port, _):
        def call():
            with _channel(port) as ch:
                try:
                    ch.unary_unary("/mesh.Echo/Say")(b"x", timeout=10)
                except grpc.RpcError as e:
                    return e.code(), e.details()
        code, details = await _run(call)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == "fault filter abort"
        assert app.hits == {}


async def test_local_errors_are_grpc_statuses(echo_apps):
    app = echo_apps("a")
    # a route that never matches: no route for the request
    never = route_to("echo", 9090, match=(HTTPMatchRequest(headers=FrozenDict({"x-never": StringMatch(exact="1")})),))
    async with sidecar_pair(app, never) as (port, _):
        def call():
            ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "echo:9090")])
            with ch:
                try:
                    ch.unary_unary("/mesh.Echo/Say")(b"x", timeout=10)
                except grpc.RpcError as e:
                    return e.code(), e.details()
        code, details = await _run(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED  # 404 no route, as gRPC maps it
        assert "no route" in details


async def test_grpc_timeout_is_the_deadline(echo_apps):
    """No client-side deadline enforcement here (raw h2): the proxy itself answers
    DEADLINE_EXCEEDED at grpc-timeout, and the app's call is cancelled."""
    app = echo_apps("a")
    async with sidecar_pair(app) as (port, _):
        s = socket.create_connection(("127.0.0.1", port))
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        c.initiate_connection()
        msg = b"sleep:10"
        c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "echo:9090"),
                           (":path", "/mesh.Echo/Say"), ("content-type", "application/grpc"), ("te", "trailers"),
                           ("grpc-timeout", "300m")])
        c.send_data(1, b"\0" + len(msg).to_bytes(4, "big") + msg, end_stream=True)
        s.sendall(c.data_to_send())
        t0 = time.monotonic()
        head = None
        with trio.fail_after(5):
            while head is None:
                data = await trio.to_thread.run_sync(s.recv, 65536)
                assert data
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        head = dict(ev.headers)
        took = time.monotonic() - t0
        s.close()
        assert head[":status"] == "200" and head["grpc-status"] == "4", head  # DEADLINE_EXCEEDED
        assert 0.25 < took < 4.0  # the 300 ms grpc-timeout, not the call's 10 s; slack for a loaded machine
        assert await trio.to_thread.run_sync(app.cancelled.wait, 3)  # the upstream call was cancelled


async def test_upstream_binding_reaches_the_grpc_service_by_name(echo_apps):
    """A mesh.yaml upstream binding (127.0.0.1:PORT is echo:9090): the gRPC client
    dials the local port with whatever authority it likes."""
    app = echo_apps("a")
    in_port = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=in_port,
                       app_address="127.0.0.1", app_port=app.port, service="echo")
    bind_port = free_port()
    binding = Listener(name="bind-echo", direction="binding", address="127.0.0.1", port=bind_port,
                       route_table="outbound", service="echo.default.svc.cluster.local", service_port=9090)
    client_cfg = config(
        listeners=[binding],
        vhosts=[vhost("echo", 9090, (route_to("echo", 9090),))],
        clusters=[cluster("echo", 9090, [("127.0.0.1", in_port)], protocol="grpc")],
    )
    async with running_proxy(config(listeners=[inbound])), running_proxy(client_cfg):
        def call():
            with grpc.insecure_channel(f"127.0.0.1:{bind_port}") as ch:
                return ch.unary_unary("/mesh.Echo/Say")(b"bound", timeout=10)
        assert await _run(call) == b"a: hello bound"


@asynccontextmanager
async def mtls_sidecar_pair(app: EchoApp, client_sa: str, allowed_sa: str):
    """Client sidecar -> server sidecar over mTLS (certificates from a test CA),
    the server allowing only ``allowed_sa`` by AuthorizationPolicy. Yields the
    client sidecar's outbound port."""
    import dataclasses
    from datetime import datetime, timedelta, timezone
    from functools import partial

    from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
    from meshctl.model.base import FrozenDict
    from meshctl.model.istio import AuthorizationPolicy, Rule, RuleFrom, Source
    from meshctl.model.proxyconfig import Endpoint
    from meshctl.proxy.identity import SidecarCertificates
    from meshctl.proxy.runtime import ProxyRuntime

    now = datetime.now(timezone.utc)
    root = create_root("cluster.local", now - timedelta(days=1))

    def certs(spiffe: str) -> SidecarCertificates:
        h = SidecarCertificates()
        key = generate_key()
        h.update(root.sign_csr(make_csr(key), spiffe, timedelta(hours=1), now) + root.issuer_chain_pem,
                 key_to_pem(key), root.root_pem)
        return h

    echo_id = "spiffe://cluster.local/ns/default/sa/echo"
    in_port = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=in_port,
                       app_address="127.0.0.1", app_port=app.port, service="echo", mtls_mode="STRICT")
    policy = AuthorizationPolicy(action="ALLOW", rules=(Rule(from_=(RuleFrom(source=Source(
        principals=(f"cluster.local/ns/default/sa/{allowed_sa}",))),)),))
    server_cfg = dataclasses.replace(config(listeners=[inbound]), authorization=FrozenDict({"default/p": policy}))
    out_port = free_port()
    ep = Endpoint(address="127.0.0.1", port=in_port, identity=echo_id)
    client_cfg = config(listeners=[outbound_listener(out_port)], vhosts=[vhost("echo", 9090, (route_to("echo", 9090),))],
                        clusters=[cluster("echo", 9090, [ep], protocol="grpc")])
    srt, crt = ProxyRuntime(), ProxyRuntime()
    srt.tls, crt.tls = certs(echo_id), certs(f"spiffe://cluster.local/ns/default/sa/{client_sa}")
    async with trio.open_nursery() as n:
        await n.start(partial(srt.run, server_cfg, handle_signals=False))
        await n.start(partial(crt.run, client_cfg, handle_signals=False))
        try:
            yield out_port
        finally:
            srt.drain()
            crt.drain()


async def test_grpc_over_mtls_sidecars_and_authorization_on_the_peer_principal(echo_apps):
    """HTTP/2 streams over the sidecars' mTLS: the inbound sees the verified peer
    of the connection on every stream (AuthorizationPolicy on principals)."""
    app = echo_apps("a")

    async def call_as(client_sa: str, allowed_sa: str):
        async with mtls_sidecar_pair(app, client_sa, allowed_sa) as out_port:
            def call():
                with _channel(out_port) as ch:
                    try:
                        return ch.unary_unary("/mesh.Echo/Say")(b"tls", timeout=10)
                    except grpc.RpcError as e:
                        return e.code()
            return await _run(call)

    assert await call_as("client", "client") == b"a: hello tls"
    assert await call_as("intruder", "client") == grpc.StatusCode.PERMISSION_DENIED  # 403 RBAC as a gRPC status


async def test_grpcurl_through_a_sidecar_pair_with_mtls(echo_apps):
    """A real gRPC tool, knowing the service only from its .proto, through both sidecars."""
    import json
    import subprocess
    from pathlib import Path

    tools = Path(__file__).resolve().parents[2] / "scripts" / "tools" / "grpcurl.sh"
    built = subprocess.run([str(tools)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    grpcurl = built.stdout.strip().splitlines()[-1]
    app = echo_apps("a")
    here = Path(__file__).parent
    async with mtls_sidecar_pair(app, "client", "client") as out_port:
        r = await trio.run_process(
            [grpcurl, "-plaintext", "-authority", "echo:9090", "-import-path", str(here), "-proto", "echo.proto",
             "-d", '{"text": "grpcurl"}', f"127.0.0.1:{out_port}", "mesh.Echo/Greet"],
            capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout) == {"text": "a: hello grpcurl"}


async def test_grpc_errors_the_proxy_answers_are_recorded_as_the_apps_are(echo_apps, tmp_path):
    """A gRPC error answered by the proxy itself (fault abort with an HTTP status, no
    upstream, no route) reaches the client as HTTP 200 trailers-only, as Envoy sends it,
    and is recorded as Istio records one: response_code 200, the gRPC status in
    grpc_response_status (and the access log's grpc_status), like the app's own
    NOT_FOUND; Mixer counts the server-side ones (UNAVAILABLE) as errors."""
    import json
    from functools import partial

    from prometheus_client.parser import text_string_to_metric_families

    from meshctl.mixer.aggregate import Aggregator
    from meshctl.proxy.accesslog import AccessLog
    from meshctl.proxy.runtime import ProxyRuntime

    app = echo_apps("a")
    dead = free_port()
    out_port = free_port()
    routes = (
        route_to("echo", 9090, match=(HTTPMatchRequest(uri=StringMatch(prefix="/mesh.Echo/Count")),),
                 fault=HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=Percent(100.0)))),
        route_to("echo", 9090, subsets={"gone": 100}, retries=HTTPRetry(attempts=0),
                 match=(HTTPMatchRequest(uri=StringMatch(prefix="/mesh.Echo/Greet")),)),
        route_to("echo", 9090, retries=HTTPRetry(attempts=0)),
    )
    never = route_to("echo", 9090, match=(HTTPMatchRequest(headers=FrozenDict({"x-never": StringMatch(exact="1")})),))
    cfg = config(listeners=[outbound_listener(out_port)], vhosts=[vhost("echo", 9090, routes), vhost("other", 9090, (never,))],
                 clusters=[cluster("echo", 9090, [("127.0.0.1", app.port)], protocol="grpc"),
                           cluster("echo", 9090, [("127.0.0.1", dead)], subset="gone", protocol="grpc")])
    rt = ProxyRuntime()
    log_path = tmp_path / "access.log"
    rt.access_log = AccessLog(log_path, flush_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(rt.run, cfg, admin_port=0, handle_signals=False))

        def calls():
            codes = []
            with _channel(out_port) as ch:
                for method, req in (("Say", b"x"), ("Say", b"not-found"), ("Count", b"1"), ("Greet", b"")):
                    try:
                        r = ch.unary_unary(f"/mesh.Echo/{method}")(req, timeout=10)
                        codes.append(grpc.StatusCode.OK if method != "Count" else r)
                    except grpc.RpcError as e:
                        codes.append(e.code())
            with grpc.insecure_channel(f"127.0.0.1:{out_port}", options=[("grpc.default_authority", "other:9090")]) as ch:
                try:
                    ch.unary_unary("/mesh.Echo/Say")(b"x", timeout=10)
                except grpc.RpcError as e:
                    codes.append(e.code())
            return codes

        codes = await _run(calls)
        with trio.fail_after(5):
            while rt.access_log.written < 5:
                await trio.sleep(0.02)
        text = rt.telemetry.render()
        rt.drain()
    S = grpc.StatusCode
    assert codes == [S.OK, S.NOT_FOUND, S.UNAVAILABLE, S.UNAVAILABLE, S.UNIMPLEMENTED]
    seen: dict[tuple[str, str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for sm in fam.samples:
            if sm.name == "istio_requests_total" and sm.labels["request_protocol"] == "grpc":
                # the whole flags: the client closing its channel once it has every answer is
                # no DC (downstream connection termination) of the answered call
                k = (sm.labels["response_code"], sm.labels["grpc_response_status"], sm.labels["response_flags"])
                seen[k] = seen.get(k, 0) + sm.value
    assert seen == {("200", "0", "-"): 1, ("200", "5", "-"): 1, ("200", "14", "FI"): 1, ("200", "14", "UF"): 1,
                    ("200", "12", "NR"): 1}, seen
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [(x["path"], x["response_code"], x["grpc_status"]) for x in lines] == [
        ("/mesh.Echo/Say", 200, "0"), ("/mesh.Echo/Say", 200, "5"), ("/mesh.Echo/Count", 200, "14"),
        ("/mesh.Echo/Greet", 200, "14"), ("/mesh.Echo/Say", 200, "12")]
    agg = Aggregator()
    agg.snapshot(40.0)
    agg.ingest("client", text)
    agg.snapshot(100.0)
    rows, _ = agg.top(60.0, now=100.0)
    (echo,) = [r for r in rows if r.service.startswith("echo.")]
    assert (echo.requests, echo.errors) == (4, 2)  # the fault abort and the unavailable upstream


async def test_grpc_errors_the_proxy_answers_over_http1_are_recorded_as_over_http2(tmp_path):
    """gRPC over HTTP/1.1 (a gRPC-Web-style or HTTP/1 bridge client): a local reply
    (fault abort, no route) goes out as HTTP 200 with grpc-status, and telemetry and the
    access log record it as over HTTP/2: response_code 200, grpc_response_status set."""
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from meshctl.proxy.accesslog import AccessLog

    from proxy_testkit import curl
    out_port = free_port()
    routes = (route_to("echo", 9090, fault=HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=Percent(100.0))),
                       match=(HTTPMatchRequest(uri=StringMatch(prefix="/mesh.Echo/Count")),)),)
    cfg = config(listeners=[outbound_listener(out_port)], vhosts=[vhost("echo", 9090, routes)],
                 clusters=[cluster("echo", 9090, [("127.0.0.1", free_port())], protocol="grpc")])
    from functools import partial

    from meshctl.proxy.runtime import ProxyRuntime

    rt = ProxyRuntime()
    log_path = tmp_path / "access.log"
    rt.access_log = AccessLog(log_path, flush_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(rt.run, cfg, admin_port=0, handle_signals=False))
        for path in ("/mesh.Echo/Count", "/mesh.Echo/Nothing"):
            r = await curl("-si", "--http1.1", "-H", "content-type: application/grpc", "-H", "te: trailers",
                           "--data-binary", "@-", "-H", "host: echo:9090", f"http://127.0.0.1:{out_port}{path}")
            assert r.stdout.startswith(b"HTTP/1.1 200"), r.stdout
        with trio.fail_after(5):
            while rt.access_log.written < 2:
                await trio.sleep(0.02)
        text = rt.telemetry.render()
        rt.drain()
    seen = {}
    for fam in text_string_to_metric_families(text):
        for sm in fam.samples:
            if sm.name == "istio_requests_total" and sm.labels["request_protocol"] == "grpc":
                seen[(sm.labels["response_code"], sm.labels["grpc_response_status"], sm.labels["response_flags"])] = sm.value
    assert seen == {("200", "14", "FI"): 1, ("200", "12", "NR"): 1}, seen
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [(x["path"], x["protocol"], x["response_code"], x["grpc_status"]) for x in lines] == [
        ("/mesh.Echo/Count", "HTTP/1.1", 200, "14"), ("/mesh.Echo/Nothing", "HTTP/1.1", 200, "12")]
