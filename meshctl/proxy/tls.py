"""mTLS for sidecars: SSL contexts from Citadel's PEMs, handshakes with the SPIFFE check, PERMISSIVE sniffing.

What the proxy calls:

- ``CertificateHolder``: the current certificate, key and trust bundle, and
  the server/client ``ssl.SSLContext`` built from them. ``update()`` swaps in
  a renewed certificate; connections already open keep the context they
  were made with, new connections get the new one.
- ``server_handshake`` / ``client_handshake``: run the TLS handshake on a
  stream, then the SPIFFE identity check (``ssl`` already verified the chain
  against the trust bundle, each certificate's validity and, by the purpose
  libssl sets, the leaf's extended key usage; it ignores URI SANs, so
  ``citadel.leaf.check_peer_der`` applies the rest of meshctl's rules to the
  peer's DER, without `cryptography`). A ``FastSocketStream`` (the
  proxy's sockets) becomes a ``stream.TLSSocketStream`` (OpenSSL on the
  non-blocking socket itself); any other ``aio.Stream`` (memory streams
  in tests) is wrapped in ``trio.SSLStream``. Failures raise ``TLSError``
  (handshake) or ``PeerRejected`` (identity), and the stream is closed.
  ``client_handshake(session=...)`` resumes an earlier session (the identity
  check runs on resumed connections too: the session keeps the peer's
  certificate).
- ``accept_inbound``: what an inbound listener does with a new connection in
  STRICT, PERMISSIVE or DISABLE mode. PERMISSIVE sniffs a socket with
  MSG_PEEK, so nothing is consumed: a plaintext connection is served as the
  very stream that was accepted.
- ``renewal_time`` / ``keep_renewed``: renew at half-life with jitter.

Contexts: TLS 1.2 minimum, certificate required on both sides (mutual),
hostname checks off (identity is the SPIFFE ID, not a DNS name), ALPN
``h2`` and ``http/1.1``.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

import meshctl.proxy.aio as aio
from ..citadel.errors import PeerRejected, TLSError
from ..citadel.leaf import check_peer_der, pem_to_der, read_der
from .stream import FastSocketStream, TLSSocketStream, record_sni, start_tls

if TYPE_CHECKING:
    import trio

log = logging.getLogger("meshctl.tls")

DEFAULT_ALPN = ("h2", "http/1.1")
HANDSHAKE_TIMEOUT = 10.0

__all__ = [
    "CertificateHolder",
    "InboundConnection",
    "PeerRejected",
    "PrefixedStream",
    "TLSConnection",
    "TLSError",
    "accept_inbound",
    "client_context",
    "client_handshake",
    "keep_renewed",
    "renewal_time",
    "server_context",
    "server_handshake",
    "sniff_tls",
]


# ---------------------------------------------------------------- contexts


def _b(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _load_chain_into(ctx: ssl.SSLContext, chain_pem: bytes | str, key_pem: bytes | str) -> None:
    """``load_cert_chain`` reads only files: hand it anonymous in-memory files
    (memfd) where the OS has them, else a private temporary directory.
    The key never lands in a named file that outlives this call."""
    chain, key = _b(chain_pem), _b(key_pem)
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = []
        try:
            for data in (chain, key):
                fd = os.memfd_create("meshctl-tls", 0)
                fds.append(fd)
                os.write(fd, data)
            _load(ctx, f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshctl-tls-") as d:  # pragma: no cover - non-Linux
        cpath, kpath = os.path.join(d, "chain.pem"), os.path.join(d, "key.pem")
        for path, data in ((cpath, chain), (kpath, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        _load(ctx, cpath, kpath)


def _load(ctx: ssl.SSLContext, cpath: str, kpath: str) -> None:
    try:
        ctx.load_cert_chain(cpath, kpath)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TLSError("the private key does not match the certificate", "bad-certificate") from None
        raise TLSError(f"cannot load certificate/key: {exc.reason or exc}", "bad-certificate") from None


def _base_context(purpose_server: bool, bundle_pem: bytes | str, alpn: Iterable[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose_server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the SPIFFE URI SAN, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    # a peer's TCP FIN reads as EOF and leaves the session usable for sending
    # (half-close of opaque TCP over mTLS, TLSSocketStream.send_eof): without it
    # OpenSSL 3 makes an EOF without close_notify a fatal error
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        ctx.load_verify_locations(cadata=_b(bundle_pem).decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise TLSError(f"cannot load the trust bundle: {exc}", "bad-certificate") from None
    protos = list(alpn)
    if protos:
        ctx.set_alpn_protocols(protos)
    if purpose_server:
        record_sni(ctx)  # the SNI clients send, for AuthorizationPolicy's connection.sni
    return ctx


def server_context(
    chain_pem: bytes | str,
    key_pem: bytes | str,
    bundle_pem: bytes | str,
    *,
    alpn: Iterable[str] = DEFAULT_ALPN,
) -> ssl.SSLContext:
    """Server side of mutual TLS: presents ``chain_pem``, requires a client
    certificate that chains to ``bundle_pem``."""
    ctx = _base_context(True, bundle_pem, alpn)
    _load_chain_into(ctx, chain_pem, key_pem)
    return ctx


def client_context(
    chain_pem: bytes | str,
    key_pem: bytes | str,
    bundle_pem: bytes | str,
    *,
    alpn: Iterable[str] = DEFAULT_ALPN,
) -> ssl.SSLContext:
    """Client side of mutual TLS: presents ``chain_pem``, requires a server
    certificate that chains to ``bundle_pem``."""
    ctx = _base_context(False, bundle_pem, alpn)
    _load_chain_into(ctx, chain_pem, key_pem)
    return ctx


# ---------------------------------------------------------------- the current certificate


def renewal_time(
    not_before: datetime, not_after: datetime, rng: random.Random, jitter: float = 0.1
) -> datetime:
    """When to renew: at half the lifetime, moved by up to ±``jitter`` of the
    lifetime so a fleet started together does not renew together."""
    life = not_after - not_before
    fraction = 0.5 + rng.uniform(-jitter, jitter)
    return not_before + life * fraction


class CertificateHolder:
    """The sidecar's current identity material and the contexts built from it.

    Reading ``server`` / ``client`` returns the contexts of the moment; a
    connection keeps the context it was created with, so ``update`` never
    disturbs connections already open.
    """

    def __init__(self, *, alpn: Iterable[str] = DEFAULT_ALPN) -> None:
        self.alpn = tuple(alpn)
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self.identity: str | None = None
        self.not_before: datetime | None = None
        self.not_after: datetime | None = None
        self.bundle_pem: bytes = b""
        self.generation = 0

    @property
    def ready(self) -> bool:
        return self._server is not None

    @property
    def trust_domain(self) -> str | None:
        """Our own SPIFFE ID's trust domain: peers must be in it."""
        ident = self.identity or ""
        return ident[len("spiffe://"):].split("/", 1)[0] if ident.startswith("spiffe://") else None

    @property
    def server(self) -> ssl.SSLContext:
        if self._server is None:
            raise TLSError("no workload certificate yet: Citadel has not issued one", "no-certificate")
        return self._server

    @property
    def client(self) -> ssl.SSLContext:
        if self._client is None:
            raise TLSError("no workload certificate yet: Citadel has not issued one", "no-certificate")
        return self._client

    def update(
        self,
        chain_pem: bytes | str,
        key_pem: bytes | str,
        bundle_pem: bytes | str,
        *,
        verify: bool = True,
        now: datetime | None = None,
    ) -> None:
        """Build new contexts, then swap them in (both or neither).

        With ``verify`` (the default) the certificate must pass the same checks
        a peer would run on it (citadel.identity.verify_peer, chain included),
        so a sidecar never serves with a certificate its peers are bound to
        refuse. That check needs `cryptography`; a sidecar passes
        ``verify=False`` because its certificate comes from the fetch process
        (citadel/fetch.py), which ran the same check before handing it over."""
        try:
            ders = pem_to_der(_b(chain_pem))
            if not ders:
                raise PeerRejected("no CERTIFICATE block", "bad-certificate")
            leaf = read_der(ders[0])
        except (PeerRejected, UnicodeDecodeError) as exc:
            raise TLSError(f"cannot read the workload certificate: {exc}", "bad-certificate") from None
        if verify:
            from ..citadel.identity import verify_peer  # `cryptography`: see the docstring

            try:
                verify_peer(_b(chain_pem), _b(bundle_pem), None, now or _utcnow())
            except PeerRejected as exc:
                raise TLSError(f"refusing to use our own certificate: {exc}", exc.reason) from None
        server = server_context(chain_pem, key_pem, bundle_pem, alpn=self.alpn)
        client = client_context(chain_pem, key_pem, bundle_pem, alpn=self.alpn)
        self._server, self._client = server, client
        self.identity = leaf.uris[0] if len(leaf.uris) == 1 else leaf.name
        self.not_before, self.not_after = leaf.not_before, leaf.not_after
        self.bundle_pem = _b(bundle_pem)
        self.generation += 1
        log.info("workload certificate %s loaded, valid until %s", self.identity, self.not_after.isoformat())

    def renew_at(self, rng: random.Random, jitter: float = 0.1) -> datetime:
        if self.not_before is None or self.not_after is None:
            raise TLSError("no workload certificate yet", "no-certificate")
        return renewal_time(self.not_before, self.not_after, rng, jitter)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def keep_renewed(
    holder: CertificateHolder,
    obtain: Callable[[], Awaitable[tuple[bytes, bytes, bytes]]],
    rng: random.Random,
    *,
    wall_clock: Callable[[], datetime] = _utcnow,
    retry_min: float = 1.0,
    retry_max: float = 60.0,
    verify: bool = True,
) -> None:
    """Forever: obtain (chain, key, bundle) when there is none or at renewal
    time, and ``holder.update`` with it (``verify``: see ``update``). A failed
    renewal is retried with exponential backoff; the old certificate keeps
    serving meanwhile."""
    backoff = retry_min
    while True:
        if holder.ready:
            wait = (holder.renew_at(rng) - wall_clock()).total_seconds()
            if wait > 0:
                await aio.sleep(wait)
        try:
            chain, key, bundle = await obtain()
            holder.update(chain, key, bundle, verify=verify, now=wall_clock())
            backoff = retry_min
        except Exception as exc:  # any failure: keep the old cert, retry later
            left = ""
            if holder.not_after is not None:
                left = f"; current certificate expires {holder.not_after.isoformat()}"
            log.warning("certificate renewal failed: %s%s; retrying in %.0fs", exc, left, backoff)
            await aio.sleep(backoff)
            backoff = min(backoff * 2, retry_max)


