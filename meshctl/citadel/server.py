"""`meshctl citadel serve`: the signing endpoint (the client sidecars use: citadel/client.py).

    POST /v1/sign   {"token": "...", "csr": "<PEM>"}
        → {"spiffe_id", "cert_chain", "root_bundle", "ttl", "not_after"}
        First certificate: the one-time bootstrap token says who the workload is.
    POST /v1/renew  {"cert_chain": "<PEM>", "csr": "<PEM>", "proof": "<base64>"}
        → same shape. Renewal: the current, still valid certificate says who it
        is; ``proof`` is the signature of the new CSR (DER) by the current key,
        so only the holder of that key can renew that identity.
    GET  /v1/bundle → {"root_bundle"}        (after a root rotation)
    GET  /healthz   → {"ok": true, "trust_domain"}

Errors answer JSON ``{"error": message, "reason": code}``: 403 for token and
peer failures, 400 for bad CSRs, 503 when the CA cannot sign.

The endpoint speaks plain HTTP (meshctl.httpapi): bind it to loopback, or
to a private network you trust, as the tokens it receives are bearer secrets.
"""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .. import httpapi
from .ca import CA, DEFAULT_LEAF_TTL, validate_csr
from .client import CertificateSource, make_proof, renew_certificate, request_certificate
from .errors import (
    CAError,
    CitadelError,
    CSRError,
    PeerRejected,
    TokenError,
    WeakKey,
)
from .identity import as_timedelta, load_certificates, verify_peer
from .store import TokenFile, ca_dir, host_of, load_ca_from, record_issued, rotation_chain_pem, trust_bundle_pem

log = logging.getLogger("meshctl.citadel")

DEFAULT_PORT = 15012  # istiod's port for certificate signing


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _status_for(exc: CitadelError) -> int:
    if isinstance(exc, (TokenError, PeerRejected)):
        return 403
    if isinstance(exc, (CSRError, WeakKey, ValueError)):
        return 400
    return 503


