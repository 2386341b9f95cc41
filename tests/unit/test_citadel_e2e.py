"""`meshctl citadel serve` as a real process: a sidecar bootstraps with a token and renews."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshctl.citadel.errors import CitadelError, TokenReused, TokenUnknown
from meshctl.citadel.fetch import ChildCertificateSource
from meshctl.citadel.server import CertificateSource
from meshctl.cli.citadel import app  # noqa: F401  (the command under test must import)
from meshctl.proxy.tls import CertificateHolder

pytestmark = pytest.mark.e2e

SERVE = "from meshctl.cli.citadel import app; app()"


async def test_sidecar_bootstraps_and_renews_against_a_citadel_process(citadel_process, citadel_token):
    url, sd = citadel_process
    tok = citadel_token(sd, "default/reviews")  # issued by another process than the server
    src = CertificateSource(url, tok)
    holder = CertificateHolder()
    holder.update(*await src.obtain())
    assert holder.identity == "spiffe://cluster.local/ns/default/sa/reviews"
    life = holder.not_after - holder.not_before
    assert 3600 <= life.total_seconds() <= 3660  # --cert-ttl 1h, plus the 60 s backdating
    holder.update(*await src.obtain())  # renewal
    assert holder.generation == 2
    with pytest.raises(TokenReused):
        await CertificateSource(url, tok).obtain()
    status = subprocess.run(
        [sys.executable, "-c", SERVE, "status", "--json", "--state-dir", str(sd)], check=True, capture_output=True
    )
    ids = json.loads(status.stdout)["identities"]
    assert [(i["spiffe_id"], i["how"]) for i in ids] == [("spiffe://cluster.local/ns/default/sa/reviews", "renewal")]


async def test_the_fetch_process_bootstraps_renews_and_names_each_refusal(citadel_process, citadel_token):
    # what a sidecar runs (proxy/identity.start_identity): every exchange in a child process
    url, sd = citadel_process
    tok = citadel_token(sd, "default/ratings")
    src = ChildCertificateSource(url, tok)
    holder = CertificateHolder()
    first = await src.obtain()
    holder.update(*first)  # verify=True here: what the child checked passes the in-process check too
    assert holder.identity == "spiffe://cluster.local/ns/default/sa/ratings"
    second = await src.obtain()  # renewal, proven with the first key, for a fresh one
    holder.update(*second)
    assert second[1] != first[1] and second[0] != first[0] and holder.generation == 2
    with pytest.raises(TokenReused, match="Citadel refused"):  # one-time: a second redemption is refused
        await ChildCertificateSource(url, tok).obtain()
    with pytest.raises(TokenUnknown):
        await ChildCertificateSource(url, "not-a-token").obtain()
    with pytest.raises(CitadelError, match="cannot reach Citadel at http://127.0.0.1:9") as info:
        await ChildCertificateSource("http://127.0.0.1:9", tok, timeout=2).obtain()
    assert info.value.reason == "unreachable"
    status = subprocess.run(
        [sys.executable, "-c", SERVE, "status", "--json", "--state-dir", str(sd)], check=True, capture_output=True
    )
    assert [(i["spiffe_id"], i["how"]) for i in json.loads(status.stdout)["identities"]] == [
        ("spiffe://cluster.local/ns/default/sa/ratings", "renewal")]


async def test_a_failed_first_fetch_keeps_the_token_for_the_next_try(citadel_process, citadel_token):
    url, sd = citadel_process
    tok = citadel_token(sd, "default/details")
    src = ChildCertificateSource(url, tok)
    src.url = "http://127.0.0.1:9"  # Citadel unreachable: the token was not spent
    with pytest.raises(CitadelError, match="cannot reach Citadel"):
        await src.obtain()
    src.url = url
    chain, _key, _bundle = await src.obtain()
    assert b"BEGIN CERTIFICATE" in chain


def test_the_one_file_build_runs_the_fetch_as_a_hidden_subcommand(monkeypatch):
    import meshctl.citadel.fetch as fetch

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert fetch.fetch_argv() == [sys.executable, "__citadel_fetch__"]
    monkeypatch.delattr(sys, "frozen")
    assert fetch.fetch_argv() == [sys.executable, "-m", "meshctl.citadel.fetch"]
    # the binary's entry point (meshctl/frozen.py) hands the subcommand to the fetch, which answers on stdout
    code = "import sys; sys.argv = ['meshctl', '__citadel_fetch__']; from meshctl.frozen import main; main()"
    out = subprocess.run([sys.executable, "-c", code], input=b'{"no": "url"}', capture_output=True, timeout=60)
    assert json.loads(out.stdout) == {"error": "bad request to the certificate fetch process: expected a JSON "
                                               "object with url", "reason": "fetch-failed"}


async def test_a_certificate_issued_but_refused_is_not_served_and_the_next_try_renews_with_it(nursery):
    # a misconfigured Citadel: it signs with a CA its trust bundle does not hold. The fetch
    # refuses the certificate (a peer would), but the token is spent: the next try must renew
    # with the certificate and key it got (a proof by that key), not redeem the token again
    from datetime import datetime, timedelta, timezone

    from meshctl.citadel.ca import create_root
    from meshctl.citadel.errors import TLSError

    now = datetime.now(timezone.utc)
    signer, other = create_root("cluster.local", now), create_root("cluster.local", now)
    seen = []

    async def citadel(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += await stream.receive_some(65536)
        data = head + b"\r\n\r\n" + body
        path = data.split(b" ", 2)[1].decode()
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        seen.append((path, sorted(body)))
        chain = signer.sign_csr(body["csr"], "spiffe://cluster.local/ns/default/sa/x", timedelta(hours=1), now)
        out = json.dumps({"cert_chain": chain.decode(), "root_bundle": other.root_pem.decode()}).encode()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                              b"connection: close\r\n\r\n%s" % (len(out), out))
        await stream.aclose()

    import trio

    from functools import partial

    listeners = await nursery.start(partial(trio.serve_tcp, citadel, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    src = ChildCertificateSource(url, "a-token")
    for _ in range(2):
        with pytest.raises(TLSError, match="refusing to use our own certificate") as info:
            await src.obtain()
        assert info.value.reason == "untrusted"
    assert seen == [("/v1/sign", ["csr", "token"]), ("/v1/renew", ["cert_chain", "csr", "proof"])]


async def test_a_fetch_process_that_cannot_start_or_dies_is_named(monkeypatch):
    import meshctl.citadel.fetch as fetch

    monkeypatch.setattr(fetch, "fetch_argv", lambda: ["/nonexistent/meshctl-fetch"])
    with pytest.raises(CitadelError, match="cannot start the certificate fetch process") as info:
        await ChildCertificateSource("http://127.0.0.1:9", "t").obtain()
    assert info.value.reason == "fetch-failed"
    die = "import sys; sys.stderr.write('boom: out of memory\\n'); sys.exit(3)"
    monkeypatch.setattr(fetch, "fetch_argv", lambda: [sys.executable, "-c", die])
    src = ChildCertificateSource("http://127.0.0.1:9", "t")
    with pytest.raises(CitadelError, match=r"failed \(exit 3\): boom: out of memory"):
        await src.obtain()
    assert src._token == "t"  # nothing came back: the token is kept for the next try
