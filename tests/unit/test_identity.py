"""proxy/identity.py: which upstreams get mTLS (Istio's DestinationRule tls and
auto mTLS), inbound STRICT/PERMISSIVE over real sockets, the upstream pool
keeping plain and mTLS connections apart, and the peer identity a request sees."""

from __future__ import annotations

import ssl
from datetime import datetime, timedelta, timezone

import pytest
import trio

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.model.istio import ClientTLSSettings, TrafficPolicy
from meshctl.model.proxyconfig import Cluster, Endpoint, Listener
from meshctl.protocol.http1 import Limits
from meshctl.core.logthrottle import LogThrottle
from meshctl.proxy.identity import (
    SecureStream,
    SidecarCertificates,
    principal_of,
    secure_inbound,
    start_identity,
    upstream_tls,
)
from meshctl.proxy.pool import UpstreamPool
from meshctl.proxy.stats import ClusterStats, Stats
from meshctl.proxy.stream import FastSocketStream, UpstreamConnectError, accept, bind_listener

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def root():
    return create_root("cluster.local", _now() - timedelta(days=1))


def certs(ca, spiffe: str) -> SidecarCertificates:
    h = SidecarCertificates()
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), _now())
    h.update(leaf + ca.issuer_chain_pem, key_to_pem(key), ca.root_pem)
    return h


class FakeRuntime:
    def __init__(self, tls=None) -> None:
        self.tls = tls
        self.stats = Stats()
        self.refusal_log = LogThrottle()


def cluster(tls: ClientTLSSettings | None = None) -> Cluster:
    return Cluster(name="outbound|9080||reviews.default.svc.cluster.local", service="reviews.default.svc.cluster.local",
                   port=9080, traffic_policy=TrafficPolicy(tls=tls) if tls else None)


SIDECAR = Endpoint("127.0.0.1", 1, identity=REVIEWS)
PLAIN = Endpoint("127.0.0.1", 1)


# ---------------------------------------------------------------- decisions


def test_auto_mtls_to_a_sidecar_endpoint_when_no_destination_rule_sets_tls(root):
    rt = FakeRuntime(certs(root, PRODUCTPAGE))
    t = upstream_tls(rt, cluster(), SIDECAR)
    assert t is not None and t.mode == "ISTIO_MUTUAL" and t.expected == {REVIEWS}
    assert upstream_tls(rt, cluster(), PLAIN) is None  # not a meshctl sidecar: plaintext


def test_no_identity_of_our_own_means_plaintext_unless_the_rule_demands_mtls():
    rt = FakeRuntime(None)
    assert upstream_tls(rt, cluster(), SIDECAR) is None
    with pytest.raises(UpstreamConnectError, match="ISTIO_MUTUAL but this sidecar has no certificate"):
        upstream_tls(rt, cluster(ClientTLSSettings(mode="ISTIO_MUTUAL")), SIDECAR)


def test_destination_rule_disable_turns_mtls_off_and_simple_uses_plain_tls(root, tmp_path):
    rt = FakeRuntime(certs(root, PRODUCTPAGE))
    assert upstream_tls(rt, cluster(ClientTLSSettings(mode="DISABLE")), SIDECAR) is None
    ca = tmp_path / "ca.pem"
    ca.write_bytes(root.root_pem)
    t = upstream_tls(rt, cluster(ClientTLSSettings(mode="SIMPLE", ca_certificates=str(ca))), PLAIN)
    assert t.mode == "SIMPLE" and t.context.verify_mode == ssl.CERT_REQUIRED
    assert t.key != upstream_tls(rt, cluster(), SIDECAR).key