# ---------------------------------------------------------------- handshakes


@dataclass
class TLSConnection:
    stream: aio.Stream  # TLSSocketStream over a socket, trio.SSLStream over anything else
    peer_id: str  # the peer's SPIFFE ID, checked
    alpn: str | None  # "h2", "http/1.1" or None


def _context_of(ctx: ssl.SSLContext | CertificateHolder, server_side: bool) -> ssl.SSLContext:
    if isinstance(ctx, CertificateHolder):
        return ctx.server if server_side else ctx.client
    return ctx


def _describe_ssl_failure(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"peer certificate not trusted: {cause.verify_message or cause.reason}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"):
            return "peer presented no client certificate (mutual TLS required)"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
            return f"peer refused our certificate ({reason})"
        if reason == "WRONG_VERSION_NUMBER":
            return "peer did not speak TLS (plaintext on an mTLS port?)"
        return f"TLS error: {reason}"
    if isinstance(exc, aio.BrokenResourceError):
        return "connection closed during the TLS handshake"
    return f"{type(cause).__name__}: {cause}"


def wrap_stream(
    stream: aio.Stream,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    https_compatible: bool = True,
    session: ssl.SSLSession | None = None,
) -> TLSSocketStream | trio.SSLStream:
    """TLS on ``stream``, handshake not yet run: straight on the socket for a
    FastSocketStream, through trio.SSLStream for anything else."""
    if type(stream) is FastSocketStream:
        return start_tls(stream, ctx, server_side=server_side, server_hostname=server_hostname, session=session)
    from trio import SSLStream  # (only tests, on trio, have such streams: a sidecar on evloop imports no trio)

    return SSLStream(stream, ctx, server_side=server_side, server_hostname=server_hostname,
                          https_compatible=https_compatible)


