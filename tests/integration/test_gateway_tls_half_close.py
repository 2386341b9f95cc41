"""A gateway port terminating TLS (mode SIMPLE) with TCP inside: a client that sends
its data and then a bare TCP FIN (no close_notify, as ``openssl s_client`` piped
from a file or a socket shut for writing under its TLS session does) still gets the
app's reply, as through the mesh's own mTLS legs."""

from __future__ import annotations

import socket
import ssl
from datetime import datetime, timedelta, timezone

import trio

from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.model.istio import Destination, PortSelector, RouteDestination, TCPRoute
from meshctl.model.proxyconfig import Listener, ServerTLS

from proxy_testkit import cluster, config, free_port, running_proxy


def _send_then_fin(port: int, payload: bytes) -> bytes:
    """TLS client: send ``payload``, then shutdown(SHUT_WR) on the TCP socket under
    the session (no unwrap, so no close_notify), then read the reply to its end."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="echo.example.com")
        tls.sendall(payload)
        # the TCP socket under the session (SSLSocket.shutdown would drop the session)
        with socket.fromfd(tls.fileno(), socket.AF_INET, socket.SOCK_STREAM) as fin:
            fin.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while chunk := tls.recv(65536):
                reply += chunk
        except ssl.SSLEOFError:  # the gateway closes after its reply; either EOF is fine
            pass
    return reply


async def test_tls_terminated_tcp_at_a_gateway_answers_a_client_that_half_closes(tmp_path):
    ca = create_root("cluster.local", datetime.now(timezone.utc) - timedelta(days=1))
    key = generate_key()
    leaf = ca.sign_csr(make_csr(key), "spiffe://cluster.local/ns/default/sa/echo", timedelta(hours=1),
                       datetime.now(timezone.utc))
    (tmp_path / "tls.crt").write_bytes(leaf + ca.issuer_chain_pem)
    (tmp_path / "tls.key").write_bytes(key_to_pem(key))
    got = []

    async def answer_at_eof(stream):
        data = b""
        while d := await stream.receive_some():
            data += d
        got.append(data)
        await stream.send_all(b"len=%d" % len(data))
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, answer_at_eof, 0)
        app_port = listeners[0].socket.getsockname()[1]
        to_echo = TCPRoute(route=(RouteDestination(Destination(host="echo.default.svc.cluster.local",
                                                               port=PortSelector(number=9000))),))
        server = ServerTLS(name="default/echo-gateway servers[0]", hosts=("*",), mode="SIMPLE", protocol="tcp",
                           server_certificate=str(tmp_path / "tls.crt"), private_key=str(tmp_path / "tls.key"),
                           tcp_routes=(to_echo,))
        gp = free_port()
        gw = Listener(name="gateway-31400", direction="gateway", address="127.0.0.1", port=gp, protocol="tcp",
                      service_port=31400, tls_servers=(server,))
        cfg = config(listeners=[gw], clusters=[cluster("echo", 9000, [("127.0.0.1", app_port)], protocol="tcp")])
        async with running_proxy(cfg):
            for payload in (b"x", b"q" * 300_000):
                with trio.fail_after(10):
                    reply = await trio.to_thread.run_sync(_send_then_fin, gp, payload)
                assert reply == b"len=%d" % len(payload)
            assert got == [b"x", b"q" * 300_000]
        n.cancel_scope.cancel()
