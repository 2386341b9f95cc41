from __future__ import annotations

import itertools
import random

from meshctl.protocol.headers import (
    HOP_BY_HOP,
    append_forwarded_for,
    ensure_request_id,
    strip_hop_by_hop,
)


def test_strip_removes_fixed_hop_by_hop_set():
    headers = [(name, "x") for name in sorted(HOP_BY_HOP)] + [("x-keep", "1"), ("host", "a")]
    assert strip_hop_by_hop(headers) == [("x-keep", "1"), ("host", "a")]


def test_strip_removes_headers_named_in_connection():
    headers = [
        ("connection", "keep-alive, X-Secret"),
        ("connection", "x-other"),
        ("x-secret", "s"),
        ("x-other", "o"),
        ("x-forwarded-for", "1.2.3.4"),
    ]
    assert strip_hop_by_hop(headers) == [("x-forwarded-for", "1.2.3.4")]


def test_strip_keeps_te_trailers_for_grpc_only():
    assert strip_hop_by_hop([("te", "trailers"), ("a", "b")]) == [("te", "trailers"), ("a", "b")]
    assert strip_hop_by_hop([("te", "gzip, trailers")]) == [("te", "trailers")]
    assert strip_hop_by_hop([("te", "gzip")]) == []


def test_strip_keep_upgrade_keeps_the_upgrade_pair():
    headers = [("connection", "Upgrade, keep-alive"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        ("upgrade", "websocket"),
        ("sec-websocket-key", "k"),
        ("connection", "upgrade"),
    ]
    assert strip_hop_by_hop(headers) == [("sec-websocket-key", "k")]


def test_strip_does_not_alias_its_input():
    headers = [("a", "1")]
    out = strip_hop_by_hop(headers)
    out.append(("b", "2"))
    assert headers == [("a", "1")]


def test_append_forwarded_for():
    assert append_forwarded_for([("a", "1")], "10.0.0.1") == [("a", "1"), ("x-forwarded-for", "10.0.0.1")]
    assert append_forwarded_for([("x-forwarded-for", "1.1.1.1")], "10.0.0.1") == [
        ("x-forwarded-for", "1.1.1.1, 10.0.0.1")
    ]
    folded = append_forwarded_for(
        [("x-forwarded-for", "1.1.1.1"), ("b", "2"), ("x-forwarded-for", "2.2.2.2")], "10.0.0.1"
    )
    assert folded == [("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.1"), ("b", "2")]


def test_ensure_request_id_keeps_existing_and_adds_missing():
    calls = []

    def new_id():
        calls.append(1)
        return "generated-1"

    headers, rid = ensure_request_id([("x-request-id", "abc")], new_id)
    assert rid == "abc" and headers == [("x-request-id", "abc")] and not calls
    headers, rid = ensure_request_id([("a", "b")], new_id)
    assert rid == "generated-1" and headers == [("a", "b"), ("x-request-id", "generated-1")]
    headers, rid = ensure_request_id([("x-request-id", " ")], new_id)
    assert rid == "generated-1" and headers == [("x-request-id", "generated-1")]


def test_trusted_client_address_counts_trusted_proxies_from_the_right():
    from meshctl.protocol.headers import trusted_client_address

    xff = [("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("x-forwarded-for", "3.3.3.3")]
    assert trusted_client_address(xff, "9.9.9.9", 0) == "9.9.9.9"
    assert trusted_client_address(xff, "9.9.9.9", 1) == "3.3.3.3"
    assert trusted_client_address(xff, "9.9.9.9", 3) == "1.1.1.1"
    assert trusted_client_address(xff, "9.9.9.9", 4) == "9.9.9.9"  # fewer addresses than trusted hops
    assert trusted_client_address([], "9.9.9.9", 1) == "9.9.9.9"


def test_prepare_request_headers_is_strip_then_forwarded_for_then_request_id():
    """The one-pass preparation gives exactly what the three helpers give in turn,
    over many header lists mixing hop-by-hop fields, x-forwarded-for and x-request-id."""
    import itertools
    import random

    from meshctl.protocol.headers import prepare_request_headers

    pool = [("host", "a"), ("connection", "close"), ("connection", "x-drop, upgrade"), ("x-drop", "1"),
            ("upgrade", "websocket"), ("te", "trailers"), ("te", "gzip"), ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", " "), ("x-forwarded-for", "2.2.2.2, 3.3.3.3"), ("x-request-id", ""),
            ("x-request-id", "abc"), ("x-request-id", "def"), ("accept", "*/*"), ("keep-alive", "5"),
            ("connection", "te"), ("x-request-id", " "), ("te", "trailers, gzip")]
    rand = random.Random(5)
    lists = [list(c) for n in range(4) for c in itertools.combinations(pool, n)]
    lists += [rand.sample(pool, rand.randint(4, len(pool))) for _ in range(3000)]
    for headers in lists:
        for keep_upgrade in (False, True):
            before = list(headers)
            h = strip_hop_by_hop(headers, keep_upgrade=keep_upgrade)
            h = append_forwarded_for(h, "10.0.0.1")
            want = ensure_request_id(h, lambda: "new-id")
            assert prepare_request_headers(headers, "10.0.0.1", lambda: "new-id", keep_upgrade=keep_upgrade) == want
            assert headers == before  # the argument is left untouched


def _strip_reference(headers, keep_upgrade=False):
    # strip_hop_by_hop as first written (a token split per Connection field, a new tuple per field)
    if not any(k in HOP_BY_HOP and (k != "te" or v != "trailers") for k, v in headers):
        return list(headers)
    nominated = set()
    for k, v in headers:
        if k == "connection":
            nominated.update(t.strip().lower() for t in v.split(",") if t.strip())
    upgrade_kept = keep_upgrade and "upgrade" in nominated
    out = []
    for k, v in headers:
        if k == "te":
            if "trailers" in [t.strip().lower() for t in v.split(",") if t.strip()]:
                out.append(("te", "trailers"))
            continue
        if upgrade_kept and k == "upgrade":
            out.append((k, v))
            continue
        if k in HOP_BY_HOP or k in nominated:
            continue
        out.append((k, v))
    if upgrade_kept:
        out.append(("connection", "upgrade"))
    return out


def test_strip_matches_the_reference_and_keeps_the_field_objects():
    # the one-token Connection values (keep-alive, close) take a short cut: same result
    pool = [("connection", "keep-alive"), ("connection", "close"), ("connection", "Keep-Alive"),
            ("connection", "close, x-a"), ("connection", "upgrade"), ("close", "1"), ("keep-alive", "5"),
            ("x-a", "2"), ("upgrade", "websocket"), ("te", "trailers"), ("te", "gzip"), ("server", "nginx"),
            ("content-length", "12")]
    rand = random.Random(7)
    lists = [list(c) for n in range(3) for c in itertools.combinations(pool, n)]
    lists += [rand.sample(pool, rand.randint(3, len(pool))) for _ in range(2000)]
    for headers in lists:
        for keep_upgrade in (False, True):
            out = strip_hop_by_hop(headers, keep_upgrade=keep_upgrade)
            assert out == _strip_reference(headers, keep_upgrade)
            ids = {id(h) for h in headers}
            assert all(id(h) in ids for h in out if h != ("connection", "upgrade") and h != ("te", "trailers"))


def test_connection_tokens():
    from meshctl.protocol.http1 import _connection_tokens

    assert _connection_tokens(None) == (False, False)
    assert _connection_tokens("keep-alive") == (False, True)
    assert _connection_tokens("close") == (True, False)
    assert _connection_tokens("Keep-Alive") == (False, True)
    assert _connection_tokens(" CLOSE , keep-alive") == (True, True)
    assert _connection_tokens("upgrade") == (False, False)
