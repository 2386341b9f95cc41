"""The sidecar's side of Citadel: a key and CSR, the first certificate for a
bootstrap token (POST /v1/sign), renewals proven with the current key (POST
/v1/renew). The endpoint is meshctl/citadel/server.py.

This runs in a sidecar's certificate fetch process (citadel/fetch.py), not in
the sidecar itself, which never imports `cryptography`. No CA, token store or
HTTP server code, and no httpx (meshctl/plainhttp.py carries the two POSTs).
``CertificateSource`` does the same exchanges in the calling process (tests,
tools).
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..plainhttp import HTTPError, PlainHTTPClient
from .ca import PrivateKey, make_csr
from .errors import (
    CAError,
    CitadelError,
    CSRError,
    PeerRejected,
    TokenError,
    TokenExpired,
    TokenReused,
    TokenUnknown,
    WeakKey,
)


def make_proof(key: PrivateKey, csr_pem: bytes | str) -> str:
    """Sign the new CSR (DER) with the current key, for /v1/renew."""
    raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    data = x509.load_pem_x509_csr(raw).public_bytes(serialization.Encoding.DER)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = key.sign(data)
    return base64.b64encode(sig).decode()


_ERRORS: dict[str, type[CitadelError]] = {
    "token-reused": TokenReused,
    "token-expired": TokenExpired,
    "token-unknown": TokenUnknown,
    "weak-key": WeakKey,
    "bad-csr": CSRError,
}


async def _post(citadel_url: str, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    url = citadel_url.rstrip("/") + path
    try:
        async with PlainHTTPClient(timeout=timeout) as client:
            resp = await client.post(url, json=body)
    except HTTPError as exc:
        raise CitadelError(f"cannot reach Citadel at {citadel_url}: {type(exc).__name__}: {exc}", "unreachable") from None
    try:
        data = resp.json()
    except ValueError:
        raise CitadelError(f"Citadel at {citadel_url} answered {resp.status_code} without JSON", "bad-response") from None
    if resp.status_code != 200:
        reason = data.get("reason", "refused") if isinstance(data, dict) else "refused"
        message = data.get("error", resp.text) if isinstance(data, dict) else resp.text
        cls = _ERRORS.get(reason)
        if cls is None:
            cls = PeerRejected if resp.status_code == 403 else CAError if resp.status_code == 503 else CitadelError
        raise cls(f"Citadel refused: {message}", reason)
    for key in ("cert_chain", "root_bundle"):
        if not isinstance(data.get(key), str):
            raise CitadelError(f"Citadel at {citadel_url} answered without {key}", "bad-response")
    return data


async def request_certificate(
    citadel_url: str, token: str, key: PrivateKey, *, timeout: float = 10.0
) -> tuple[bytes, bytes]:
    """Redeem a bootstrap token: (certificate chain PEM, trust bundle PEM) for ``key``."""
    data = await _post(citadel_url, "/v1/sign", {"token": token, "csr": make_csr(key).decode()}, timeout)
    return data["cert_chain"].encode(), data["root_bundle"].encode()


async def renew_certificate(
    citadel_url: str,
    chain_pem: bytes | str,
    key: PrivateKey,
    new_key: PrivateKey,
    *,
    timeout: float = 10.0,
) -> tuple[bytes, bytes]:
    """Renew with the current certificate and key; the new one is for ``new_key``."""
    csr = make_csr(new_key)
    chain = chain_pem.decode() if isinstance(chain_pem, bytes) else chain_pem
    body = {"cert_chain": chain, "csr": csr.decode(), "proof": make_proof(key, csr)}
    data = await _post(citadel_url, "/v1/renew", body, timeout)
    return data["cert_chain"].encode(), data["root_bundle"].encode()


class CertificateSource:
    """Certificates in this process: the bootstrap token first, then renewals
    with the current certificate and a fresh key each time. ``obtain`` fits
    ``proxy.tls.keep_renewed``; a sidecar uses fetch.ChildCertificateSource,
    the same exchanges in a child process."""

    def __init__(self, citadel_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.url = citadel_url
        self._token: str | None = token
        self._key: PrivateKey | None = None
        self._chain: bytes | None = None
        self.timeout = timeout

    async def obtain(self) -> tuple[bytes, bytes, bytes]:
        """(chain PEM, key PEM, bundle PEM) for a new certificate."""
        from .ca import generate_key, key_to_pem

        new_key = generate_key()
        if self._chain is None or self._key is None:
            if self._token is None:
                raise TokenError("no bootstrap token left: the first certificate was never obtained")
            # kept until it works: a network failure did not spend it on Citadel's side
            chain, bundle = await request_certificate(self.url, self._token, new_key, timeout=self.timeout)
            self._token = None
        else:
            chain, bundle = await renew_certificate(self.url, self._chain, self._key, new_key, timeout=self.timeout)
        self._key, self._chain = new_key, chain
        return chain, key_to_pem(new_key), bundle


__all__ = ["CertificateSource", "make_proof", "renew_certificate", "request_certificate"]
