"""The sidecar's certificate holder (the TLS contexts its identity makes).

Kept apart from proxy/identity.py so that importing the data path does not
load the TLS machinery: only a sidecar that gets an identity imports this
(and even then not `cryptography`: see citadel/fetch.py and citadel/leaf.py).
"""

from __future__ import annotations

import ssl

from ..protocol.detect import UPSTREAM_ALPN
from .tls import CertificateHolder, client_context


class SidecarCertificates(CertificateHolder):
    """The sidecar's certificate holder: server contexts offer h2 and
    http/1.1, client contexts only what the upstream pool speaks. Server
    contexts send one TLS 1.3 session ticket per handshake: the client side
    (identity.UpstreamTLS) resumes with it on its next connection to the
    same sidecar. The ticket comes right behind the handshake, so a pooled
    connection has read it with its first response, long before the pool's
    liveness check could take it for unsolicited bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals = 0
        self.client_h2: ssl.SSLContext | None = None  # for HTTP/2 upstreams (h2pool): ALPN "h2"

    def update(self, chain_pem, key_pem, bundle_pem, *, verify=True, now=None) -> None:
        super().update(chain_pem, key_pem, bundle_pem, verify=verify, now=now)
        h2 = client_context(chain_pem, key_pem, bundle_pem, alpn=("h2",))
        assert self._client is not None and self._server is not None  # made by update() above
        self._client.set_alpn_protocols(list(UPSTREAM_ALPN))
        self._server.num_tickets = 1
        self.client_h2 = h2
        self.renewals = self.generation - 1
