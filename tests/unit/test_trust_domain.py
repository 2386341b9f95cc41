"""A certificate from another trust domain, signed by the mesh's own CA, is a
stranger (issue 13 item 10): refused by a sidecar's inbound mTLS handshake, by
an outbound one, and by Citadel's renewal, naming the trust domain."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import trio
import trio.testing

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.citadel.errors import PeerRejected, TLSError
from meshctl.citadel.identity import check_leaf, load_certificates
from meshctl.citadel.server import renew_certificate, serve
from meshctl.citadel.store import init_ca
from meshctl.proxy.tls import CertificateHolder, accept_inbound, client_handshake, server_handshake

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/productpage"
FOREIGN_PRODUCTPAGE = "spiffe://evil.example/ns/default/sa/productpage"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def root():
    return create_root("cluster.local", _now() - timedelta(days=1))


def holder_for(ca, spiffe: str) -> CertificateHolder:
    key = generate_key()
    chain = ca.sign_csr(make_csr(key), spiffe, timedelta(hours=1), _now()) + ca.issuer_chain_pem
    h = CertificateHolder()
    h.update(chain, key_to_pem(key), ca.root_pem)
    return h


async def handshake(server_ctx, client_ctx, *, inbound: bool):
    a, b = trio.testing.memory_stream_pair()
    results = {}

    async def run(name, fn):
        try:
            results[name] = await fn()
        except (TLSError, PeerRejected) as exc:
            results[name] = exc

    server = (lambda: accept_inbound(a, server_ctx, "STRICT", timeout=5)) if inbound else \
        (lambda: server_handshake(a, server_ctx, None, timeout=5))
    async with trio.open_nursery() as n:
        n.start_soon(run, "server", server)
        n.start_soon(run, "client", lambda: client_handshake(b, client_ctx, None, timeout=5))
    return results["server"], results["client"]


async def test_inbound_mtls_refuses_a_client_of_another_trust_domain_signed_by_the_mesh_ca(root):
    s, _ = await handshake(holder_for(root, REVIEWS), holder_for(root, FOREIGN_PRODUCTPAGE), inbound=True)
    assert isinstance(s, PeerRejected) and s.reason == "wrong-trust-domain"
    assert "evil.example" in str(s) and "cluster.local" in str(s)


async def test_outbound_mtls_refuses_a_server_of_another_trust_domain(root):
    _, c = await handshake(holder_for(root, FOREIGN_PRODUCTPAGE), holder_for(root, REVIEWS), inbound=False)
    assert isinstance(c, PeerRejected) and c.reason == "wrong-trust-domain"


async def test_peers_of_the_same_trust_domain_still_pass(root):
    s, c = await handshake(holder_for(root, REVIEWS), holder_for(root, PRODUCTPAGE), inbound=True)
    assert s.peer_id == PRODUCTPAGE and c.peer_id == REVIEWS


def test_check_leaf_names_the_trust_domain(root):
    key = generate_key()
    leaf = load_certificates(root.sign_csr(make_csr(key), FOREIGN_PRODUCTPAGE, timedelta(hours=1), _now()))[0]
    assert check_leaf(leaf, None, _now()) == FOREIGN_PRODUCTPAGE  # no trust domain given: not checked
    with pytest.raises(PeerRejected, match="outside this mesh's trust domain cluster.local"):
        check_leaf(leaf, None, _now(), trust_domain="cluster.local")


async def test_citadel_refuses_to_renew_a_certificate_of_another_trust_domain(tmp_path, nursery):
    ca = init_ca(tmp_path, "cluster.local", now=_now() - timedelta(minutes=5))
    port = await nursery.start(serve, tmp_path, "127.0.0.1", 0)
    key = generate_key()
    chain = ca.sign_csr(make_csr(key), FOREIGN_PRODUCTPAGE, timedelta(hours=1), _now()) + ca.issuer_chain_pem
    with pytest.raises(PeerRejected) as info:
        await renew_certificate(f"http://127.0.0.1:{port}", chain, key, generate_key())
    assert info.value.reason == "wrong-trust-domain"
