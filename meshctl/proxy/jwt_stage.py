"""The RequestAuthentication stage: end-user JWTs (core.jwt decides).

Runs on inbound listeners before authorization, and on gateway listeners
before routing (so a policy and a route can use the claims). A request
without a token goes on with no identity; an invalid one is answered here
with 401 and Envoy's message as the body (``Jwt is expired``, ...). A valid
one leaves ``rq.auth`` (the principal and claims AuthorizationPolicy reads)
and the headers to forward (token removed unless forwardOriginalToken, claim
and payload headers added).
"""

from __future__ import annotations

import time

from ..core.jwt import unauthorized_headers
from .request import LocalReply, Request


class JwtStage:
    name = "jwt"

    async def on_request(self, rq: Request) -> LocalReply | None:
        authn = rq.snap.jwt
        if authn is None:
            return None
        out = authn.authenticate(rq.headers, rq.head.path, time.time())
        if out.failure is not None:
            rq.detail = out.failure
            head = rq.head
            return LocalReply(401, out.failure.encode(), unauthorized_headers(head.scheme, head.authority, head.path))
        if out.headers is not None:
            rq.headers = out.headers
        rq.auth = out.identity
        return None


JWT_AUTHN = JwtStage()
