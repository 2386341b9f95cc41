"""protocol.tls_hello: the SNI of a real ClientHello (made by Python's ssl), and
how a gateway port picks its server by it (proxy.gateway_tls.choose_server)."""

import ssl

import pytest

from meshctl.model.proxyconfig import ServerTLS
from meshctl.protocol.tls_hello import NEED_MORE, NOT_TLS, Hello, host_matches, parse
from meshctl.proxy.gateway_tls import choose_server


def client_hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_the_server_name_of_a_real_client_hello():
    got = parse(client_hello("httpbin.example.com"))
    assert isinstance(got, Hello) and got.sni == "httpbin.example.com"


def test_no_sni_and_partial_and_plaintext():
    hello = client_hello(None)
    got = parse(hello)
    assert isinstance(got, Hello) and got.sni is None
    for cut in (1, 4, 5, 40, len(hello) - 1):
        assert parse(hello[:cut]) == NEED_MORE
    assert parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == NOT_TLS
    assert parse(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == NOT_TLS  # a handshake that is not a ClientHello


def test_a_client_hello_split_over_two_records():
    hello = client_hello("a.example.com")
    body = hello[5:]
    rec = lambda b: b"\x16\x03\x01" + len(b).to_bytes(2, "big") + b
    split = rec(body[:50]) + rec(body[50:])
    assert parse(split[:60]) == NEED_MORE
    got = parse(split)
    assert isinstance(got, Hello) and got.sni == "a.example.com"


def test_server_choice_exact_before_wildcard_before_any():
    exact = ServerTLS(name="exact", hosts=("api.example.com",))
    wild = ServerTLS(name="wild", hosts=("*.example.com",))
    anyone = ServerTLS(name="any", hosts=("*",))
    servers = (anyone, wild, exact)
    assert choose_server(servers, "api.example.com") is exact
    assert choose_server(servers, "www.example.com") is wild
    assert choose_server(servers, "other.org") is anyone
    assert choose_server(servers, None) is anyone
    assert choose_server((exact, wild), "other.org") is None
    assert choose_server((exact,), None) is exact  # one server, a client without SNI
    assert host_matches("*.example.com", "a.example.com") and not host_matches("*.example.com", "example.com")
