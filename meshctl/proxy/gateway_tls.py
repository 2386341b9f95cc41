"""TLS on gateway servers: Istio's Gateway ``tls`` (SIMPLE, MUTUAL,
OPTIONAL_MUTUAL, ISTIO_MUTUAL, PASSTHROUGH), several servers on one port
chosen by SNI, and credentials that are replaced without a restart.

Per connection on a listener with ``tls_servers`` (the rules):

1. Peek the ClientHello (nothing consumed; ``protocol.tls_hello``). Not TLS
   (plaintext on a TLS port), or no server for its SNI: the connection is
   closed. A TLS port never answers plaintext.
2. The server is the first whose hosts match the SNI exactly, else by
   wildcard, else a ``*`` server.
3. PASSTHROUGH: the VirtualService ``tls:`` route whose ``sniHosts`` match
   picks the destination; the bytes are relayed untouched (no route: closed).
4. Otherwise TLS is terminated with the server's context: SIMPLE presents the
   certificate; MUTUAL requires a client certificate chaining to the CA
   (OPTIONAL_MUTUAL checks one if sent); ``subjectAltNames`` limit the
   accepted client certificates; ISTIO_MUTUAL uses the gateway's mesh
   identity (Citadel) and requires a mesh client certificate. Then HTTP (an
   HTTPS server) or the server's ``tcp:`` routes (a TLS server).

Credentials: ``credentialName`` is a secret of `meshctl secret create tls` in
the state directory (``secrets/NAME/tls.crt``, ``tls.key``, ``ca.crt``; the
CA may also come from a secret ``NAME-cacert``, as in Istio), or the
``serverCertificate``/``privateKey``/``caCertificates`` files. Contexts are
built once and rebuilt when a file changes (checked at most once a second
per server); open connections keep the context they were made with. A
config whose credentials cannot be loaded is rejected by ``problems``
before it replaces the running one.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import meshctl.proxy.aio as aio
from ..model.istio import TCPRoute
from ..model.proxyconfig import Listener, ProxyConfig, ServerTLS
from ..protocol.tls_hello import NEED_MORE, NOT_TLS, Hello, host_matches, parse

if TYPE_CHECKING:  # cryptography costs a sidecar ~9 MB: loaded on the first client certificate
    from cryptography import x509

log = logging.getLogger("meshctl.gateway")

HELLO_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
RECHECK_EVERY = 1.0  # seconds between looks at a server's credential files
TLS_VERSIONS = {
    "TLSV1_0": ssl.TLSVersion.TLSv1,
    "TLSV1_1": ssl.TLSVersion.TLSv1_1,
    "TLSV1_2": ssl.TLSVersion.TLSv1_2,
    "TLSV1_3": ssl.TLSVersion.TLSv1_3,
}
SECRET_CERT, SECRET_KEY, SECRET_CA = "tls.crt", "tls.key", "ca.crt"


class CredentialError(Exception):
    pass


class _Entry:
    __slots__ = ("ctx", "stamp", "checked")

    def __init__(self, ctx: ssl.SSLContext, stamp: tuple, checked: float) -> None:
        self.ctx = ctx
        self.stamp = stamp
        self.checked = checked


class GatewayCredentials:
    """Server contexts of the gateway's TLS servers, rebuilt when their files change."""

    def __init__(self, secrets_dir: Path | None = None) -> None:
        self.secrets_dir = secrets_dir
        self._cache: dict[ServerTLS, _Entry] = {}

    # -- files

    def files(self, s: ServerTLS) -> tuple[str, str, str | None]:
        """(certificate, key, CA or None) paths of ``s``; CredentialError when missing."""
        if s.credential_name:
            if self.secrets_dir is None:
                raise CredentialError(f"{s.name}: credentialName {s.credential_name!r} needs the mesh state directory "
                                      "(secrets are kept there by `meshctl secret create tls`)")
            from ..secrets import name_problem  # a Secret name, never a path out of the secrets directory

            if (bad := name_problem(s.credential_name)) is not None:
                raise CredentialError(f"{s.name}: credentialName {bad}")
            d = self.secrets_dir / s.credential_name
            cert, key = d / SECRET_CERT, d / SECRET_KEY
            if not cert.is_file() or not key.is_file():
                raise CredentialError(f"{s.name}: secret {s.credential_name!r} not found: create it with "
                                      f"`meshctl secret create tls {s.credential_name} --cert FILE --key FILE`")
            ca = d / SECRET_CA
            if not ca.is_file():
                ca = self.secrets_dir / f"{s.credential_name}-cacert" / SECRET_CA
            return str(cert), str(key), str(ca) if ca.is_file() else None
        if not s.server_certificate or not s.private_key:
            raise CredentialError(f"{s.name}: mode {s.mode} needs credentialName, or serverCertificate and privateKey")
        for what, path in (("serverCertificate", s.server_certificate), ("privateKey", s.private_key),
                           ("caCertificates", s.ca_certificates)):
            if path and not os.path.isfile(path):
                raise CredentialError(f"{s.name}: {what} {path}: no such file")
        return s.server_certificate, s.private_key, s.ca_certificates

    @staticmethod
    def _stamp(paths) -> tuple:
        out = []
        for p in paths:
            try:
                st = os.stat(p) if p else None
            except OSError:
                st = None
            out.append((p, st.st_mtime_ns, st.st_size, st.st_ino) if st else (p, None))
        return tuple(out)

    # -- contexts

    def build(self, s: ServerTLS, holder=None) -> ssl.SSLContext:
        """A fresh server context for ``s``; CredentialError says why not."""
        if s.mode == "ISTIO_MUTUAL":
            if holder is None:
                raise CredentialError(f"{s.name}: ISTIO_MUTUAL needs the gateway's mesh identity (Citadel), and it has none")
            try:
                return holder.server
            except Exception as exc:
                raise CredentialError(f"{s.name}: ISTIO_MUTUAL: {exc}") from None
        cert, key, ca = self.files(s)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.options |= ssl.OP_NO_COMPRESSION
        # a client's bare TCP FIN (no close_notify) reads as EOF and the reply still goes
        # out (TCP inside TLS, half-closed), as on mesh contexts (proxy/tls.py); without
        # it OpenSSL 3 makes that EOF a fatal error
        ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # Istio's default for gateways
        lo = TLS_VERSIONS.get((s.min_protocol_version or "").upper())
        hi = TLS_VERSIONS.get((s.max_protocol_version or "").upper())
        try:
            if lo is not None:
                ctx.minimum_version = lo
            if hi is not None:
                ctx.maximum_version = hi
            if lo is not None and lo < ssl.TLSVersion.TLSv1_2:
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL refuses TLS 1.0/1.1 at its default level
        except (ValueError, ssl.SSLError) as exc:
            raise CredentialError(f"{s.name}: protocol versions: {exc}") from None
        if s.cipher_suites:
            try:
                ctx.set_ciphers(":".join(s.cipher_suites))
            except ssl.SSLError:
                raise CredentialError(f"{s.name}: cipherSuites {', '.join(s.cipher_suites)}: none is known to OpenSSL") from None
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise CredentialError(f"{s.name}: the private key does not match the certificate ({cert})") from None
            raise CredentialError(f"{s.name}: cannot load certificate/key {cert}: {exc.reason or exc}") from None
        except OSError as exc:
            raise CredentialError(f"{s.name}: cannot read {exc.filename}: {exc.strerror}") from None
        if s.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
            if ca is None:
                raise CredentialError(f"{s.name}: mode {s.mode} needs a CA to check client certificates "
                                      "(secret create tls ... --ca-cert FILE, or caCertificates)")
            try:
                ctx.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as exc:
                raise CredentialError(f"{s.name}: cannot load the CA {ca}: {exc}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED if s.mode == "MUTUAL" else ssl.CERT_OPTIONAL
        if s.protocol == "http":
            ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx

    def context(self, s: ServerTLS, holder=None, now: float = 0.0) -> ssl.SSLContext:
        """The current context of ``s``; reloaded when its files changed. A reload
        that fails keeps the previous context (logged); with none, CredentialError."""
        if s.mode == "ISTIO_MUTUAL":
            return self.build(s, holder)  # the holder has the current identity
        e = self._cache.get(s)
        if e is not None and now - e.checked < RECHECK_EVERY:
            return e.ctx
        try:
            stamp = self._stamp(self.files(s))
        except CredentialError:
            if e is not None:
                e.checked = now
                log.warning("%s: credentials gone; serving with the ones loaded before", s.name)
                return e.ctx
            raise
        if e is not None and e.stamp == stamp:
            e.checked = now
            return e.ctx
        try:
            ctx = self.build(s, holder)
        except CredentialError as exc:
            if e is None:
                raise
            e.checked = now
            log.warning("%s: new credentials not loaded (%s); serving with the previous ones", s.name, exc)
            return e.ctx
        if e is not None:
            log.info("%s: credentials changed, new connections use them", s.name)
        self._cache[s] = _Entry(ctx, stamp, now)
        return ctx

    def problems(self, cfg: ProxyConfig, holder=None) -> list[str]:
        """What keeps ``cfg``'s TLS servers from serving (checked before it is applied)."""
        out = []
        for lst in cfg.listeners:
            for s in lst.tls_servers:
                if s.mode == "PASSTHROUGH" or (s.mode == "ISTIO_MUTUAL" and holder is None):
                    continue  # no credentials of its own / identity arrives later (connections refused until then)
                try:
                    self.context(s, holder, aio.current_time() if _in_trio() else 0.0)
                except CredentialError as exc:
                    out.append(f"listener {lst.name!r}: {exc}")
        return out


def _in_trio() -> bool:
    try:
        aio.current_task()
        return True
    except RuntimeError:
        return False


# ---------------------------------------------------------------- choosing a server


def choose_server(servers: tuple[ServerTLS, ...], sni: str | None) -> ServerTLS | None:
    """Exact SNI match first, then wildcard, then a ``*`` server (also for no SNI)."""
    if sni:
        for s in servers:
            if sni in (h.lower() for h in s.hosts):
                return s
        for s in servers:
            if any(h.startswith("*.") and host_matches(h, sni) for h in s.hosts):
                return s
    for s in servers:
        if "*" in s.hosts:
            return s
    return servers[0] if not sni and len(servers) == 1 else None


def choose_tls_route(s: ServerTLS, sni: str | None):
    for route in s.tls_routes:
        if not route.match:
            return route
        for m in route.match:
            if any(host_matches(h.split("/")[-1], sni or "") for h in m.sni_hosts):
                return route
    return None


# ---------------------------------------------------------------- serving


class _L4:
    """What serve_tcp_connection reads of an active listener: its spec (here with the
    routes of the chosen server) and the listener it came in on (drain finds it by that)."""

    __slots__ = ("spec", "sock")

    def __init__(self, spec: Listener, sock) -> None:
        self.spec = spec
        self.sock = sock


async def peek_hello(stream) -> Hello | str:
    """The ClientHello at the head of ``stream``'s socket, read with MSG_PEEK
    (so any TLS implementation can take the connection over untouched)."""
    import socket as _socket

    sock = stream.socket
    with aio.move_on_after(HELLO_TIMEOUT):
        last = -1
        while True:
            await aio.wait_readable(sock)
            try:
                data = sock.recv(16384 + 5, _socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return NOT_TLS
            if not data:
                return NOT_TLS
            got = parse(data)
            if got is not NEED_MORE:
                return got
            if len(data) == last:
                await aio.sleep(0.005)  # the rest of the hello is on its way
            last = len(data)
    return NOT_TLS


async def serve_gateway_tls(rt, al, stream, client_ip: str) -> None:
    from .http import serve_http_connection
    from .identity import principal_of
    from .tcp import serve_tcp_connection
    from .tls import wrap_stream  # TLS straight on the socket (stream.TLSSocketStream)

    spec: Listener = al.spec
    hello = await peek_hello(stream)
    if not isinstance(hello, Hello):
        log.info("%s: connection from %s closed: not TLS (this port serves TLS only)", spec.name, client_ip)
        stream.close_now()
        return
    server = choose_server(spec.tls_servers, hello.sni)
    if server is None:
        log.info("%s: connection from %s closed: no server for SNI %r", spec.name, client_ip, hello.sni)
        stream.close_now()
        return
    if server.mode == "PASSTHROUGH":
        route = choose_tls_route(server, hello.sni)
        if route is None:
            log.info("%s: connection from %s closed: no tls route for SNI %r", spec.name, client_ip, hello.sni)
            stream.close_now()
            return
        l4 = replace(spec, protocol="tcp", tcp_routes=(TCPRoute(route=route.route),))
        await serve_tcp_connection(rt, _L4(l4, al.sock), stream, client_ip)
        return
    try:
        ctx = rt.gateway_credentials.context(server, rt.tls, aio.current_time())
    except CredentialError as exc:
        log.warning("%s: connection from %s closed: %s", spec.name, client_ip, exc)
        stream.close_now()
        return
    tls = wrap_stream(stream, ctx, server_side=True)
    try:
        with aio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except (aio.BrokenResourceError, aio.TooSlowError) as exc:
        cause = exc.__cause__ or exc
        log.info("%s: TLS handshake with %s failed: %s", spec.name, client_ip, getattr(cause, "reason", None) or cause)
        stream.close_now()
        return
    peer_id = None
    der = tls.getpeercert(binary_form=True)
    if der:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        sans = _sans(cert)
        if server.subject_alt_names and not set(server.subject_alt_names) & set(sans):
            log.info("%s: client certificate of %s has SANs %s, none of %s: closed", spec.name, client_ip,
                     sans, list(server.subject_alt_names))
            stream.close_now()
            return
        peer_id = next((v for v in sans if v.startswith("spiffe://")), None)
        if server.mode == "ISTIO_MUTUAL":  # a mesh workload: the SPIFFE checks sidecars make
            from datetime import datetime, timezone

            from ..citadel.errors import PeerRejected
            from ..citadel.identity import check_leaf

            try:
                peer_id = check_leaf(cert, None, datetime.now(timezone.utc), usage="client")
            except PeerRejected as exc:
                log.info("%s: client %s refused: %s", spec.name, client_ip, exc)
                stream.close_now()
                return
    secure = tls
    if hasattr(tls, "peer_id"):  # TLSSocketStream: what authz and telemetry read of the peer
        tls.peer_id = peer_id
        tls.principal = principal_of(peer_id)
        tls.alpn = tls.selected_alpn_protocol()
        tls.sni = hello.sni  # for AuthorizationPolicy's connection.sni
    if server.protocol == "tcp":
        await serve_tcp_connection(rt, _L4(replace(spec, protocol="tcp", tcp_routes=server.tcp_routes), al.sock), secure, client_ip)
    else:
        await serve_http_connection(rt, al, secure, client_ip)


def _sans(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for kind in (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name):
        out += [str(v) for v in san.get_values_for_type(kind)]
    out += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    return out