def test_the_decision_follows_the_certificate_and_the_config(root):
    # asked once per request: the answer for an endpoint is kept, and still changes
    # with the sidecar's certificate holder and with a new config's objects
    rt = FakeRuntime(None)
    first = cluster()
    assert upstream_tls(rt, first, SIDECAR) is None  # no identity yet: plaintext
    rt.tls = certs(root, PRODUCTPAGE)
    t = upstream_tls(rt, first, SIDECAR)
    assert t is not None and t.mode == "ISTIO_MUTUAL" and not t.h2
    assert upstream_tls(rt, first, SIDECAR) is t
    assert upstream_tls(rt, first, SIDECAR, h2=True).h2
    assert upstream_tls(rt, cluster(ClientTLSSettings(mode="DISABLE")), SIDECAR) is None  # new config: DR DISABLE
    assert upstream_tls(rt, first, Endpoint("127.0.0.1", 1, identity=PRODUCTPAGE)).expected == {PRODUCTPAGE}


def test_simple_with_a_missing_ca_file_names_the_problem(root, tmp_path):
    rt = FakeRuntime(certs(root, PRODUCTPAGE))
    with pytest.raises(UpstreamConnectError, match="cannot load certificates"):
        upstream_tls(rt, cluster(ClientTLSSettings(mode="SIMPLE", ca_certificates=str(tmp_path / "nope.pem"))), PLAIN)


def test_principal_is_the_spiffe_id_without_its_scheme():
    assert principal_of(REVIEWS) == "cluster.local/ns/default/sa/reviews"
    assert principal_of(None) is None


async def test_no_citadel_in_the_environment_means_no_identity():
    rt = FakeRuntime()
    async with trio.open_nursery() as n:
        await n.start(start_identity, rt, {})
    assert rt.tls is None


async def test_the_bootstrap_token_is_removed_from_the_environment():
    env = {"MESHCTL_CITADEL_URL": "http://127.0.0.1:9", "MESHCTL_CITADEL_TOKEN": "secret"}
    rt = FakeRuntime()
    with trio.move_on_after(0.3):
        async with trio.open_nursery() as n:
            n.start_soon(start_identity, rt, env)
    assert "MESHCTL_CITADEL_TOKEN" not in env
    assert rt.tls is not None and not rt.tls.ready  # Citadel unreachable: no certificate, still trying


# ---------------------------------------------------------------- real sockets


async def serve_one(listener: Listener, rt, seen: list, task_status=trio.TASK_STATUS_IGNORED):
    """A tiny inbound side: secure_inbound, then answer each request with the peer's principal."""
    sock = bind_listener("127.0.0.1", 0)
    task_status.started(sock.getsockname()[1])
    async with trio.open_nursery() as n:
        while True:
            s, _ = await accept(sock)

            async def handle(s=s):
                stream = await secure_inbound(rt, listener, FastSocketStream(s))
                seen.append(stream)
                if stream is None:
                    return
                buf = b""
                while True:
                    data = await stream.receive_some()
                    if not data:
                        break
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        body = (getattr(stream, "principal", None) or "plaintext").encode()
                        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                stream.close_now()

            n.start_soon(handle)


async def get(conn) -> bytes:
    await conn.stream.send_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
    data = b""
    while not data.endswith((b"plaintext", b"reviews", b"productpage")):
        chunk = await conn.stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data


def inbound(mode: str) -> Listener:
    return Listener(name="inbound", direction="inbound", address="127.0.0.1", port=0, app_port=9080, mtls_mode=mode)


async def test_strict_refuses_plaintext_and_serves_mtls_with_the_verified_peer(root):
    server_rt = FakeRuntime(certs(root, REVIEWS))
    client_rt = FakeRuntime(certs(root, PRODUCTPAGE))
    seen: list = []
    pool = UpstreamPool(limits=Limits())
    st = ClusterStats("c")
    async with trio.open_nursery() as n:
        port = await n.start(serve_one, inbound("STRICT"), server_rt, seen)
        ep = Endpoint("127.0.0.1", port, identity=REVIEWS)
        plain = await pool.acquire("127.0.0.1", port, st, 5.0)
        assert await get(plain) == b""  # closed without an answer
        while not seen:
            await trio.sleep(0.01)
        assert seen[-1] is None and server_rt.stats.listener("inbound").cx_tls_refused == 1
        conn = await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert isinstance(conn.stream, SecureStream) and conn.stream.peer_id == REVIEWS
        assert (await get(conn)).endswith(b"\r\n\r\ncluster.local/ns/default/sa/productpage")
        assert isinstance(seen[-1], SecureStream) and seen[-1].peer_id == PRODUCTPAGE
        # kept alive and reused from the mTLS pool, never handed out for plaintext
        pool.release(conn)
        again = await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert again is conn and again.reused
        pool.release(again)
        other = await pool.acquire("127.0.0.1", port, st, 5.0)
        assert other is not conn and not isinstance(other.stream, SecureStream)
        pool.discard(other)
        pool.close_all()
        n.cancel_scope.cancel()


