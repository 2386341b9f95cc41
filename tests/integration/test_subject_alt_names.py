"""subjectAltNames: the names an upstream's certificate must carry one of.

- DestinationRule ``tls.subjectAltNames`` (SIMPLE / MUTUAL, TLS origination): the
  server certificate's chain is checked against caCertificates and its names
  against the list, which replaces the host name check (as Envoy's SAN matchers
  do); a server with none of them is a connect failure (503).
- ServiceEntry ``subjectAltNames``: the same for the entry's endpoints; under
  mutual TLS (ISTIO_MUTUAL) the SPIFFE IDs the peer may present.
Real TLS servers on real sockets, through a real proxy."""

from __future__ import annotations

import ssl
from datetime import datetime, timedelta, timezone

import pytest
import trio

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.istio import ClientTLSSettings, TrafficPolicy
from meshctl.model.proxyconfig import Cluster, Endpoint, Listener, Workload
from meshctl.pilot.compile import Inputs, Node, compile_proxy
from meshctl.protocol.http1 import Limits
from meshctl.proxy.identity import SidecarCertificates, upstream_tls
from meshctl.proxy.pool import UpstreamPool
from meshctl.proxy.stats import ClusterStats
from meshctl.proxy.stream import UpstreamConnectError

from proxy_testkit import curl, free_port, running_proxy

API = "spiffe://cluster.local/ns/ext/sa/api"

RULES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: secure-api
spec:
  hosts: [api.secure.example]
  location: MESH_EXTERNAL
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: {port}}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
{entry_sans}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: secure-api
spec:
  host: api.secure.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {ca}
{dr_sans}"""


@pytest.fixture(scope="module")
def root():
    return create_root("cluster.local", datetime.now(timezone.utc) - timedelta(days=1))


def _server_ctx(ca, tmp_path, spiffe: str = API) -> ssl.SSLContext:
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), datetime.now(timezone.utc))
    chain, keyf = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(leaf + ca.issuer_chain_pem)
    keyf.write_bytes(key_to_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain), str(keyf))
    return ctx


async def _tls_server(ctx, task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream):
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.receive_some()
            await tls.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


def _config(rules: str, listen: int):
    resources = load_resources_text(rules, "sans.yaml")
    findings = validate(resources)
    assert not has_errors(findings), [str(f) for f in findings]
    node = Node(Workload(name="sleep-0", service="sleep"),
                (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=listen),))
    return compile_proxy(Inputs(resources, {}), node)


def _sans(indent: str, names: list[str]) -> str:
    return f"{indent}subjectAltNames:\n" + "".join(f"{indent}- {n}\n" for n in names) if names else ""


@pytest.mark.parametrize("where", ["DestinationRule", "ServiceEntry"])
async def test_tls_origination_checks_the_servers_names_against_subject_alt_names(root, tmp_path, where):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(root.root_pem)
    async with trio.open_nursery() as n:
        port = await n.start(_tls_server, _server_ctx(root, tmp_path))
        for names, want in (([API], b"200"), (["spiffe://cluster.local/ns/ext/sa/other", API], b"200"),
                            (["spiffe://cluster.local/ns/ext/sa/other"], b"503"), (["api.secure.example"], b"503")):
            rules = RULES.format(port=port, ca=ca, entry_sans=_sans("  ", names) if where == "ServiceEntry" else "",
                                 dr_sans=_sans("      ", names) if where == "DestinationRule" else "")
            lp = free_port()
            async with running_proxy(_config(rules, lp)):
                r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                               "http://api.secure.example/")
                assert r.stdout == want, (names, r.stdout)
        n.cancel_scope.cancel()


async def test_without_subject_alt_names_the_host_name_is_not_checked_and_with_them_the_list_replaces_sni(root, tmp_path):
    # the certificate names no DNS host: a SAN list is what makes its name checked at all
    ca = tmp_path / "ca.pem"
    ca.write_bytes(root.root_pem)
    pool = UpstreamPool(limits=Limits())
    plain = Endpoint("127.0.0.1", 1)
    async with trio.open_nursery() as n:
        port = await n.start(_tls_server, _server_ctx(root, tmp_path))
        sni_only = Cluster(name="c", service="api.secure.example", port=80, traffic_policy=TrafficPolicy(
            tls=ClientTLSSettings(mode="SIMPLE", ca_certificates=str(ca), sni="wrong.example")))
        with pytest.raises(UpstreamConnectError):  # sni given: the host name is checked, and is not in the cert
            await pool.acquire("127.0.0.1", port, ClusterStats("c"), 5.0, upstream_tls(None, sni_only, plain))
        with_sans = Cluster(name="c", service="api.secure.example", port=80, traffic_policy=TrafficPolicy(
            tls=ClientTLSSettings(mode="SIMPLE", ca_certificates=str(ca), sni="wrong.example", subject_alt_names=(API,))))
        conn = await pool.acquire("127.0.0.1", port, ClusterStats("c"), 5.0, upstream_tls(None, with_sans, plain))
        pool.discard(conn)
        n.cancel_scope.cancel()


async def test_under_mutual_tls_an_entrys_subject_alt_names_are_the_spiffe_ids_the_peer_may_present(root):
    from test_mtls_pair import certs, server_config

    ratings = "spiffe://cluster.local/ns/default/sa/ratings"
    reviews = "spiffe://cluster.local/ns/default/sa/reviews"
    pool = UpstreamPool(limits=Limits())

    class Rt:
        tls = certs(root, "spiffe://cluster.local/ns/default/sa/productpage")

    async with trio.open_nursery() as n:
        scfg, sport = server_config(free_port(), "STRICT")
        async with running_proxy(scfg) as server:
            server.tls = certs(root, reviews)
            ep = Endpoint("127.0.0.1", sport, identity=reviews)
            allowed = Cluster(name="c", service="reviews", port=9080, subject_alt_names=(ratings, reviews))
            conn = await pool.acquire("127.0.0.1", sport, ClusterStats("c"), 5.0, upstream_tls(Rt, allowed, ep))
            pool.discard(conn)
            only_ratings = Cluster(name="c", service="reviews", port=9080, subject_alt_names=(ratings,))
            with pytest.raises(UpstreamConnectError):
                await pool.acquire("127.0.0.1", sport, ClusterStats("c"), 5.0, upstream_tls(Rt, only_ratings, ep))
        n.cancel_scope.cancel()