async def _handshake(
    stream: aio.Stream,
    context: ssl.SSLContext | CertificateHolder,
    *,
    server_side: bool,
    expected_ids: set[str] | frozenset[str] | None,
    server_hostname: str | None,
    https_compatible: bool,
    timeout: float | None,
    now: Callable[[], datetime],
    session: ssl.SSLSession | None = None,
) -> TLSConnection:
    try:
        ctx = _context_of(context, server_side)
    except TLSError:  # no certificate yet: refuse the connection, do not leak it
        await aio.aclose_forcefully(stream)
        raise
    ssl_stream = wrap_stream(stream, ctx, server_side=server_side,
                             server_hostname=None if server_side else server_hostname,
                             https_compatible=https_compatible, session=session)
    try:
        with aio.fail_after(timeout if timeout is not None else float("inf")):
            await ssl_stream.do_handshake()
    except aio.TooSlowError:
        await aio.aclose_forcefully(ssl_stream)
        raise TLSError(f"TLS handshake timed out after {timeout}s", "tls-timeout") from None
    except (aio.BrokenResourceError, aio.ClosedResourceError) as exc:
        await aio.aclose_forcefully(ssl_stream)
        raise TLSError(f"TLS handshake failed: {_describe_ssl_failure(exc)}") from None
    except BaseException:
        await aio.aclose_forcefully(ssl_stream)  # cancelled: closed, not leaked
        raise
    der = ssl_stream.getpeercert(binary_form=True)
    try:
        if not der:
            raise PeerRejected("peer presented no certificate", "no-certificate")
        peer_id = check_peer_der(der, expected_ids, now(), usage="client" if server_side else "server",
                                 trust_domain=context.trust_domain if isinstance(context, CertificateHolder) else None)
    except PeerRejected:
        await aio.aclose_forcefully(ssl_stream)
        raise
    alpn = ssl_stream.selected_alpn_protocol()
    if isinstance(ssl_stream, TLSSocketStream):
        ssl_stream.peer_id = peer_id
        ssl_stream.principal = peer_id[len("spiffe://"):] if peer_id.startswith("spiffe://") else peer_id
    return TLSConnection(ssl_stream, peer_id, alpn)


