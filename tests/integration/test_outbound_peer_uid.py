"""A sidecar's outbound listener and bindings send with the workload's identity, so
they take loopback connections only from the proxy's own user and the users of
settings.outboundUsers (core/peeruid.py, proxy/peercheck.py). Real sockets; the
other user is `nobody`, through setpriv, which needs root (this machine and CI are)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace

import pytest
import trio

from meshctl.model.base import Duration
from meshctl.model.proxyconfig import Listener, Settings, fqdn
from meshctl.proxy.runtime import ConfigRejected, ProxyRuntime

from proxy_testkit import cluster, config, curl, free_port, outbound_listener, route_to, running_proxy, vhost

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="running a client as another user (setpriv --reuid=nobody) needs root")

def _cfg(upstream_port: int, users: tuple = ()):
    lp, tcp_port, http_port = free_port(), free_port(), free_port()
    tcp_bind = Listener(name="db", direction="binding", address="127.0.0.1", port=tcp_port, protocol="tcp",
                        service=fqdn("reviews"), service_port=9081)
    http_bind = Listener(name="bind-reviews", direction="binding", address="127.0.0.1", port=http_port,
                         route_table="outbound", service=fqdn("reviews"), service_port=9080)
    settings = Settings(connect_timeout=Duration(1.0), drain_timeout=Duration(5.0), outbound_users=users)
    cfg = config(listeners=[outbound_listener(lp), tcp_bind, http_bind],
                 vhosts=[vhost("reviews", 9080, (route_to("reviews", 9080),))],
                 clusters=[cluster("reviews", 9080, [("127.0.0.1", upstream_port)]),
                           cluster("reviews", 9081, [("127.0.0.1", upstream_port)], protocol="tcp")],
                 settings=settings)
    return cfg, lp, tcp_port, http_port


async def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return await trio.run_process([*AS_NOBODY, *argv], capture_stdout=True, capture_stderr=True, check=False)


async def test_own_user_is_served_on_every_outbound_listener(upstream):
    cfg, lp, tcp_port, http_port = _cfg(upstream.port)
    async with running_proxy(cfg) as rt:
        assert rt.peer_uids is not None and rt.peer_uids.off_reason is None
        r = await curl("-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/say?text=hi")
        assert r.stdout == b"hi"
        r = await curl(f"http://127.0.0.1:{http_port}/say?text=bound")
        assert r.stdout == b"bound"
        r = await curl(f"http://127.0.0.1:{tcp_port}/say?text=tcp")  # HTTP over the TCP binding
        assert r.stdout == b"tcp"
        assert all(rt.stats.listener(n).cx_peer_refused == 0 for n in ("outbound", "db", "bind-reviews"))


@needs_root
async def test_another_user_is_refused_403_logged_and_counted(upstream, caplog):
    cfg, lp, tcp_port, http_port = _cfg(upstream.port)
    async with running_proxy(cfg) as rt:
        before = len(upstream.requests)
        r = await _as_nobody("curl", "-sS", "-i", "--max-time", "10", "-x", f"http://127.0.0.1:{lp}",
                             "http://reviews:9080/say?text=stolen")
        head, _, body = r.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403"), r
        assert b"uid 65534 may not use this sidecar's outbound listeners" in body
        assert b"outboundUsers" in body
        r = await _as_nobody("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                             f"http://127.0.0.1:{http_port}/say?text=stolen")
        assert r.stdout == b"403"
        r = await _as_nobody("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{tcp_port}/say?text=stolen")
        assert r.returncode in (52, 56) and r.stdout == b"", r  # a TCP binding: closed, nothing relayed
        assert len(upstream.requests) == before  # nothing reached the service
        assert [rt.stats.listener(n).cx_peer_refused for n in ("outbound", "bind-reviews", "db")] == [1, 1, 1]
        lines = [m.getMessage() for m in caplog.records if "refused a connection from uid 65534" in m.getMessage()]
        assert sorted(line.split()[1] for line in lines) == ["bind-reviews:", "db:", "outbound:"]
        stats = (await curl(f"http://127.0.0.1:{rt.admin_port}/stats")).stdout
        assert b'meshctl_downstream_cx_peer_refused{listener="outbound"} 1' in stats
        # the proxy's own user still passes
        r = await curl("-x", f"http://127.0.0.1:{lp}", "http://reviews:9080/say?text=mine")
        assert r.stdout == b"mine"


@needs_root
async def test_outbound_users_lets_a_listed_user_through(upstream):
    for users in (("nobody",), ("65534",)):
        cfg, lp, tcp_port, _ = _cfg(upstream.port, users)
        async with running_proxy(cfg) as rt:
            r = await _as_nobody("curl", "-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{lp}",
                                 "http://reviews:9080/say?text=allowed")
            assert r.stdout == b"allowed", (users, r)
            r = await _as_nobody("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{tcp_port}/say?text=tcp")
            assert r.stdout == b"tcp", (users, r)
            assert rt.stats.listener("outbound").cx_peer_refused == 0


async def test_unknown_user_name_is_a_rejected_config(upstream):
    cfg, *_ = _cfg(upstream.port, ("no-such-user-xyz",))
    rt = ProxyRuntime()
    with pytest.raises(ConfigRejected, match=r"outboundUsers\[0\]: unknown user 'no-such-user-xyz'"):
        await rt.run(cfg, handle_signals=False)
    bad = replace(cfg, settings=replace(cfg.settings, outbound_users=(True,)))
    with pytest.raises(ConfigRejected, match=r"outboundUsers\[0\]: True is neither a user name nor a uid"):
        await ProxyRuntime().run(bad, handle_signals=False)


async def test_without_netlink_the_check_is_off_logged_once_and_connections_pass(upstream, caplog, monkeypatch):
    from meshctl.proxy import peercheck

    monkeypatch.delattr(peercheck.socket, "AF_NETLINK")  # as on a system that is not Linux
    cfg, lp, _, http_port = _cfg(upstream.port)
    async with running_proxy(cfg) as rt:
        assert rt.peer_uids is not None and "not Linux" in (rt.peer_uids.off_reason or "")
        for port, target in ((lp, "http://reviews:9080/say?text=a"), (http_port, None)):
            args = ("-x", f"http://127.0.0.1:{port}", target) if target else (f"http://127.0.0.1:{port}/say?text=a",)
            assert (await curl(*args)).stdout == b"a"
    off = [m.getMessage() for m in caplog.records if "local-user check is OFF" in m.getMessage()]
    assert len(off) == 1 and "not Linux" in off[0]


@needs_root
async def test_a_flood_of_refused_connections_is_counted_each_and_logged_once(upstream, caplog):
    # a stranger on loopback can open connections as fast as it likes: each is refused and
    # counted, but the log gets one line per listener and user per interval, not one per connection
    cfg, lp, _, _ = _cfg(upstream.port)
    async with running_proxy(cfg) as rt:
        r = await _as_nobody("sh", "-c", f"for i in $(seq 25); do curl -s -o /dev/null --max-time 10 "
                                         f"-x http://127.0.0.1:{lp} http://reviews:9080/say?text=x; done")
        assert r.returncode == 0, r
        assert rt.stats.listener("outbound").cx_peer_refused == 25
        lines = [m.getMessage() for m in caplog.records if "refused a connection from uid 65534" in m.getMessage()]
        assert len(lines) == 1, lines
        stats = (await curl(f"http://127.0.0.1:{rt.admin_port}/stats")).stdout
        assert b'meshctl_downstream_cx_peer_refused{listener="outbound"} 25' in stats


@needs_root
async def test_a_refused_http2_client_gets_403_on_its_stream(upstream):
    # gRPC clients speak h2c prior knowledge to the outbound listener: a refused user's client
    # reads a 403 with the reason (gRPC: PERMISSION_DENIED), not a broken connection
    cfg, lp, _, http_port = _cfg(upstream.port)
    async with running_proxy(cfg) as rt:
        r = await _as_nobody("curl", "-sS", "-i", "--http2-prior-knowledge", "--max-time", "10",
                             f"http://127.0.0.1:{http_port}/say?text=stolen")
        head, _, body = r.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/2 403"), r
        assert b"x-meshctl-reason: local user not allowed" in head
        assert b"uid 65534 may not use this sidecar's outbound listeners" in body
        assert rt.stats.listener("bind-reviews").cx_peer_refused == 1
