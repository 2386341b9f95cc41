"""A sidecar loads only its data path: what it imports decides its RSS (issue 12's targets
are <= 35 MB plain, <= 40 MB with mutual TLS; cryptography alone is ~12 MB, httpx ~3 MB,
the rule loader with its Istio models and RE2 ~6 MB). A sidecar with an identity gets its
certificates from a child process and checks its peers without cryptography."""

from __future__ import annotations

import json
import subprocess
import sys

# libraries a sidecar with a plain HTTP listener never needs
HEAVY = ("cryptography", "httpx", "typer", "rich", "pydantic", "meshctl.loader.validate", "meshctl.loader.resources",
         "meshctl.citadel.identity",
         "re2",  # RE2 (+ the C++ runtime, ~2.5 MB): loaded by the first regex a rule carries
         "decimal",  # durations are parsed in integers
         "meshctl.core.routeexplain",  # `meshctl route explain`'s trace (the routes are built by core/routebuild.py)
         "meshctl.proxy.metric_overrides")  # Istio Telemetry overrides, loaded by a /metrics scrape that has them


def test_a_plain_sidecar_runtime_imports_no_heavy_library():
    code = (
        "import sys, json\n"
        "import meshctl.proxy.main, meshctl.proxy.runtime, meshctl.loader.proxyconfig\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_loader_package_still_offers_its_names():
    code = (
        "from meshctl.loader import from_data, load_resources, has_errors, LoadError\n"
        "from meshctl.loader.validate import validate\n"
        "print(callable(validate) and callable(from_data) and callable(load_resources) and callable(has_errors)"
        " and isinstance(LoadError, type))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_re2_is_loaded_by_the_first_regex_and_refuses_what_it_refused_before():
    code = (
        "import sys\n"
        "import meshctl.proxy.runtime, meshctl.loader.proxyconfig\n"
        "from meshctl.core.regex import compile_regex, regex_problem\n"
        "before = 're2' in sys.modules\n"
        "print(before, compile_regex('/api/v[0-9]+').fullmatch('/api/v12') is not None, 're2' in sys.modules,\n"
        "      'RE2' in (regex_problem('(a)\\\\1') or ''))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True", "True"]
    assert out.stderr == ""  # RE2's own error logging stays off


def test_the_sidecar_hands_free_heap_pages_back_to_the_kernel():
    # what a sidecar does after its first config and every 30 s: glibc keeps freed chunks
    # resident (start-up garbage, bursts), malloc_trim returns their pages (issue 12, RSS)
    code = (
        "from meshctl.proxy.main import _release_free_memory\n"
        "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
        "blocks = [bytes(2000) + bytes([i % 256]) for i in range(20000)]  # ~40 MB in malloc'd blocks\n"
        "keep = blocks[::50]  # one in 50 stays, so the heap's top cannot simply shrink\n"
        "del blocks\n"
        "before = rss()\n"
        "_release_free_memory()\n"
        "print(before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 20_000  # kB given back


def test_a_sidecar_under_pilot_with_a_citadel_identity_loads_no_yaml_httpx_or_citadel_server():
    # what `meshctl up` runs: Pilot sends JSON (YAML, pyyaml + its C extension, is for
    # `proxy run --config FILE`); Pilot and Citadel are asked over meshctl.plainhttp (httpx
    # is ~1.6 MB); the certificate client is citadel.client, not the CA's server and store;
    # difflib is for "did you mean" in config errors
    code = (
        "import sys, json\n"
        "import meshctl.proxy.main, meshctl.proxy.runtime, meshctl.proxy.pilot_client, meshctl.proxy.identity\n"
        "import meshctl.citadel.client, meshctl.proxy.sidecar_certs\n"
        "print(json.dumps([m for m in ('yaml', 'difflib', 'httpx', 'meshctl.citadel.server', 'meshctl.citadel.store',"
        " 'meshctl.httpapi', 'meshctl.loopback') if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_http2_is_loaded_by_the_first_http2_connection_or_try_not_at_start():
    # jh2 (HPACK) + protocol/http2 + h2conn + h2pool are ~2.8 MB of RSS a sidecar whose traffic is
    # HTTP/1.1 never uses; the h2 tests (tests/integration/test_h2_*.py) prove they still load
    code = (
        "import sys, json\n"
        "import meshctl.proxy.main, meshctl.proxy.runtime, meshctl.proxy.pilot_client, meshctl.loader.proxyconfig\n"
        "from meshctl.proxy.runtime import ProxyRuntime\n"
        "rt = ProxyRuntime()\n"
        "print(json.dumps([m for m in ('jh2', 'meshctl.protocol.http2', 'meshctl.proxy.h2conn', 'meshctl.proxy.h2pool')"
        " if m in sys.modules]), rt.forwarder.h2.pool)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "None"]


SIDECAR_WITH_IDENTITY = """
import json, socket, sys, trio
import meshctl.proxy.main, meshctl.proxy.runtime, meshctl.proxy.pilot_client
from meshctl.proxy.identity import start_identity
from meshctl.proxy.stream import FastSocketStream
from meshctl.proxy.tls import client_handshake, server_handshake


class Runtime:
    tls = None


async def main():
    rt = Runtime()
    env = {"MESHCTL_CITADEL_URL": sys.argv[1], "MESHCTL_CITADEL_TOKEN": sys.argv[2]}
    peers = {}
    async with trio.open_nursery() as n:
        await n.start(start_identity, rt, env)  # the first certificate, through the fetch process
        me = frozenset({rt.tls.identity})
        a, b = socket.socketpair()
        for s in (a, b):
            s.setblocking(False)

        async def side(name, fn, sock):
            conn = await fn(FastSocketStream(sock), rt.tls, me)
            peers[name] = (type(conn.stream).__name__, conn.peer_id)
            await conn.stream.aclose()

        async with trio.open_nursery() as m:  # mutual TLS on a socket, both roles' checks
            m.start_soon(side, "server", server_handshake, a)
            m.start_soon(side, "client", client_handshake, b)
        n.cancel_scope.cancel()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"
                    or m in ("meshctl.citadel.identity", "meshctl.citadel.client", "meshctl.citadel.ca"))
    print(json.dumps({"identity": rt.tls.identity, "peers": peers, "loaded": loaded[:5]}))


trio.run(main)
"""


def test_a_sidecar_with_an_identity_after_mutual_tls_has_not_imported_cryptography(citadel_process, citadel_token):
    # cryptography is ~12 MB of a sidecar's RSS (issue 12: mTLS sidecar <= 40 MB): the key,
    # CSR and Citadel exchange run in a child (citadel/fetch.py), the peer checks on DER
    # (citadel/leaf.py)
    url, sd = citadel_process
    token = citadel_token(sd, "default/reviews")
    out = subprocess.run([sys.executable, "-c", SIDECAR_WITH_IDENTITY, url, token], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    me = "spiffe://cluster.local/ns/default/sa/reviews"
    assert got["identity"] == me
    assert got["peers"] == {"server": ["TLSSocketStream", me], "client": ["TLSSocketStream", me]}
    assert got["loaded"] == []