async def test_new_mtls_connections_resume_the_session_and_still_check_both_identities(root):
    server_rt = FakeRuntime(certs(root, REVIEWS))
    client_rt = FakeRuntime(certs(root, PRODUCTPAGE))
    seen: list = []
    pool = UpstreamPool(limits=Limits())
    st = ClusterStats("c")
    async with trio.open_nursery() as n:
        port = await n.start(serve_one, inbound("STRICT"), server_rt, seen)
        ep = Endpoint("127.0.0.1", port, identity=REVIEWS)
        first = await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert not first.stream.session_reused  # nothing to resume yet: a full handshake
        assert (await get(first)).endswith(b"productpage")  # (the session ticket came with the answer)
        second = await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert second is not first  # the first is still checked out: a new connection...
        assert second.stream.session_reused  # ...that resumed
        assert second.stream.peer_id == REVIEWS  # identity still checked, from the session's certificate
        assert (await get(second)).endswith(b"productpage")
        assert seen[-1].session_reused and seen[-1].peer_id == PRODUCTPAGE  # and on the server side too
        # a renewed certificate means a new context: its sessions start over
        client_rt.tls.update(*_issue(root, PRODUCTPAGE), root.root_pem)
        third = await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert not third.stream.session_reused and third.stream.peer_id == REVIEWS
        for c in (first, second, third):
            pool.discard(c)
        n.cancel_scope.cancel()


def _issue(ca, spiffe: str) -> tuple[bytes, bytes]:
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), _now())
    return leaf + ca.issuer_chain_pem, key_to_pem(key)


async def test_permissive_accepts_plaintext_and_mtls_on_one_port(root):
    server_rt = FakeRuntime(certs(root, REVIEWS))
    client_rt = FakeRuntime(certs(root, PRODUCTPAGE))
    seen: list = []
    pool = UpstreamPool(limits=Limits())
    st = ClusterStats("c")
    async with trio.open_nursery() as n:
        port = await n.start(serve_one, inbound("PERMISSIVE"), server_rt, seen)
        plain = await pool.acquire("127.0.0.1", port, st, 5.0)
        assert (await get(plain)).endswith(b"plaintext")
        assert type(seen[-1]) is FastSocketStream  # sniffed with MSG_PEEK: served as accepted, nothing replayed
        ep = Endpoint("127.0.0.1", port, identity=REVIEWS)
        conn = await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert (await get(conn)).endswith(b"productpage")
        pool.close_all()
        pool.discard(plain)
        pool.discard(conn)
        n.cancel_scope.cancel()


async def test_an_endpoint_presenting_another_identity_is_a_connect_failure(root):
    server_rt = FakeRuntime(certs(root, PRODUCTPAGE))  # not who the client expects
    client_rt = FakeRuntime(certs(root, REVIEWS))
    pool = UpstreamPool(limits=Limits())
    st = ClusterStats("c")
    async with trio.open_nursery() as n:
        port = await n.start(serve_one, inbound("STRICT"), server_rt, [])
        ep = Endpoint("127.0.0.1", port, identity=REVIEWS)
        with pytest.raises(UpstreamConnectError, match="mTLS") as ei:
            await pool.acquire("127.0.0.1", port, st, 5.0, upstream_tls(client_rt, cluster(), ep))
        assert "productpage" in str(ei.value)
        assert st.cx_connect_fail == 1 and st.cx_active == 0
        n.cancel_scope.cancel()


