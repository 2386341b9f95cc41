"""Citadel's signing endpoint over real sockets, driven by the client sidecars use."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from meshctl.citadel.ca import create_root, generate_key, make_csr
from meshctl.citadel.errors import PeerRejected, TokenExpired, TokenReused, TokenUnknown, WeakKey
from meshctl.citadel.identity import uri_sans, verify_peer
from meshctl.citadel.server import (
    CertificateSource,
    make_proof,
    renew_certificate,
    request_certificate,
    serve,
)
from meshctl.citadel.store import TokenFile, init_ca, latest_by_identity
from meshctl.proxy.tls import CertificateHolder, client_handshake, server_handshake

TD = "cluster.local"
REVIEWS = f"spiffe://{TD}/ns/default/sa/reviews"
PRODUCTPAGE = f"spiffe://{TD}/ns/default/sa/productpage"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
async def citadel(tmp_path, nursery):
    ca = init_ca(tmp_path, TD, now=_now() - timedelta(minutes=5))
    port = await nursery.start(serve, tmp_path, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}", tmp_path, ca


def token(state_dir, identity=REVIEWS, ttl=600, now=None):
    return TokenFile(state_dir).issue_token(identity, ttl, now or _now())


async def test_token_buys_a_certificate_for_the_tokens_identity_only(citadel):
    url, sd, ca = citadel
    key = generate_key()
    chain, bundle = await request_certificate(url, token(sd), key)
    leaf = x509.load_pem_x509_certificate(chain)
    assert uri_sans(leaf) == [REVIEWS]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert bundle == ca.root_pem
    assert verify_peer(chain, bundle, {REVIEWS}, _now()) == REVIEWS
    assert latest_by_identity(sd)[REVIEWS]["how"] == "token"


async def test_csr_claims_are_ignored(citadel):
    import httpx

    url, sd, _ = citadel
    csr = make_csr(generate_key(), "spiffe://cluster.local/ns/istio-system/sa/admin")
    async with httpx.AsyncClient() as c:
        r = await c.post(url + "/v1/sign", json={"token": token(sd), "csr": csr.decode()})
    assert r.status_code == 200
    assert r.json()["spiffe_id"] == REVIEWS
    assert uri_sans(x509.load_pem_x509_certificate(r.json()["cert_chain"].encode())) == [REVIEWS]


async def test_token_reuse_expiry_and_foreign_tokens_are_refused(citadel, tmp_path_factory):
    url, sd, _ = citadel
    tok = token(sd)
    await request_certificate(url, tok, generate_key())
    with pytest.raises(TokenReused, match="already redeemed"):
        await request_certificate(url, tok, generate_key())
    old = token(sd, ttl=60, now=_now() - timedelta(minutes=5))
    with pytest.raises(TokenExpired):
        await request_certificate(url, old, generate_key())
    other_mesh = tmp_path_factory.mktemp("other")
    init_ca(other_mesh, TD, now=_now())
    with pytest.raises(TokenUnknown, match="not issued by this Citadel"):
        await request_certificate(url, token(other_mesh), generate_key())


async def test_weak_csr_is_refused_without_spending_the_token(citadel):
    url, sd, _ = citadel
    tok = token(sd)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(WeakKey, match="RSA 1024"):
        await request_certificate(url, tok, weak)
    chain, _ = await request_certificate(url, tok, generate_key())
    assert uri_sans(x509.load_pem_x509_certificate(chain)) == [REVIEWS]


async def test_renewal_needs_the_current_key(citadel):
    url, sd, _ = citadel
    key = generate_key()
    chain, _ = await request_certificate(url, token(sd), key)
    new_key = generate_key()
    chain2, _ = await renew_certificate(url, chain, key, new_key)
    leaf2 = x509.load_pem_x509_certificate(chain2)
    assert uri_sans(leaf2) == [REVIEWS]
    assert leaf2.public_key().public_numbers() == new_key.public_key().public_numbers()
    # someone who copied the certificate (public) but not the key cannot renew it
    with pytest.raises(PeerRejected, match="proof does not verify") as info:
        await renew_certificate(url, chain, generate_key(), generate_key())
    assert info.value.reason == "bad-proof"


async def test_renewal_with_a_foreign_certificate_is_refused(citadel):
    url, _, _ = citadel
    foreign = create_root(TD, _now() - timedelta(hours=1))
    key = generate_key()
    chain = foreign.sign_csr(make_csr(key), PRODUCTPAGE, None, _now())
    with pytest.raises(PeerRejected) as info:
        await renew_certificate(url, chain, key, generate_key())
    assert info.value.reason == "untrusted"


async def test_proof_is_bound_to_the_csr():
    key = generate_key()
    a, b = make_csr(generate_key()), make_csr(generate_key())
    assert make_proof(key, a) != make_proof(key, b)


async def test_unreachable_citadel_is_a_clear_error():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(Exception, match=f"cannot reach Citadel at http://127.0.0.1:{port}"):
        await request_certificate(f"http://127.0.0.1:{port}", "mct_x", generate_key(), timeout=2)


async def test_two_sidecars_bootstrap_and_talk_mtls(citadel):
    url, sd, _ = citadel
    holders = {}
    for ident in (REVIEWS, PRODUCTPAGE):
        src = CertificateSource(url, token(sd, ident))
        h = CertificateHolder()
        h.update(*await src.obtain())
        h.update(*await src.obtain())  # a renewal, authenticated by the first certificate
        assert h.generation == 2 and h.identity == ident
        holders[ident] = h
    a, b = trio.testing.memory_stream_pair()
    got = {}

    async def srv():
        got["s"] = await server_handshake(a, holders[REVIEWS], {PRODUCTPAGE}, timeout=5)

    async with trio.open_nursery() as n:
        n.start_soon(srv)
        c = await client_handshake(b, holders[PRODUCTPAGE], {REVIEWS}, timeout=5)
    assert c.peer_id == REVIEWS and got["s"].peer_id == PRODUCTPAGE
    assert [r["how"] for r in latest_by_identity(sd).values()] == ["renewal", "renewal"]


async def test_bundle_and_health_endpoints(citadel):
    import httpx

    url, _, ca = citadel
    async with httpx.AsyncClient() as c:
        assert (await c.get(url + "/v1/bundle")).json()["root_bundle"] == ca.root_pem.decode()
        assert (await c.get(url + "/healthz")).json() == {"ok": True, "trust_domain": TD}
        r = await c.post(url + "/v1/sign", json={"csr": "x"})
        assert r.status_code == 400 and "token" in r.json()["error"]
        assert (await c.get(url + "/v1/sign")).status_code == 405


async def test_root_rotation_does_not_break_peers_that_have_not_renewed(citadel):
    from meshctl.citadel.store import rotate_root

    url, sd, old_ca = citadel

    async def sidecar(ident):
        h = CertificateHolder()
        h.update(*await CertificateSource(url, token(sd, ident)).obtain())
        return h

    before = await sidecar(PRODUCTPAGE)  # trusts only the old root
    assert before.bundle_pem == old_ca.root_pem
    rotate_root(sd, _now(), overlap=timedelta(hours=48))  # while Citadel is serving
    after = await sidecar(REVIEWS)  # signed by the new root, trusts both
    assert x509.load_pem_x509_certificate(after.bundle_pem) != old_ca.root
    for server, client, sid, cid in ((after, before, REVIEWS, PRODUCTPAGE), (before, after, PRODUCTPAGE, REVIEWS)):
        a, b = trio.testing.memory_stream_pair()
        got = {}

        async def srv():
            got["s"] = await server_handshake(a, server, {cid}, timeout=5)

        async with trio.open_nursery() as n:
            n.start_soon(srv)
            c = await client_handshake(b, client, {sid}, timeout=5)
        assert c.peer_id == sid and got["s"].peer_id == cid
