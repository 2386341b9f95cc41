"""Two sidecars (ProxyRuntimes in the test loop, real sockets) with certificates
from one CA: HTTP and opaque TCP between them is mutual TLS, the inbound side
sees the caller's SPIFFE ID (authz principals, metrics), and a caller with the
wrong identity or none is refused under STRICT."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import trio

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.model.base import FrozenDict
from meshctl.model.istio import AuthorizationPolicy, Rule, RuleFrom, Source
from meshctl.model.proxyconfig import Endpoint, Listener, Workload
from meshctl.proxy.identity import SidecarCertificates

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, route_to, running_proxy, vhost

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"
RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"


@pytest.fixture(scope="module")
def root():
    return create_root("cluster.local", datetime.now(timezone.utc) - timedelta(days=1))


def certs(ca, spiffe: str) -> SidecarCertificates:
    h = SidecarCertificates()
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), datetime.now(timezone.utc))
    h.update(leaf + ca.issuer_chain_pem, key_to_pem(key), ca.root_pem)
    return h


def server_config(app_port: int, mode: str, protocol: str = "http", policies=()):
    lp = free_port()
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=lp, protocol=protocol,
                       app_address="127.0.0.1", app_port=app_port, mtls_mode=mode)
    cfg = replace(config(listeners=[inbound]),
                  workload=Workload(name="reviews-v1-0", service="reviews", labels=FrozenDict(app="reviews")),
                  authorization=FrozenDict({f"default/p{i}": p for i, p in enumerate(policies)}))
    return cfg, lp


def client_config(server_port: int, identity: str | None):
    lp = free_port()
    ep = Endpoint("127.0.0.1", server_port, identity=identity)
    cfg = config(listeners=[outbound_listener(lp)], vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
                 clusters=[cluster("reviews", 9080, [ep])])
    return cfg, lp


async def test_http_between_sidecars_is_mtls_and_authz_sees_the_principal(upstream, root):
    only_productpage = AuthorizationPolicy(action="ALLOW", rules=(
        Rule(from_=(RuleFrom(source=Source(principals=("cluster.local/ns/default/sa/productpage",))),)),))
    scfg, sport = server_config(upstream.port, "STRICT", policies=[only_productpage])
    async with running_proxy(scfg) as server:
        server.tls = certs(root, REVIEWS)
        # productpage's sidecar: auto mTLS (no DestinationRule tls), expects reviews' identity
        ccfg, cport = client_config(sport, REVIEWS)
        async with running_proxy(ccfg) as client:
            client.tls = certs(root, PRODUCTPAGE)
            for i in range(3):
                r = await curl("-s", "-x", f"http://127.0.0.1:{cport}", f"http://reviews:9080/r{i}")
                assert json.loads(r.stdout)["path"] == f"/r{i}"
            assert upstream.connections == 1  # one pooled mTLS connection, kept alive
            # ratings is not allowed by the policy: its verified principal is not productpage
            client.tls = certs(root, RATINGS)
            client.pool.close_all()
            r = await curl("-si", "-x", f"http://127.0.0.1:{cport}", "http://reviews:9080/no")
            assert r.stdout.startswith(b"HTTP/1.1 403") and b"RBAC: access denied" in r.stdout
        metrics = server.telemetry.http
        secured = [k for k in metrics if k[-1] == "mutual_tls"]
        assert secured and {k[3] for k in secured} == {PRODUCTPAGE, RATINGS}
    assert [p for _, p, _ in upstream.requests] == ["/r0", "/r1", "/r2"]


async def test_a_sidecar_expecting_another_identity_gets_503_not_the_impostor(upstream, root):
    scfg, sport = server_config(upstream.port, "STRICT")
    async with running_proxy(scfg) as server:
        server.tls = certs(root, RATINGS)  # answers on the address where reviews should be
        ccfg, cport = client_config(sport, REVIEWS)
        async with running_proxy(ccfg) as client:
            client.tls = certs(root, PRODUCTPAGE)
            r = await curl("-si", "-x", f"http://127.0.0.1:{cport}", "http://reviews:9080/x")
            assert r.stdout.startswith(b"HTTP/1.1 503")
            assert b"ratings" in r.stdout  # the reason names who answered
    assert upstream.requests == []


async def test_plaintext_caller_reaches_permissive_but_not_strict(upstream, root):
    for mode, ok in (("PERMISSIVE", True), ("STRICT", False)):
        scfg, sport = server_config(upstream.port, mode)
        async with running_proxy(scfg) as server:
            server.tls = certs(root, REVIEWS)
            ccfg, cport = client_config(sport, REVIEWS)
            async with running_proxy(ccfg):  # no certificate: plaintext even to a sidecar
                r = await curl("-si", "-x", f"http://127.0.0.1:{cport}", f"http://reviews:9080/{mode}")
                assert r.stdout.startswith(b"HTTP/1.1 200" if ok else b"HTTP/1.1 503"), r.stdout[:200]
            if not ok:
                assert server.stats.listener("inbound").cx_tls_refused >= 1
                stats = (await curl(f"http://127.0.0.1:{server.admin_port}/stats")).stdout
                assert b'meshctl_downstream_cx_tls_refused{listener="inbound"} ' in stats


async def test_opaque_tcp_binding_rides_mtls_to_a_strict_sidecar(root):
    async def echo_len(stream):  # answers once 100,000 bytes are in (the client keeps its side open)
        data = b""
        while len(data) < 100_000:
            d = await stream.receive_some()
            if not d:
                break
            data += d
        await stream.send_all(b"len=%d" % len(data))
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, echo_len, 0)
        app_port = listeners[0].socket.getsockname()[1]
        scfg, sport = server_config(app_port, "STRICT", protocol="tcp")
        async with running_proxy(scfg) as server:
            server.tls = certs(root, REVIEWS)
            lp = free_port()
            bind = Listener(name="db", direction="binding", address="127.0.0.1", port=lp, protocol="tcp",
                            service="reviews.default.svc.cluster.local", service_port=9080)
            ep = Endpoint("127.0.0.1", sport, identity=REVIEWS)
            ccfg = config(listeners=[bind], clusters=[cluster("reviews", 9080, [ep], protocol="tcp")])
            async with running_proxy(ccfg) as client:
                client.tls = certs(root, PRODUCTPAGE)
                s = await trio.open_tcp_stream("127.0.0.1", lp)
                await s.send_all(b"q" * 100_000)
                reply = b""
                with trio.fail_after(5):
                    while True:
                        d = await s.receive_some()
                        if not d:
                            break
                        reply += d
                assert reply == b"len=100000"
                await s.aclose()
            tcp = [k for k in server.telemetry.tcp if k[0] == "destination"]
            assert tcp and tcp[0][3] == PRODUCTPAGE and tcp[0][-1] == "mutual_tls"
        n.cancel_scope.cancel()


def _send_then_fin(port: int, payload: bytes) -> bytes:
    """A raw socket client that sends everything and its FIN at once (``printf x | nc -N``),
    then reads the reply to its end."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