async def test_a_peer_from_another_ca_is_refused_both_ways(root):
    other = create_root("cluster.local", _now() - timedelta(days=1))
    server_rt = FakeRuntime(certs(root, REVIEWS))
    client_rt = FakeRuntime(certs(other, PRODUCTPAGE))
    seen: list = []
    pool = UpstreamPool(limits=Limits())
    async with trio.open_nursery() as n:
        port = await n.start(serve_one, inbound("STRICT"), server_rt, seen)
        ep = Endpoint("127.0.0.1", port, identity=REVIEWS)
        with pytest.raises(UpstreamConnectError, match="not trusted|refused"):
            await pool.acquire("127.0.0.1", port, ClusterStats("c"), 5.0, upstream_tls(client_rt, cluster(), ep))
        n.cancel_scope.cancel()


async def test_simple_tls_upstream_verifies_the_server_with_the_destination_rules_ca(root, tmp_path):
    """DestinationRule tls SIMPLE: one-way TLS to a server outside the mesh, its
    chain checked against caCertificates; a server from another CA is a connect failure."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(root.root_pem)
    other = create_root("cluster.local", _now() - timedelta(days=1))

    def server_ctx(ca):
        key = generate_key()
        leaf = ca.sign_csr(make_csr(key), "spiffe://cluster.local/ns/ext/sa/api", timedelta(hours=1), _now())
        chain, keyf = tmp_path / f"chain-{id(ca)}.pem", tmp_path / f"key-{id(ca)}.pem"
        chain.write_bytes(leaf + ca.issuer_chain_pem)
        keyf.write_bytes(key_to_pem(key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(chain), str(keyf))
        return ctx

    async def serve(ctx, task_status=trio.TASK_STATUS_IGNORED):
        async def handler(stream):
            tls = trio.SSLStream(stream, ctx, server_side=True)
            try:
                await tls.receive_some()
                await tls.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except trio.BrokenResourceError:
                pass
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners)

    rt = FakeRuntime(certs(root, PRODUCTPAGE))
    dr = cluster(ClientTLSSettings(mode="SIMPLE", ca_certificates=str(ca_file)))
    pool = UpstreamPool(limits=Limits())
    async with trio.open_nursery() as n:
        good = await n.start(serve, server_ctx(root))
        bad = await n.start(serve, server_ctx(other))
        conn = await pool.acquire("127.0.0.1", good, ClusterStats("c"), 5.0, upstream_tls(rt, dr, PLAIN))
        assert isinstance(conn.stream, SecureStream) and conn.stream.peer_id is None
        await conn.stream.send_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        assert (await conn.stream.receive_some()).endswith(b"ok")
        pool.discard(conn)
        with pytest.raises(UpstreamConnectError, match="TLS"):
            await pool.acquire("127.0.0.1", bad, ClusterStats("c"), 5.0, upstream_tls(rt, dr, PLAIN))
        n.cancel_scope.cancel()


async def test_alpn_says_what_the_upstream_pool_will_speak(root):
    server_rt = FakeRuntime(certs(root, REVIEWS))
    client_rt = FakeRuntime(certs(root, PRODUCTPAGE))
    seen: list = []
    async with trio.open_nursery() as n:
        port = await n.start(serve_one, inbound("STRICT"), server_rt, seen)
        ep = Endpoint("127.0.0.1", port, identity=REVIEWS)
        for h2, proto in ((False, "http/1.1"), (True, "h2")):
            t = upstream_tls(client_rt, cluster(), ep, h2=h2)
            raw = await trio_connect(port)
            s = await t.wrap(raw, "127.0.0.1", port)
            assert s.alpn == proto
            s.close_now()
        assert upstream_tls(client_rt, cluster(), ep, h2=True).key != upstream_tls(client_rt, cluster(), ep).key
        n.cancel_scope.cancel()


async def trio_connect(port: int) -> FastSocketStream:
    from meshctl.proxy.stream import connect_tcp

    return await connect_tcp("127.0.0.1", port)