async def server_handshake(
    stream: aio.Stream,
    context: ssl.SSLContext | CertificateHolder,
    expected_ids: set[str] | frozenset[str] | None = None,
    *,
    https_compatible: bool = True,
    timeout: float | None = HANDSHAKE_TIMEOUT,
    now: Callable[[], datetime] = _utcnow,
) -> TLSConnection:
    """Accept mutual TLS on ``stream``; ``expected_ids`` None admits any
    identity of the trust domain (authorization decides later)."""
    return await _handshake(
        stream,
        context,
        server_side=True,
        expected_ids=expected_ids,
        server_hostname=None,
        https_compatible=https_compatible,
        timeout=timeout,
        now=now,
    )


async def client_handshake(
    stream: aio.Stream,
    context: ssl.SSLContext | CertificateHolder,
    expected_ids: set[str] | frozenset[str] | None,
    *,
    server_hostname: str | None = None,
    https_compatible: bool = True,
    timeout: float | None = HANDSHAKE_TIMEOUT,
    now: Callable[[], datetime] = _utcnow,
    session: ssl.SSLSession | None = None,
) -> TLSConnection:
    """Open mutual TLS to an upstream sidecar and check it is one of
    ``expected_ids`` (from ``Endpoint.identity``). ``server_hostname`` is sent
    as SNI only. ``session``: resume this earlier session (of the same
    context) if the server still accepts it."""
    return await _handshake(
        stream,
        context,
        server_side=False,
        expected_ids=expected_ids,
        server_hostname=server_hostname,
        https_compatible=https_compatible,
        timeout=timeout,
        now=now,
        session=session,
    )


# ---------------------------------------------------------------- PERMISSIVE


def sniff_tls(first_bytes: bytes | bytearray) -> bool:
    """True if the bytes open a TLS ClientHello (record type 0x16, version 0x03 0x0?).

    No HTTP method starts with 0x16, so one byte decides; a second byte, when
    present, must be 0x03."""
    if not first_bytes or first_bytes[0] != 0x16:
        return False
    return len(first_bytes) < 2 or first_bytes[1] == 0x03


class PrefixedStream(aio.HalfCloseableStream):
    """A stream that first yields bytes already read (by the sniffer), then the rest."""

    def __init__(self, stream: aio.Stream, prefix: bytes | bytearray) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:  # trio's Stream.receive_some type
        if self._prefix:
            await aio.checkpoint()
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof = getattr(self.transport_stream, "send_eof", None)
        if send_eof is None:
            raise aio.ClosedResourceError("underlying stream cannot half-close")
        await send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    def __getattr__(self, name: str):  # socket, getpeername, ... of the stream underneath
        return getattr(self.transport_stream, name)


@dataclass
class InboundConnection:
    stream: aio.Stream  # decrypted application bytes
    peer_id: str | None  # SPIFFE ID when mTLS, None for plaintext
    tls: bool
    alpn: str | None = None