async def test_half_close_crosses_the_mtls_leg_and_the_reply_comes_back(root):
    # The app answers only once the client's EOF reached it; the client's sidecar
    # talks mTLS to the server's sidecar, so the EOF crosses a TLS leg both ways.
    got = []

    async def answer_at_eof(stream):
        data = b""
        while d := await stream.receive_some():
            data += d
        got.append(data)
        await stream.send_all(b"len=%d" % len(data))
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, answer_at_eof, 0)
        app_port = listeners[0].socket.getsockname()[1]
        scfg, sport = server_config(app_port, "STRICT", protocol="tcp")
        async with running_proxy(scfg) as server:
            server.tls = certs(root, REVIEWS)
            lp = free_port()
            bind = Listener(name="db", direction="binding", address="127.0.0.1", port=lp, protocol="tcp",
                            service="reviews.default.svc.cluster.local", service_port=9080)
            ep = Endpoint("127.0.0.1", sport, identity=REVIEWS)
            ccfg = config(listeners=[bind], clusters=[cluster("reviews", 9080, [ep], protocol="tcp")])
            async with running_proxy(ccfg) as client:
                client.tls = certs(root, PRODUCTPAGE)
                for payload in (b"x", b"q" * 300_000):
                    with trio.fail_after(10):
                        reply = await trio.to_thread.run_sync(_send_then_fin, lp, payload)
                    assert reply == b"len=%d" % len(payload)
                assert got == [b"x", b"q" * 300_000]
        n.cancel_scope.cancel()


