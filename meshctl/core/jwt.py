"""End-user authentication: Istio's RequestAuthentication, as a decision.

Rules (Istio's, as Envoy's jwt_authn filter carries them out for Istio):

1. The jwtRules of every RequestAuthentication that selects the workload
   apply together.
2. Where tokens are read: a rule's ``fromHeaders`` (value after ``prefix``),
   ``fromParams`` (query parameters) and ``fromCookies``; a rule that sets
   none of them reads ``Authorization: Bearer <token>`` and the
   ``access_token`` query parameter.
3. No token in any location: no identity, and the request goes on
   (an AuthorizationPolicy may then deny it, 403), unless a rule says
   ``presence: REQUIRED`` and none of the tokens is its issuer's: 401
   ``Jwt is missing``.
4. A token whose ``iss`` no rule reading that location names:
   401 ``Jwt issuer is not configured``.
5. Checks in Envoy's order, each failure a 401 with Envoy's message: format,
   issuer, time (``exp``, ``nbf``; 60 s clock skew, Envoy's default),
   audiences (when the rule lists any), key (``kid``/``alg`` against the
   JWKS), signature. The signature is checked by PyJWT with ``cryptography``
   (RS256/384/512, PS256/384/512, ES256/384/512, EdDSA); never HMAC.
6. Several tokens: each must verify; the identity is the first one's.
7. After verification the header that carried the token is removed, unless
   ``forwardOriginalToken``; ``outputPayloadToHeader`` gets the token's
   payload (base64url, as in the token); ``outputClaimToHeaders`` get claim
   values (``a.b`` for a nested claim; strings, numbers and booleans only).
   Those output headers are removed from every request first, token or
   not, so a client cannot forge them.
8. For AuthorizationPolicy, string claims named in ``spaceDelimitedClaims``
   (and always ``scope`` and ``permission``) are split on spaces into lists.
9. Verified tokens are kept in a bounded LRU keyed by the token until their
   ``exp``: a repeated valid token costs a dict lookup, not a signature check.

The decision is pure: the caller passes ``now``; keys come from the rules'
inline ``jwks`` or from ``jwks_by_uri`` (what Pilot fetched for ``jwksUri``, or
through the issuer's OpenID discovery document when neither is given).
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl

from ..model.istio import JWTRule
from .authz import RequestAuth

CLOCK_SKEW = 60.0  # Envoy jwt_authn's default clock_skew_seconds

# Envoy's (jwt_verify_lib) messages, which Istio users see in 401 bodies
MISSING = "Jwt is missing"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
BAD_HEADER = "Jwt header is an invalid JSON"
BAD_PAYLOAD = "Jwt payload is an invalid JSON"
BAD_ALG = "Jwt header [alg] is not supported"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
AUDIENCE = "Audiences in Jwt are not allowed"
NO_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
NO_VALID_KEYS = "Jwks doesn't have valid keys"
VERIFY_FAILS = "Jwt verification fails"

ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_KTY_ALGS = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "OKP": ("EdDSA",),
}
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"


@dataclass(frozen=True, slots=True)
class JwtOutcome:
    """``failure`` set: answer 401 with it. Else ``identity`` (None: no token)
    and ``headers``: the request headers to forward (token removed, claims added)."""

    identity: RequestAuth | None
    failure: str | None = None
    headers: list[tuple[str, str]] | None = None


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    algs: tuple[str, ...]
    key: Any  # a cryptography public key


def parse_jwks(text: str) -> tuple[_Key, ...]:
    """The usable public keys of a JWKS document; raises ValueError when it is
    not a JWKS at all. Keys PyJWT cannot load (or symmetric ones) are skipped."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('a JWKS is an object with a "keys" list')
    # PyJWT is imported where it is used: a proxy without RequestAuthentication never loads it
    from jwt import PyJWK
    from jwt.exceptions import PyJWKError, PyJWTError
    out = []
    for k in data["keys"]:
        if not isinstance(k, dict):
            continue
        kty = k.get("kty")
        if kty == "EC":
            alg = _EC_ALGS.get(str(k.get("crv")))
            algs: tuple[str, ...] = (alg,) if alg else ()
        else:
            algs = _KTY_ALGS.get(str(kty), ())
        if isinstance(k.get("alg"), str):
            algs = tuple(a for a in algs if a == k["alg"])
        if not algs or k.get("use", "sig") != "sig":
            continue
        try:
            jwk = PyJWK(k, algorithm=algs[0])
        except (PyJWKError, PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid = k.get("kid")
        out.append(_Key(kid if isinstance(kid, str) else None, algs, jwk.key))
    return tuple(out)


DISCOVERY = "/.well-known/openid-configuration"


def key_source(rule: JWTRule) -> str:
    """Where a rule's keys come from when they are not inline: its jwksUri, else the
    issuer's OpenID discovery document (as istiod does), by that document's URL."""
    if rule.jwks_uri:
        return rule.jwks_uri
    return rule.issuer.rstrip("/") + DISCOVERY


def _b64json(seg: str) -> Any:
    raw = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    return json.loads(raw)


class _Rule:
    __slots__ = ("spec", "keys", "headers", "params", "cookies")

    def __init__(self, spec: JWTRule, keys: tuple[_Key, ...]) -> None:
        self.spec = spec
        self.keys = keys
        if spec.from_headers or spec.from_params or spec.from_cookies:
            self.headers = tuple((h.name.lower(), h.prefix or "") for h in spec.from_headers)
            self.params = tuple(spec.from_params)
            self.cookies = tuple(spec.from_cookies)
        else:
            self.headers = (DEFAULT_HEADER,)
            self.params = (DEFAULT_PARAM,)
            self.cookies = ()


class JwtAuthenticator:
    """The jwtRules that apply to one workload, with their keys loaded once."""

    def __init__(self, rules: Sequence[JWTRule], jwks_by_uri: Mapping[str, str] = {}, cache_size: int = 1024) -> None:
        self.rules: list[_Rule] = []
        for r in rules:
            text = r.jwks if r.jwks is not None else jwks_by_uri.get(key_source(r))
            try:
                keys = parse_jwks(text) if text else ()
            except ValueError:
                keys = ()
            self.rules.append(_Rule(r, keys))
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, RequestAuth, dict[str, Any]]] = OrderedDict()
        self._required = [r for r in self.rules if (r.spec.presence or "").upper() == "REQUIRED"]
        seen_h: dict[str, None] = {}
        seen_p: dict[str, None] = {}
        seen_c: dict[str, None] = {}
        for rule in self.rules:
            for h in rule.headers:
                seen_h[h[0]] = None
            for p in rule.params:
                seen_p[p] = None
            for c in rule.cookies:
                seen_c[c] = None
        self._header_names = tuple(seen_h)
        # headers the rules write: never taken from the client (a client could forge its claims)
        self._outputs = frozenset(
            [r.spec.output_payload_to_header.lower() for r in self.rules if r.spec.output_payload_to_header]
            + [c.header.lower() for r in self.rules for c in r.spec.output_claim_to_headers]
        )
        self._params = tuple(seen_p)
        self._cookies = tuple(seen_c)

    def __bool__(self) -> bool:
        return bool(self.rules)

    # ---------------------------------------------------------------- extraction

    def _extract(self, headers: Sequence[tuple[str, str]], target: str) -> list[tuple[str, str, str, str]]:
        """(kind, name, prefix, token) for every token found, in rule order."""
        found: list[tuple[str, str, str, str]] = []
        if self._header_names:
            for name, value in headers:
                if name not in self._header_names:
                    continue
                for rule in self.rules:
                    for hname, prefix in rule.headers:
                        if hname != name:
                            continue
                        if prefix:
                            if value[: len(prefix)].lower() != prefix.lower():
                                continue
                            tok = value[len(prefix):].strip()
                        else:
                            tok = value.strip()
                        if tok and not any(f[0] == "header" and f[1] == name and f[3] == tok for f in found):
                            found.append(("header", name, prefix, tok))
        if self._params and "?" in target:
            query = target.split("?", 1)[1].split("#", 1)[0]
            for k, v in parse_qsl(query, keep_blank_values=False):
                if k in self._params and not any(f[0] == "param" and f[3] == v for f in found):
                    found.append(("param", k, "", v))
        if self._cookies:
            for name, value in headers:
                if name != "cookie":
                    continue
                for part in value.split(";"):
                    k, sep, v = part.strip().partition("=")
                    if sep and k in self._cookies and v and not any(f[0] == "cookie" and f[3] == v for f in found):
                        found.append(("cookie", k, "", v))
        return found

    def _reads(self, rule: _Rule, kind: str, name: str, prefix: str) -> bool:
        if kind == "header":
            return (name, prefix) in rule.headers
        if kind == "param":
            return name in rule.params
        return name in rule.cookies

    # ---------------------------------------------------------------- the decision

    def authenticate(self, headers: Sequence[tuple[str, str]], target: str, now: float) -> JwtOutcome:
        """Decide one request: ``headers`` with lower-case names, ``target`` the
        request target (path and query), ``now`` in Unix seconds."""
        if not self.rules:
            return JwtOutcome(None)
        found = self._extract(headers, target)
        if not found:
            if self._required:
                return JwtOutcome(None, MISSING)
            return JwtOutcome(None, None, self._sanitized(headers))
        identity: RequestAuth | None = None
        remove: set[str] = set()
        add: list[tuple[str, str]] = []
        verified: list[_Rule] = []
        for kind, name, prefix, token in found:
            res = self._verify(token, kind, name, prefix, now)
            if isinstance(res, str):
                return JwtOutcome(None, res)
            auth, rule, raw = res
            verified.append(rule)
            if identity is None:
                identity = auth
            spec = rule.spec
            if kind == "header" and not spec.forward_original_token:
                remove.add(name)
            if spec.output_payload_to_header:
                add.append((spec.output_payload_to_header.lower(), token.split(".")[1]))
            for c in spec.output_claim_to_headers:
                v = claim_value(raw, c.claim)
                if isinstance(v, bool):
                    add.append((c.header.lower(), "true" if v else "false"))
                elif isinstance(v, (str, int, float)):
                    add.append((c.header.lower(), str(v)))
        if any(r not in verified for r in self._required):
            return JwtOutcome(None, MISSING)
        out: list[tuple[str, str]] | None = None
        if remove or add or self._outputs:
            out = [(k, v) for k, v in headers if k not in remove and k not in self._outputs]
            out.extend(add)
        return JwtOutcome(identity, None, out)

    def _sanitized(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]] | None:
        if not self._outputs or not any(k in self._outputs for k, _ in headers):
            return None
        return [(k, v) for k, v in headers if k not in self._outputs]

    def _verify(self, token: str, kind: str, name: str, prefix: str, now: float) -> tuple[RequestAuth, _Rule, dict[str, Any]] | str:
        hit = self._cache.get(token)
        if hit is not None:
            expires, auth, raw = hit
            if now <= expires + CLOCK_SKEW:
                self._cache.move_to_end(token)
                rule = self._rule_for(auth.issuer, kind, name, prefix)
                if rule is not None:
                    return auth, rule, raw
            else:
                del self._cache[token]
        parts = token.split(".")
        if len(parts) != 3:
            return BAD_FORMAT
        try:
            header = _b64json(parts[0])
        except (ValueError, TypeError):
            return BAD_HEADER
        try:
            payload = _b64json(parts[1])
        except (ValueError, TypeError):
            return BAD_PAYLOAD
        if not isinstance(header, dict):
            return BAD_HEADER
        if not isinstance(payload, dict):
            return BAD_PAYLOAD
        iss = payload.get("iss")
        rule = self._rule_for(iss if isinstance(iss, str) else "", kind, name, prefix)
        if rule is None:
            return UNKNOWN_ISSUER
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            return BAD_ALG
        exp = payload.get("exp")
        nbf = payload.get("nbf")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool) and now > exp + CLOCK_SKEW:
            return EXPIRED
        if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and now + CLOCK_SKEW < nbf:
            return NOT_YET_VALID
        auds = _audiences(payload)
        allowed = rule.spec.audiences
        if allowed and not any(a in allowed for a in auds):
            return AUDIENCE
        if not rule.keys:
            return NO_VALID_KEYS
        kid = header.get("kid")
        keys = [k for k in rule.keys if alg in k.algs and (kid is None or k.kid is None or k.kid == kid)]
        if not keys:
            return NO_KEY
        import jwt as pyjwt
        from jwt.exceptions import (
            ExpiredSignatureError,
            ImmatureSignatureError,
            InvalidAudienceError,
            InvalidSignatureError,
            PyJWTError,
        )

        for key in keys:
            try:
                claims = pyjwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=None,
                    leeway=CLOCK_SKEW,
                    options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                             "verify_iss": False},
                )
            except InvalidSignatureError:
                continue
            except (ExpiredSignatureError, ImmatureSignatureError, InvalidAudienceError):  # pragma: no cover - checked above
                continue
            except PyJWTError:
                return VERIFY_FAILS
            break
        else:
            return VERIFY_FAILS
        sub = claims.get("sub")
        azp = claims.get("azp")
        split = dict(claims)
        for cname in ("scope", "permission", *rule.spec.space_delimited_claims):
            v = split.get(cname)
            if isinstance(v, str):
                split[cname] = v.split()
        auth = RequestAuth(
            principal=f"{iss}/{sub if isinstance(sub, str) else ''}",
            issuer=str(iss),
            claims=split,
            audiences=auds,
            presenter=azp if isinstance(azp, str) else "",
        )
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            self._cache[token] = (float(exp), auth, claims)
        else:
            self._cache[token] = (float("inf"), auth, claims)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return auth, rule, claims

    def _rule_for(self, issuer: str, kind: str, name: str, prefix: str) -> _Rule | None:
        for rule in self.rules:
            if rule.spec.issuer == issuer and self._reads(rule, kind, name, prefix):
                return rule
        return None


def _audiences(payload: Mapping[str, Any]) -> tuple[str, ...]:
    aud = payload.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def claim_value(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by dotted path (``a.b``); None when absent."""
    cur: Any = claims
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def unauthorized_headers(scheme: str, authority: str, target: str) -> list[tuple[str, str]]:
    """Envoy's 401 headers: the realm is the request URL without its query."""
    realm = f"{scheme or 'http'}://{authority}{target.split('?', 1)[0]}".replace('"', "%22")
    return [("content-type", "text/plain"), ("www-authenticate", f'Bearer realm="{realm}", error="invalid_token"')]