async def accept_inbound(
    stream: aio.Stream,
    holder: CertificateHolder | ssl.SSLContext,
    mode: str,
    expected_ids: set[str] | frozenset[str] | None = None,
    *,
    timeout: float | None = HANDSHAKE_TIMEOUT,
    now: Callable[[], datetime] = _utcnow,
) -> InboundConnection:
    """An inbound connection by ``Listener.mtls_mode``:

    STRICT      mTLS or nothing (plaintext is refused with a TLSError saying so);
    PERMISSIVE  mTLS if the first bytes are a ClientHello, else plaintext
                (also when the client stays silent for ``timeout``: server-first protocols);
    DISABLE     plaintext, untouched.
    """
    mode = (mode or "DISABLE").upper()
    if mode == "DISABLE":
        return InboundConnection(stream, None, False)
    if mode not in ("STRICT", "PERMISSIVE"):
        raise TLSError(f"unknown mTLS mode {mode!r} (expected STRICT, PERMISSIVE or DISABLE)", "bad-config")
    if type(stream) is FastSocketStream:
        return await _accept_socket(stream, holder, mode, expected_ids, timeout, now)
    try:
        with aio.fail_after(timeout if timeout is not None else float("inf")):
            first = await stream.receive_some(4096)
    except aio.TooSlowError:
        if mode == "PERMISSIVE":
            # a silent client may speak a server-first protocol (MySQL, SMTP...): plaintext
            return InboundConnection(stream, None, False)
        await aio.aclose_forcefully(stream)
        raise TLSError(f"client sent nothing within {timeout}s on an mTLS STRICT port", "tls-timeout") from None
    if not first:
        await aio.aclose_forcefully(stream)
        raise TLSError("connection closed before any byte arrived", "tls-handshake")
    replay = PrefixedStream(stream, first)
    if not sniff_tls(first):
        if mode == "STRICT":
            await aio.aclose_forcefully(stream)
            raise TLSError(
                "plaintext connection refused: this port requires mutual TLS (PeerAuthentication STRICT)",
                "plaintext-on-strict",
            )
        return InboundConnection(replay, None, False)
    conn = await server_handshake(replay, holder, expected_ids, timeout=timeout, now=now)
    return InboundConnection(conn.stream, conn.peer_id, True, conn.alpn)


async def _peek(stream: FastSocketStream, timeout: float | None) -> bytes | None:
    """The first bytes waiting on the socket, left there (MSG_PEEK); None if
    none came within ``timeout``. Raises TLSError on a reset."""
    sock = stream.socket
    with aio.move_on_after(timeout if timeout is not None else float("inf")):
        while True:
            try:
                return sock.recv(8, socket.MSG_PEEK)
            except BlockingIOError:
                await aio.wait_readable(sock)
            except OSError as exc:
                stream.close_now()
                raise TLSError(f"connection lost before any byte arrived: {exc}", "tls-handshake") from None
    return None


async def _accept_socket(
    stream: FastSocketStream,
    holder: CertificateHolder | ssl.SSLContext,
    mode: str,
    expected_ids: set[str] | frozenset[str] | None,
    timeout: float | None,
    now: Callable[[], datetime],
) -> InboundConnection:
    first = await _peek(stream, timeout)
    if first is None:
        if mode == "PERMISSIVE":
            return InboundConnection(stream, None, False)  # a server-first protocol, perhaps
        stream.close_now()
        raise TLSError(f"client sent nothing within {timeout}s on an mTLS STRICT port", "tls-timeout")
    if not first:
        stream.close_now()
        raise TLSError("connection closed before any byte arrived", "tls-handshake")
    if not sniff_tls(first):
        if mode == "STRICT":
            _drain_and_close(stream)
            raise TLSError(
                "plaintext connection refused: this port requires mutual TLS (PeerAuthentication STRICT)",
                "plaintext-on-strict",
            )
        return InboundConnection(stream, None, False)  # nothing was consumed
    if isinstance(holder, CertificateHolder) and not holder.ready:
        _drain_and_close(stream)
        holder.server  # raises the TLSError saying why
    conn = await server_handshake(stream, holder, expected_ids, timeout=timeout, now=now)
    return InboundConnection(conn.stream, conn.peer_id, True, conn.alpn)


def _drain_and_close(stream: FastSocketStream) -> None:
    """Close a refused connection with a FIN, not a reset: Linux answers a
    close with unread bytes (the peeked ones) with RST, and the client should
    see "closed", not "reset"."""
    sock = stream.socket
    try:
        for _ in range(16):
            if not sock.recv(65536):
                break
    except OSError:
        pass
    stream.close_now()
