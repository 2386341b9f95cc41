"""RequestAuthentication decisions (core.jwt) with Istio's own JWT samples
(tests/data/istio-jwt: jwks.json, demo.jwt, groups-scope.jwt, unchanged) and
tokens signed here with keys made for the test."""

from __future__ import annotations

import json
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshctl.core import jwt as J
from meshctl.core.jwt import JwtAuthenticator
from meshctl.model.istio import ClaimToHeader, JWTHeader, JWTRule

SAMPLES = Path(__file__).parents[1] / "data" / "istio-jwt"
ISS = "testing@secure.istio.io"
JWKS = (SAMPLES / "jwks.json").read_text()
DEMO = (SAMPLES / "demo.jwt").read_text().strip()
GROUPS = (SAMPLES / "groups-scope.jwt").read_text().strip()
NOW = 1_700_000_000.0


def bearer(token: str) -> list[tuple[str, str]]:
    return [("host", "x"), ("authorization", f"Bearer {token}")]


def auth(rules, headers, target="/", now=NOW, jwks_by_uri=None):
    return JwtAuthenticator(rules, jwks_by_uri or {}).authenticate(headers, target, now)


ISTIO_RULE = JWTRule(issuer=ISS, jwks=JWKS)


def test_istio_demo_token_verifies_and_names_the_principal():
    out = auth([ISTIO_RULE], bearer(DEMO))
    assert out.failure is None
    assert out.identity is not None and out.identity.principal == f"{ISS}/{ISS}"
    assert out.identity.claims["foo"] == "bar"
    # the token is removed before forwarding (forwardOriginalToken defaults to false)
    assert out.headers == [("host", "x")]


def test_groups_claim_of_istio_sample():
    out = auth([ISTIO_RULE], bearer(GROUPS))
    assert out.identity is not None and out.identity.claims["groups"] == ["group1", "group2"]


def test_no_token_passes_without_identity():
    out = auth([ISTIO_RULE], [("host", "x")])
    assert out.failure is None and out.identity is None and out.headers is None
    out = auth([ISTIO_RULE], [("authorization", "Basic dXNlcjpwYXNz")])  # not a bearer token
    assert out.failure is None and out.identity is None


def test_tampered_token_fails_verification():
    h, p, s = DEMO.split(".")
    claims = json.loads(pyjwt.utils.base64url_decode(p))
    claims["sub"] = "admin"
    forged = ".".join((h, pyjwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), s))
    assert auth([ISTIO_RULE], bearer(forged)).failure == "Jwt verification fails"
    assert auth([ISTIO_RULE], bearer(DEMO[:-4] + "AAAA")).failure == "Jwt verification fails"
    assert auth([ISTIO_RULE], bearer("not-a-jwt")).failure == J.BAD_FORMAT


def test_unknown_issuer_is_rejected():
    out = auth([JWTRule(issuer="someone-else", jwks=JWKS)], bearer(DEMO))
    assert out.failure == "Jwt issuer is not configured"


# ---------------------------------------------------------------- tokens made here


def _rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_of(*pairs) -> str:
    keys = []
    for kid, pub in pairs:
        if isinstance(pub, rsa.RSAPublicKey):
            d = RSAAlgorithm.to_jwk(pub, as_dict=True)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            d = ECAlgorithm.to_jwk(pub, as_dict=True)
        else:
            d = OKPAlgorithm.to_jwk(pub, as_dict=True)
        keys.append({**d, "kid": kid})
    return json.dumps({"keys": keys})


RSA_KEY = _rsa()


def token(key=RSA_KEY, alg="RS256", kid="k1", **claims) -> str:
    body = {"iss": "https://issuer.example", "sub": "alice", "exp": NOW + 3600, **claims}
    return pyjwt.encode(body, key, algorithm=alg, headers={"kid": kid})


MY_RULE = JWTRule(issuer="https://issuer.example", jwks=jwks_of(("k1", RSA_KEY.public_key())))


def test_expired_and_not_yet_valid_tokens():
    assert auth([MY_RULE], bearer(token(exp=NOW - 3600))).failure == "Jwt is expired"
    assert auth([MY_RULE], bearer(token(exp=NOW - 30))).failure is None  # within Envoy's 60 s clock skew
    assert auth([MY_RULE], bearer(token(nbf=NOW + 3600))).failure == "Jwt not yet valid"


def test_wrong_key_is_rejected():
    other = _rsa()
    assert auth([MY_RULE], bearer(token(key=other))).failure == "Jwt verification fails"
    assert auth([MY_RULE], bearer(token(key=other, kid="k9"))).failure == J.NO_KEY