def _sni_policy(*names: str) -> AuthorizationPolicy:
    from meshctl.model.istio import Condition

    return AuthorizationPolicy(action="ALLOW", rules=(Rule(when=(Condition(key="connection.sni", values=names),)),))


async def test_the_client_sidecar_sends_istios_sni_and_the_server_sees_it(upstream, root):
    """Istio mTLS carries SNI outbound_.<port>_.<subset>_.<host> (auto mTLS and ISTIO_MUTUAL),
    or the DestinationRule's ``tls.sni``: the server sidecar accepts it (identity is the
    SPIFFE ID, not the name) and matches it as connection.sni."""
    from meshctl.model.istio import ClientTLSSettings, TrafficPolicy

    istio_sni = "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
    scfg, sport = server_config(upstream.port, "STRICT", policies=[_sni_policy(istio_sni, "reviews.internal")])
    async with running_proxy(scfg) as server:
        server.tls = certs(root, REVIEWS)
        ep = Endpoint("127.0.0.1", sport, identity=REVIEWS)
        lp = free_port()
        for tls, want in ((None, istio_sni),  # auto mTLS
                          (ClientTLSSettings(mode="ISTIO_MUTUAL"), istio_sni),
                          (ClientTLSSettings(mode="ISTIO_MUTUAL", sni="reviews.internal"), "reviews.internal"),
                          (ClientTLSSettings(mode="ISTIO_MUTUAL", sni="other.internal"), None)):
            c = replace(cluster("reviews", 9080, [ep], subset="v1"),
                        traffic_policy=TrafficPolicy(tls=tls) if tls is not None else None)
            ccfg = config(listeners=[outbound_listener(lp)], clusters=[c],
                          vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080, subsets={"v1": 100}),))])
            async with running_proxy(ccfg) as client:
                client.tls = certs(root, PRODUCTPAGE)
                r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                               f"http://reviews:9080/sni?want={want}")
                # a name the server's policy does not allow: 403 (the server read it), not a failed handshake
                assert r.stdout == (b"200" if want else b"403"), (tls, r.stdout)
            lp = free_port()
    assert [p for _, p, _ in upstream.requests] == [f"/sni?want={w}" for w in (istio_sni, istio_sni, "reviews.internal")]


async def test_a_deny_on_the_sni_holds_for_http2_between_the_sidecars(upstream, root):
    """connection.sni on HTTP/2 connections (h2 / gRPC between sidecars) as on HTTP/1.1:
    a DENY on the name the client sidecar sends refuses the streams, it does not fail open."""
    from meshctl.model.istio import Condition

    istio_sni = "outbound_.9080_._.reviews.default.svc.cluster.local"
    deny = AuthorizationPolicy(action="DENY", rules=(Rule(when=(Condition(key="connection.sni", values=(istio_sni,)),)),))
    for mode, proto, policies, want in (("STRICT", "http2", (), b"200"), ("STRICT", "http2", (deny,), b"403"),
                                        ("PERMISSIVE", "grpc", (deny,), b"403")):
        scfg, sport = server_config(upstream.port, mode, policies=policies)
        async with running_proxy(scfg) as server:
            server.tls = certs(root, REVIEWS)
            lp = free_port()
            ep = Endpoint("127.0.0.1", sport, identity=REVIEWS)
            ccfg = config(listeners=[outbound_listener(lp)], clusters=[cluster("reviews", 9080, [ep], protocol=proto)],
                          vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))])
            async with running_proxy(ccfg) as client:
                client.tls = certs(root, PRODUCTPAGE)
                r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--http2-prior-knowledge",
                               f"http://127.0.0.1:{lp}/h2", "-H", "host: reviews:9080")
                assert r.stdout == want + b" 2", (policies, r.stdout, r.stderr)
