"""Mutual TLS between sidecars: real handshakes (memory streams and real sockets),
the SPIFFE check passing and failing, PERMISSIVE sniffing, certificate swaps."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshctl.citadel.ca import CA, create_root, generate_key, key_to_pem, make_csr, sign_intermediate
from meshctl.citadel.errors import PeerRejected, TLSError
from meshctl.proxy.tls import (
    CertificateHolder,
    accept_inbound,
    client_context,
    client_handshake,
    keep_renewed,
    renewal_time,
    server_handshake,
    sniff_tls,
)

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def root() -> CA:
    return create_root("cluster.local", _now() - timedelta(days=1))


def issue(ca: CA, spiffe: str, ttl=timedelta(hours=1), now=None) -> tuple[bytes, bytes]:
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, ttl, now or _now())
    return leaf + ca.issuer_chain_pem, key_to_pem(key)


def holder_for(ca: CA, spiffe: str, bundle: bytes | None = None) -> CertificateHolder:
    h = CertificateHolder()
    chain, key = issue(ca, spiffe)
    # bundle from another CA: an impostor's setup, which update() would refuse to load
    h.update(chain, key, bundle or ca.root_pem, verify=bundle is None)
    return h


async def pair(server_ctx, client_ctx, *, server_expect=None, client_expect=None):
    """Run both ends of a handshake over memory streams; returns (server result, client result),
    each a TLSConnection or the exception raised."""
    a, b = trio.testing.memory_stream_pair()
    results = {}

    async def run(name, fn):
        try:
            results[name] = await fn()
        except (TLSError, PeerRejected) as exc:
            results[name] = exc

    async with trio.open_nursery() as n:
        n.start_soon(run, "server", lambda: server_handshake(a, server_ctx, server_expect, timeout=5))
        n.start_soon(run, "client", lambda: client_handshake(b, client_ctx, client_expect, timeout=5))
    return results["server"], results["client"]


async def test_mutual_tls_passes_both_spiffe_checks_and_negotiates_h2(root):
    server, client = holder_for(root, REVIEWS), holder_for(root, PRODUCTPAGE)
    s, c = await pair(server, client, server_expect={PRODUCTPAGE}, client_expect={REVIEWS})
    assert s.peer_id == PRODUCTPAGE and c.peer_id == REVIEWS
    assert s.alpn == c.alpn == "h2"
    async with trio.open_nursery() as n:
        n.start_soon(c.stream.send_all, b"GET / HTTP/1.1\r\n\r\n")
        assert await s.stream.receive_some(100) == b"GET / HTTP/1.1\r\n\r\n"


async def test_client_refuses_a_server_with_the_wrong_identity(root):
    server, client = holder_for(root, "spiffe://cluster.local/ns/default/sa/ratings"), holder_for(root, PRODUCTPAGE)
    s, c = await pair(server, client, client_expect={REVIEWS})
    assert isinstance(c, PeerRejected) and c.reason == "wrong-identity"
    assert "ratings" in str(c)


async def test_server_refuses_a_client_with_the_wrong_identity(root):
    server, client = holder_for(root, REVIEWS), holder_for(root, "spiffe://cluster.local/ns/default/sa/intruder")
    s, c = await pair(server, client, server_expect={PRODUCTPAGE})
    assert isinstance(s, PeerRejected) and s.reason == "wrong-identity"


async def test_client_certificate_from_a_foreign_root_fails_the_handshake(root):
    foreign = create_root("cluster.local", _now() - timedelta(hours=1))
    server = holder_for(root, REVIEWS)
    # the intruder trusts our root (so it would accept the server) but its own cert is foreign
    client = holder_for(foreign, PRODUCTPAGE, bundle=root.root_pem)
    s, c = await pair(server, client)
    assert isinstance(s, TLSError) and "not trusted" in str(s)


async def test_server_certificate_from_a_foreign_root_fails_the_handshake(root):
    foreign = create_root("cluster.local", _now() - timedelta(hours=1))
    server = holder_for(foreign, REVIEWS, bundle=root.root_pem)
    client = holder_for(root, PRODUCTPAGE)
    s, c = await pair(server, client)
    assert isinstance(c, TLSError) and "not trusted" in str(c)


async def test_client_without_a_certificate_is_refused(root):
    server = holder_for(root, REVIEWS)
    import ssl

    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=root.root_pem.decode())
    a, b = trio.testing.memory_stream_pair()
    got = {}

    async def serve():
        try:
            await server_handshake(a, server, timeout=5)
        except TLSError as exc:
            got["error"] = exc

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        tls = trio.SSLStream(b, bare)
        try:
            await tls.do_handshake()
            await tls.receive_some(10)  # TLS 1.3: the server's refusal arrives after the client's Finished
        except trio.BrokenResourceError:
            pass
    assert "no client certificate" in str(got["error"])


async def test_expired_peer_certificate_fails_the_handshake(root):
    t = _now() - timedelta(hours=3)
    chain, key = issue(root, PRODUCTPAGE, ttl=timedelta(hours=1), now=t)
    client = CertificateHolder()
    client.update(chain, key, root.root_pem, verify=False)
    s, c = await pair(holder_for(root, REVIEWS), client)
    assert isinstance(s, TLSError) and "expired" in str(s)


async def test_two_uri_sans_pass_ssl_but_fail_meshctls_check(root):
    # ssl ignores URI SANs: only meshctl's own check can catch this one
    key = generate_key()
    now = _now()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(PRODUCTPAGE), x509.UniformResourceIdentifier(REVIEWS)]
            ),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    client = CertificateHolder()
    client.update(leaf.public_bytes(serialization.Encoding.PEM), key_to_pem(key), root.root_pem, verify=False)
    s, c = await pair(holder_for(root, REVIEWS), client, server_expect={PRODUCTPAGE})
    assert isinstance(s, PeerRejected) and s.reason == "multiple-uri-sans"


async def test_intermediate_chain_is_presented_and_verified(root):
    inter = sign_intermediate(root, _now() - timedelta(minutes=5))
    server = CertificateHolder()
    server.update(*issue(inter, REVIEWS), root.root_pem)  # chain = leaf + intermediate
    client = holder_for(root, PRODUCTPAGE)
    s, c = await pair(server, client, client_expect={REVIEWS})
    assert c.peer_id == REVIEWS


async def test_mutual_tls_over_real_sockets(root):
    server, client = holder_for(root, REVIEWS), holder_for(root, PRODUCTPAGE)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen = []

    async def handle(stream):
        conn = await server_handshake(stream, server, {PRODUCTPAGE})
        seen.append(conn.peer_id)
        data = await conn.stream.receive_some(100)
        await conn.stream.send_all(b"echo:" + data)
        await conn.stream.aclose()

    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, handle, listeners)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        conn = await client_handshake(sock, client, {REVIEWS})
        await conn.stream.send_all(b"hello")
        assert await conn.stream.receive_some(100) == b"echo:hello"
        await conn.stream.aclose()
        n.cancel_scope.cancel()
    assert seen == [PRODUCTPAGE]


# ---------------------------------------------------------------- PERMISSIVE / STRICT


def test_sniff_tls():
    assert sniff_tls(b"\x16\x03\x01\x02\x00\x01")
    assert sniff_tls(b"\x16")
    assert not sniff_tls(b"GET / HTTP/1.1\r\n")
    assert not sniff_tls(b"PRI * HTTP/2.0\r\n")
    assert not sniff_tls(b"\x16\x01")
    assert not sniff_tls(b"")


async def test_permissive_accepts_plaintext_with_its_first_bytes_intact(root):
    a, b = trio.testing.memory_stream_pair()
    await b.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    conn = await accept_inbound(a, holder_for(root, REVIEWS), "PERMISSIVE")
    assert not conn.tls and conn.peer_id is None
    got = b""
    while len(got) < 33:
        got += await conn.stream.receive_some(7)  # small reads across the replayed prefix
    assert got == b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"


async def test_permissive_and_strict_accept_mtls(root):
    server, client = holder_for(root, REVIEWS), holder_for(root, PRODUCTPAGE)
    for mode in ("PERMISSIVE", "STRICT"):
        a, b = trio.testing.memory_stream_pair()
        got = {}

        async def serve():
            got["conn"] = await accept_inbound(a, server, mode, {PRODUCTPAGE}, timeout=5)

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            await client_handshake(b, client, {REVIEWS}, timeout=5)
        assert got["conn"].tls and got["conn"].peer_id == PRODUCTPAGE


async def test_strict_refuses_plaintext_with_a_clear_error(root):
    a, b = trio.testing.memory_stream_pair()
    await b.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(TLSError, match="requires mutual TLS") as info:
        await accept_inbound(a, holder_for(root, REVIEWS), "STRICT")
    assert info.value.reason == "plaintext-on-strict"


async def test_disable_passes_the_stream_through(root):
    a, _ = trio.testing.memory_stream_pair()
    conn = await accept_inbound(a, CertificateHolder(), "DISABLE")
    assert conn.stream is a and not conn.tls


# ---------------------------------------------------------------- renewal


async def test_swapping_certificates_keeps_open_connections(root):
    server, client = holder_for(root, REVIEWS), holder_for(root, PRODUCTPAGE)
    old_serial_ctx = server.server
    s1, c1 = await pair(server, client)
    # renew: new key and certificate
    chain, key = issue(root, REVIEWS)
    server.update(chain, key, root.root_pem)
    assert server.server is not old_serial_ctx and server.generation == 2
    s2, c2 = await pair(server, client)
    assert c2.peer_id == REVIEWS
    new_der = c2.stream.getpeercert(binary_form=True)
    old_der = c1.stream.getpeercert(binary_form=True)
    assert new_der != old_der
    # the connection made before the swap still carries data both ways
    async with trio.open_nursery() as n:
        n.start_soon(c1.stream.send_all, b"still here")
        assert await s1.stream.receive_some(100) == b"still here"


def test_update_refuses_a_certificate_peers_would_refuse(root):
    foreign = create_root("cluster.local", _now() - timedelta(hours=1))
    chain, key = issue(foreign, REVIEWS)
    h = CertificateHolder()
    with pytest.raises(TLSError, match="refusing to use our own certificate") as info:
        h.update(chain, key, root.root_pem)
    assert info.value.reason == "untrusted" and not h.ready


async def test_http11_only_client_negotiates_http11(root):
    server = holder_for(root, REVIEWS)
    chain, key = issue(root, PRODUCTPAGE)
    s, c = await pair(server, client_context(chain, key, root.root_pem, alpn=("http/1.1",)))
    assert s.alpn == c.alpn == "http/1.1"


async def test_permissive_treats_a_silent_client_as_plaintext(root, autojump_clock):
    a, b = trio.testing.memory_stream_pair()
    conn = await accept_inbound(a, holder_for(root, REVIEWS), "PERMISSIVE", timeout=1.0)
    assert not conn.tls
    a2, _ = trio.testing.memory_stream_pair()
    with pytest.raises(TLSError, match="sent nothing"):
        await accept_inbound(a2, holder_for(root, REVIEWS), "STRICT", timeout=1.0)


async def test_tls_before_the_first_certificate_is_refused_and_closed(root):
    a, b = trio.testing.memory_stream_pair()
    await b.send_all(b"\x16\x03\x01\x00\x05hello")
    with pytest.raises(TLSError, match="no workload certificate yet"):
        await accept_inbound(a, CertificateHolder(), "PERMISSIVE")
    assert await b.receive_some(10) == b""  # closed, not left hanging


def test_update_refuses_a_key_that_does_not_match(root):
    chain, _ = issue(root, REVIEWS)
    h = CertificateHolder()
    with pytest.raises(TLSError, match="does not match"):
        h.update(chain, key_to_pem(generate_key()), root.root_pem)
    assert not h.ready
    with pytest.raises(TLSError, match="no workload certificate"):
        h.server


def test_renewal_time_is_half_life_with_bounded_jitter():
    nb = datetime(2026, 1, 1, tzinfo=timezone.utc)
    na = nb + timedelta(hours=24)
    times = {renewal_time(nb, na, random.Random(seed)) for seed in range(50)}
    assert len(times) > 40  # jittered
    assert all(nb + timedelta(hours=9, minutes=36) <= t <= nb + timedelta(hours=14, minutes=24) for t in times)
    assert renewal_time(nb, na, random.Random(1), jitter=0) == nb + timedelta(hours=12)


async def test_keep_renewed_fetches_now_then_at_half_life_and_retries_failures(root, autojump_clock):
    start = _now()
    t0 = trio.current_time()

    def wall() -> datetime:
        return start + timedelta(seconds=trio.current_time() - t0)

    calls = []

    async def obtain():
        calls.append(trio.current_time() - t0)
        if len(calls) == 2:
            raise ConnectionError("citadel unreachable")
        key = generate_key()
        leaf = root.sign_csr(make_csr(key), REVIEWS, timedelta(hours=2), wall())
        return leaf, key_to_pem(key), root.root_pem

    holder = CertificateHolder()
    with trio.move_on_after(2 * 3600):
        await keep_renewed(holder, obtain, random.Random(7), wall_clock=wall, retry_min=1.0)
    assert calls[0] == 0
    # second call at ~half of the 2h lifetime (±10% jitter), counted from the backdated notBefore
    assert 0.4 * 7200 - 60 <= calls[1] <= 0.6 * 7200
    assert calls[2] == pytest.approx(calls[1] + 1.0, abs=0.01)  # failure retried after backoff
    assert holder.identity == REVIEWS and holder.generation >= 2


async def test_inbound_mtls_over_a_socket_records_the_sni_the_client_sent(root):
    # what AuthorizationPolicy's connection.sni reads: the server name of the ClientHello
    from meshctl.proxy.stream import FastSocketStream, accept, bind_listener, connect_tcp

    server, client = holder_for(root, REVIEWS), holder_for(root, PRODUCTPAGE)
    lsock = bind_listener("127.0.0.1", 0)
    port = lsock.getsockname()[1]
    got = []
    try:
        for name in ("reviews.default.svc.cluster.local", None):
            async with trio.open_nursery() as n:
                async def serve():
                    sock, _ = await accept(lsock)
                    conn = await accept_inbound(FastSocketStream(sock), server, "STRICT", {PRODUCTPAGE}, timeout=5)
                    got.append((conn.peer_id, conn.stream.sni))
                    await conn.stream.aclose()

                n.start_soon(serve)
                raw = await connect_tcp("127.0.0.1", port)
                conn = await client_handshake(raw, client, {REVIEWS}, server_hostname=name)
                await conn.stream.aclose()
    finally:
        lsock.close()
    assert got == [(PRODUCTPAGE, "reviews.default.svc.cluster.local"), (PRODUCTPAGE, None)]