@pytest.mark.parametrize(
    "alg,make",
    [
        ("RS384", _rsa), ("RS512", _rsa), ("PS256", _rsa),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("ES384", lambda: ec.generate_private_key(ec.SECP384R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    ],
)
def test_algorithms(alg, make):
    key = make()
    rule = JWTRule(issuer="https://issuer.example", jwks=jwks_of(("k1", key.public_key())))
    out = auth([rule], bearer(token(key=key, alg=alg)))
    assert out.failure is None and out.identity is not None and out.identity.principal == "https://issuer.example/alice"


def test_hmac_token_cannot_use_the_public_key_as_secret():
    n = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)["n"]  # public, so anyone could sign with it
    forged = pyjwt.encode({"iss": "https://issuer.example", "sub": "x"}, n.encode(), algorithm="HS256",
                          headers={"kid": "k1"})
    assert auth([MY_RULE], bearer(forged)).failure == J.BAD_ALG


def test_audiences():
    rule = JWTRule(issuer="https://issuer.example", audiences=("bookinfo.com",), jwks=MY_RULE.jwks)
    assert auth([rule], bearer(token(aud=["x", "bookinfo.com"]))).failure is None
    assert auth([rule], bearer(token(aud="other"))).failure == "Audiences in Jwt are not allowed"
    assert auth([rule], bearer(token())).failure == "Audiences in Jwt are not allowed"


def test_locations_prefix_params_cookies():
    rule = JWTRule(
        issuer="https://issuer.example", jwks=MY_RULE.jwks,
        from_headers=(JWTHeader("x-jwt-assertion", "Token "),), from_params=("my_token",), from_cookies=("session",),
    )
    t = token()
    assert auth([rule], [("x-jwt-assertion", f"Token {t}")]).identity is not None
    assert auth([rule], [], target=f"/p?a=1&my_token={t}").identity is not None
    assert auth([rule], [("cookie", f"a=b; session={t}")]).identity is not None
    # the default locations are not read when a rule names its own
    assert auth([rule], bearer(t)).identity is None
    assert auth([rule], [], target=f"/p?access_token={t}").identity is None
    # the default ones: Authorization Bearer and ?access_token
    assert auth([MY_RULE], [], target=f"/p?access_token={t}").identity is not None


def test_output_headers_and_forward_original_token():
    rule = JWTRule(
        issuer="https://issuer.example", jwks=MY_RULE.jwks, forward_original_token=True,
        output_payload_to_header="x-jwt-payload",
        output_claim_to_headers=(ClaimToHeader("x-jwt-group", "group"), ClaimToHeader("x-jwt-org", "org.name")),
    )
    t = token(group="admins", org={"name": "acme"})
    out = auth([rule], bearer(t) + [("x-jwt-group", "spoofed")])
    hdrs = dict(out.headers)
    assert hdrs["authorization"] == f"Bearer {t}"
    assert hdrs["x-jwt-group"] == "admins" and hdrs["x-jwt-org"] == "acme"
    assert json.loads(pyjwt.utils.base64url_decode(hdrs["x-jwt-payload"]))["sub"] == "alice"
    assert [k for k, _ in out.headers].count("x-jwt-group") == 1
    # without a token (or without that claim) a client cannot forge them either
    out = auth([rule], [("host", "x"), ("x-jwt-group", "admins"), ("x-jwt-payload", "e30")])
    assert out.identity is None and out.headers == [("host", "x")]
    out = auth([rule], bearer(token()) + [("x-jwt-group", "admins")])
    assert "x-jwt-group" not in dict(out.headers)


def test_jwks_uri_keys_come_from_what_pilot_fetched():
    rule = JWTRule(issuer="https://issuer.example", jwks_uri="http://keys/jwks.json")
    assert auth([rule], bearer(token())).failure == J.NO_VALID_KEYS  # not fetched (yet)
    assert auth([rule], bearer(token()), jwks_by_uri={"http://keys/jwks.json": MY_RULE.jwks}).failure is None
    oidc = JWTRule(issuer="https://issuer.example")  # no jwks, no jwksUri: OpenID discovery (Pilot)
    found = {"https://issuer.example/.well-known/openid-configuration": MY_RULE.jwks}
    assert auth([oidc], bearer(token()), jwks_by_uri=found).failure is None


def test_valid_tokens_are_cached_until_they_expire(monkeypatch):
    a = JwtAuthenticator([MY_RULE])
    t = token(exp=NOW + 100)
    assert a.authenticate(bearer(t), "/", NOW).identity is not None
    # a cached token is not verified again: counted signature checks, not a timing that a
    # loaded machine can stretch (the per-request time stood in for this before)
    decodes: list[str] = []
    real_decode = pyjwt.decode

    def counting_decode(*args, **kw):
        decodes.append("decode")
        return real_decode(*args, **kw)

    monkeypatch.setattr(pyjwt, "decode", counting_decode)
    for _ in range(1000):
        out = a.authenticate(bearer(t), "/", NOW)
    assert out.identity is not None
    assert decodes == []  # a dict lookup, not an RSA verification
    other = token(exp=NOW + 100, jti="other")
    assert a.authenticate(bearer(other), "/", NOW).identity is not None
    assert decodes == ["decode"]  # the count sees a verification when there is one
    assert a.authenticate(bearer(t), "/", NOW + 100 + 61).failure == "Jwt is expired"
    small = JwtAuthenticator([MY_RULE], cache_size=2)
    for i in range(5):
        small.authenticate(bearer(token(jti=str(i))), "/", NOW)
    assert len(small._cache) == 2


def test_presence_required_and_space_delimited_claims():
    rule = JWTRule(issuer="https://issuer.example", jwks=MY_RULE.jwks, presence="REQUIRED",
                   space_delimited_claims=("roles",))
    assert auth([rule], [("host", "x")]).failure == "Jwt is missing"
    out = auth([rule], bearer(token(scope="read write", roles="a b", name="Ann Lee")))
    assert out.failure is None and out.identity is not None
    claims = out.identity.claims
    assert claims["scope"] == ["read", "write"] and claims["roles"] == ["a", "b"] and claims["name"] == "Ann Lee"
    # a token of another (optional) rule does not satisfy the required one
    other = JWTRule(issuer=ISS, jwks=JWKS)
    assert auth([rule, other], bearer(DEMO)).failure == "Jwt is missing"