class CitadelService:
    """Request handling over the CA in a state directory. Re-reads the CA when
    its files change (``citadel rotate-root`` while serving)."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        leaf_ttl: timedelta | float | None = None,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.leaf_ttl = DEFAULT_LEAF_TTL if leaf_ttl is None else as_timedelta(leaf_ttl)
        self.clock = wall_clock
        self.tokens = TokenFile(self.state_dir)
        self._ca_mtime = -1
        self._ca: CA | None = None
        try:
            self._load()
        except CAError:
            if host_of(self.state_dir) is None:
                raise
            # a joined host not approved yet: it serves, and says what it waits for (503)

    def _load(self) -> None:
        try:
            mtime = (ca_dir(self.state_dir) / "ca-cert.pem").stat().st_mtime_ns
        except FileNotFoundError:
            mtime = 0
        if self._ca is None or mtime != self._ca_mtime:
            self._ca = load_ca_from(self.state_dir)
            self._ca_mtime = mtime

    @property
    def ca(self):
        self._load()
        return self._ca

    def _issue(self, spiffe_id: str, csr_pem: str, how: str) -> dict[str, Any]:
        ca = self.ca
        td = spiffe_id[len("spiffe://"):].split("/", 1)[0]
        if td != ca.trust_domain:
            raise CSRError(f"identity {spiffe_id} is outside this CA's trust domain {ca.trust_domain}")
        now = self.clock()
        leaf_pem = ca.sign_csr(csr_pem, spiffe_id, self.leaf_ttl, now)
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        record_issued(self.state_dir, spiffe_id, leaf, how, ca.cert)
        log.info("issued %s (%s) until %s", spiffe_id, how, leaf.not_valid_after_utc.isoformat())
        return {
            "spiffe_id": spiffe_id,
            "cert_chain": (leaf_pem + ca.issuer_chain_pem + rotation_chain_pem(self.state_dir, now)).decode(),
            "root_bundle": trust_bundle_pem(self.state_dir, now).decode(),
            "ttl": int((leaf.not_valid_after_utc - now).total_seconds()),
            "not_after": leaf.not_valid_after_utc.isoformat(),
        }

    def sign(self, token: str, csr_pem: str) -> dict[str, Any]:
        """First certificate: redeem the token, sign the CSR for its identity."""
        validate_csr(csr_pem)  # a bad CSR must not burn the token,
        _ = self.ca  # nor a CA that cannot sign yet (a joined host not approved: CAError, 503)
        identity = self.tokens.redeem(token, self.clock())
        return self._issue(identity, csr_pem, "token")

    def renew(self, cert_chain_pem: str, csr_pem: str, proof_b64: str) -> dict[str, Any]:
        """Renewal: the current certificate (still valid, from our trust bundle)
        names the identity; ``proof`` shows the caller holds its key."""
        now = self.clock()
        identity = verify_peer(cert_chain_pem, trust_bundle_pem(self.state_dir, now), None, now, usage="client",
                               trust_domain=self.ca.trust_domain)
        leaf = load_certificates(cert_chain_pem)[0]
        csr = validate_csr(csr_pem)
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except (ValueError, TypeError):
            raise PeerRejected("renewal proof is not base64", "bad-proof") from None
        if not _verify_proof(leaf.public_key(), proof, csr.public_bytes(serialization.Encoding.DER)):
            raise PeerRejected(
                f"renewal proof does not verify with the key of {identity}'s current certificate", "bad-proof"
            )
        return self._issue(identity, csr_pem, "renewal")

    async def handle(self, req: httpapi.Request) -> httpapi.Response:
        try:
            if req.path == "/healthz" and req.method == "GET":
                return httpapi.Response.json({"ok": True, "trust_domain": self.ca.trust_domain})
            if req.path == "/v1/bundle" and req.method == "GET":
                return httpapi.Response.json({"root_bundle": trust_bundle_pem(self.state_dir, self.clock()).decode()})
            if req.path in ("/v1/sign", "/v1/renew"):
                if req.method != "POST":
                    return httpapi.Response.json({"error": f"use POST for {req.path}", "reason": "method"}, 405)
                body = req.json()
                if not isinstance(body, dict):
                    raise httpapi.HTTPError(400, "request body must be a JSON object")
                if req.path == "/v1/sign":
                    token, csr = _field(body, "token"), _field(body, "csr")
                    return httpapi.Response.json(self.sign(token, csr))
                chain, csr, proof = _field(body, "cert_chain"), _field(body, "csr"), _field(body, "proof")
                return httpapi.Response.json(self.renew(chain, csr, proof))
            return httpapi.Response.json({"error": f"no such endpoint: {req.method} {req.path}", "reason": "not-found"}, 404)
        except CitadelError as exc:
            log.warning("refused %s %s from %s: %s", req.method, req.path, req.peer or "?", exc)
            return httpapi.Response.json({"error": str(exc), "reason": exc.reason}, _status_for(exc))
        except httpapi.HTTPError as exc:
            return httpapi.Response.json({"error": str(exc), "reason": "bad-request"}, exc.status)


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise httpapi.HTTPError(400, f"missing or empty string field {name!r}")
    return value


def _verify_proof(public_key: object, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


async def serve(
    state_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    leaf_ttl: timedelta | float | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound port. On a joined
    host (``citadel join``), also follow the shared CA in Consul KV (hostca.follow)."""
    service = CitadelService(state_dir, leaf_ttl=leaf_ttl)
    joined = host_of(state_dir)
    if joined is None:
        await httpapi.serve(service.handle, host, port, task_status=task_status)
        return
    from .hostca import follow
    from .kv import open_kv

    kv = open_kv(joined["registry"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: follow(state_dir, kv, leaf_ttl=service.leaf_ttl))
        await httpapi.serve(service.handle, host, port, task_status=task_status)


# the client side (sidecars): meshctl/citadel/client.py, re-exported here


__all__ = [
    "CitadelService",
    "DEFAULT_PORT",
    "CertificateSource",
    "make_proof",
    "renew_certificate",
    "request_certificate",
    "serve",
]
