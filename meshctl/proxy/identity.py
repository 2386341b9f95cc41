"""The sidecar's identity at work: its certificate lifecycle, and mTLS on both legs.

- ``start_identity`` (called by the sidecar entry point): when the supervisor
  handed over ``MESHCTL_CITADEL_URL`` and a one-time ``MESHCTL_CITADEL_TOKEN``
  (in the sidecar's 0600 bootstrap file, deleted once read: see
  meshctl/credentials.py; never in /proc/PID/environ), get the first SVID from Citadel and
  keep it renewed at half-life with jitter (``tls.keep_renewed``). The key, CSR,
  proof and Citadel exchange run in a short-lived child each time
  (citadel/fetch.py), so the sidecar never imports `cryptography`. The token
  is removed from the process environment once read.
- ``secure_inbound``: an inbound connection by ``Listener.mtls_mode``
  (``tls.accept_inbound``), wrapped as a ``SecureStream`` that remembers the
  verified peer SPIFFE ID (authz ``source.principal``, metrics
  ``connection_security_policy="mutual_tls"``).
- ``upstream_tls``: what the outbound side does for one cluster endpoint, as
  Istio decides it: DestinationRule ``tls.mode`` ISTIO_MUTUAL → mTLS checking
  the endpoint's SPIFFE ID; no DR tls and an endpoint that is a meshctl
  sidecar (``Endpoint.identity``) → mTLS as well (auto mTLS); DISABLE → plain;
  SIMPLE / MUTUAL → TLS with the DR's CA (and client certificate for MUTUAL).
  The returned ``UpstreamTLS`` carries a ``key`` that goes into the upstream
  pool's key, so plain and mTLS connections to one address never mix.
"""

from __future__ import annotations

from typing import Sequence

import logging
import os
import random
import ssl
from functools import partial

import meshctl.proxy.aio as aio
from ..citadel.errors import PeerRejected, TLSError
from ..core.logthrottle import held_back
from ..protocol.detect import UPSTREAM_ALPN
from .stream import FastSocketStream, TLSSocketStream, UpstreamConnectError, start_tls

log = logging.getLogger("meshctl.identity")

ENV_URL = "MESHCTL_CITADEL_URL"
ENV_TOKEN = "MESHCTL_CITADEL_TOKEN"
FIRST_CERT_WAIT = 15.0  # seconds a sidecar waits for its first certificate before serving anyway

__all__ = [
    "SecureStream",
    "SidecarCertificates",
    "UpstreamTLS",
    "principal_of",
    "secure_inbound",
    "start_identity",
    "upstream_tls",
]


def principal_of(spiffe_id: str | None) -> str | None:
    """Istio's principal form of a SPIFFE ID: ``cluster.local/ns/default/sa/x``."""
    if not spiffe_id:
        return None
    return spiffe_id[len("spiffe://"):] if spiffe_id.startswith("spiffe://") else spiffe_id


# ---------------------------------------------------------------- certificates
#
# The TLS machinery (proxy/tls.py, citadel/leaf.py) is imported only by a sidecar
# that gets an identity; one without Citadel never loads it. Neither imports
# `cryptography` (~12 MB): that is the fetch child's (citadel/fetch.py).


def __getattr__(name: str):
    if name == "SidecarCertificates":
        from .sidecar_certs import SidecarCertificates

        return SidecarCertificates
    raise AttributeError(name)


async def start_identity(rt, environ=None, *, task_status=aio.TASK_STATUS_IGNORED) -> None:
    """Run the certificate lifecycle for ``rt`` (sets ``rt.tls``) until cancelled.

    Without ``MESHCTL_CITADEL_URL`` the sidecar has no identity: started at
    once, returns. Otherwise ``task_status.started()`` comes once the first
    certificate is in (or after FIRST_CERT_WAIT seconds, with a warning:
    the sidecar then serves plaintext where allowed and keeps trying)."""
    if environ is None:
        environ = os.environ
    url = environ.get(ENV_URL, "")
    token = environ.pop(ENV_TOKEN, "")
    if not url:
        task_status.started()
        return
    if not token:
        log.error("%s is set but %s is not: no certificate can be requested", ENV_URL, ENV_TOKEN)
        task_status.started()
        return
    from ..citadel.fetch import ChildCertificateSource
    from .sidecar_certs import SidecarCertificates
    from .tls import keep_renewed

    holder = SidecarCertificates()
    rt.tls = holder
    # on evloop the child runs from a worker thread (evloop has no run_process); on trio, trio.run_process
    source = ChildCertificateSource(url, token, in_thread=aio.run_sync_in_thread if aio.LOOP == "evloop" else None)
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    async with aio.open_nursery() as n:
        # verify=False: the fetch process checked the certificate as a peer would
        n.start_soon(partial(keep_renewed, holder, source.obtain, rng, verify=False))
        with aio.move_on_after(FIRST_CERT_WAIT):
            while not holder.ready:
                await aio.sleep(0.02)
        if not holder.ready:
            log.warning("no certificate from Citadel at %s after %.0fs: serving without one, still trying",
                        url, FIRST_CERT_WAIT)
        task_status.started()


# ---------------------------------------------------------------- the stream


# A TLS stream over a FastSocketStream's socket, with what the proxy asks of
# its streams (``socket``, ``closed``, ``close_now``) and the verified peer
# (``peer_id``, ``principal``, ``alpn``). See stream.TLSSocketStream.
# Not half-closeable: opaque TCP relayed over mTLS ends when either side closes
# (request/response protocols are unaffected).
SecureStream = TLSSocketStream


# ---------------------------------------------------------------- inbound


async def secure_inbound(rt, listener, stream: FastSocketStream):
    """The stream the inbound handler should serve, by ``listener.mtls_mode``.

    Returns ``stream`` itself for plaintext, a ``SecureStream`` for mTLS, or
    None when the connection was refused (already closed; the reason logged
    and counted in meshctl_downstream_cx_tls_refused)."""
    mode = (listener.mtls_mode or "DISABLE").upper()
    holder = getattr(rt, "tls", None)
    if mode == "DISABLE" or listener.direction != "inbound":
        return stream
    if holder is None:
        # a sidecar without an identity (no Citadel): PERMISSIVE is plaintext;
        # STRICT fails closed
        if mode == "PERMISSIVE":
            return stream
        _refused(rt, listener, "this sidecar has no certificate, and the port requires mutual TLS")
        stream.close_now()
        return None
    from .tls import accept_inbound  # loaded already: the holder came from it

    try:
        conn = await accept_inbound(stream, holder, mode)
    except (TLSError, PeerRejected) as exc:
        _refused(rt, listener, str(exc))
        return None
    return conn.stream  # the accepted stream itself (plaintext) or a SecureStream with the verified peer


def _refused(rt, listener, why: str) -> None:
    rt.stats.listener(listener.name).cx_tls_refused += 1
    held = rt.refusal_log.admit(("tls", listener.name, why), aio.current_time())
    if held is not None:
        log.info("%s: connection refused: %s%s", listener.name, why, held_back(held))


# ---------------------------------------------------------------- outbound


class UpstreamTLS:
    """How to secure one upstream connection; ``key`` distinguishes pools.

    Keeps the latest resumable TLS session per upstream address (with the
    context it belongs to), so a pool's new connections to a server it has
    talked to resume instead of running a full handshake."""

    __slots__ = ("mode", "key", "expected", "holder", "context", "sni", "h2", "sessions", "sans")

    def __init__(self, mode: str, key: tuple, *, expected=None, holder=None, context=None, sni=None,
                 h2: bool = False, sans: frozenset[str] | None = None) -> None:
        self.sans = sans  # SIMPLE/MUTUAL: the server certificate must carry one of these SANs (subjectAltNames)
        self.mode = mode
        self.key = key
        self.expected = expected
        self.holder = holder
        self.context = context
        self.sni = sni
        self.h2 = h2  # offer ALPN "h2" (HTTP/2 upstream pool), else "http/1.1"
        self.sessions: dict[tuple[str, int], tuple[ssl.SSLContext, ssl.SSLSession]] = {}

    def _session_for(self, ctx: ssl.SSLContext, address: str, port: int) -> ssl.SSLSession | None:
        got = self.sessions.get((address, port))
        if got is None or got[0] is not ctx:
            return None  # none yet, or from before a certificate renewal
        return got[1]

    def _keeper(self, ctx: ssl.SSLContext, address: str, port: int):
        sessions = self.sessions

        def keep(session: ssl.SSLSession) -> None:
            if len(sessions) > 4096:
                sessions.clear()
            sessions[(address, port)] = (ctx, session)

        return keep

    async def wrap(self, raw: FastSocketStream, address: str, port: int) -> SecureStream:
        """Handshake on a fresh connection. Raises UpstreamConnectError (the
        connection is closed) when it fails or the peer is not who it should be."""
        try:
            if self.mode == "ISTIO_MUTUAL":
                from .tls import client_handshake

                ctx = self.holder.client
                if self.h2:
                    ctx = getattr(self.holder, "client_h2", None) or ctx
                conn = await client_handshake(raw, ctx, self.expected, server_hostname=self.sni,
                                              session=self._session_for(ctx, address, port))
                tls = conn.stream
                assert isinstance(tls, TLSSocketStream)
                if not tls.session_reused or tls.version() == "TLSv1.3":
                    tls.on_session = self._keeper(ctx, address, port)  # TLS 1.3: a fresh ticket each time
                return tls
            ctx = self.context
            tls = start_tls(raw, ctx, server_side=False, server_hostname=self.sni,
                            session=self._session_for(ctx, address, port))
            tls.on_session = self._keeper(ctx, address, port)
            try:
                await tls.do_handshake()
            except aio.BrokenResourceError as exc:
                cause = exc.__cause__ or exc
                raise TLSError(f"TLS handshake failed: {getattr(cause, 'reason', None) or cause}") from None
            if self.sans:
                names = peer_alt_names(tls.sock.getpeercert() or {})
                if not any(san_matches(want, names) for want in self.sans):
                    raise TLSError(f"the server certificate's names {', '.join(names) or '(none)'} match none of "
                                   f"subjectAltNames {', '.join(sorted(self.sans))}")
            return tls
        except BaseException as exc:
            raw.close_now()
            if not isinstance(exc, (TLSError, PeerRejected)):
                raise  # cancelled (connect timeout): closed, not leaked
            raise UpstreamConnectError(address, port, f"{'mTLS' if self.mode == 'ISTIO_MUTUAL' else 'TLS'}: {exc}") from None


_cache: dict[tuple, UpstreamTLS | None] = {}


def peer_alt_names(cert: dict) -> list[str]:
    """The subject alternative names of a verified peer certificate (DNS, URI, IP)."""
    return [str(v) for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "URI", "IP Address")]


def san_matches(want: str, names: Sequence[str]) -> bool:
    """Whether a subjectAltNames entry is among a certificate's names: exactly (DNS names
    case-insensitively), or a DNS name under a certificate's one-label wildcard."""
    w = want.lower()
    for n in names:
        n = n.lower()
        if n == w:
            return True
        if n.startswith("*.") and "." in w and w.split(".", 1)[1] == n[2:] and w.split(".", 1)[0]:
            return True
    return False


# upstream_tls's answer per endpoint object (by id, with the objects it was worked out
# from, kept alive here so that no id is reused while its entry stands): the forwarder
# asks once per try, and the answer changes only with the config (new Cluster and
# Endpoint objects) or the sidecar's holder.
_by_ep: dict[int, tuple[object, object, object, bool, UpstreamTLS | None]] = {}


def upstream_tls(rt, cluster, ep, *, h2: bool = False) -> UpstreamTLS | None:
    """What to do for ``ep`` of ``cluster`` (None: plaintext); ``h2`` for a
    connection that will speak HTTP/2 (ALPN "h2" instead of "http/1.1").

    Raises UpstreamConnectError when the DestinationRule asks for mutual TLS
    and this sidecar has no certificate (a plaintext attempt would only be
    refused, or worse, accepted by a PERMISSIVE peer against the rule)."""
    holder = getattr(rt, "tls", None)
    hit = _by_ep.get(id(ep))
    if hit is not None and hit[0] is ep and hit[1] is cluster and hit[2] is holder and hit[3] is h2:
        return hit[4]
    got = _decide(cluster, ep, h2, holder)
    if len(_by_ep) >= 4096:
        _by_ep.clear()
    _by_ep[id(ep)] = (ep, cluster, holder, h2, got)
    return got


def _decide(cluster, ep, h2: bool, holder) -> UpstreamTLS | None:
    tp = cluster.traffic_policy
    tls = tp.tls if tp is not None else None
    mode = tls.mode if tls is not None and tls.mode else None
    # subjectAltNames: the DestinationRule's, else the ServiceEntry's (Istio: the rule's win)
    sans = tuple(tls.subject_alt_names) if tls is not None and tls.subject_alt_names else cluster.subject_alt_names
    if mode is None:
        # auto mTLS: to a meshctl sidecar, when we have an identity ourselves
        if ep.identity is None or holder is None:
            return None
        mode = "ISTIO_MUTUAL"
    if mode == "DISABLE":
        return None
    if mode == "ISTIO_MUTUAL":
        if holder is None:
            raise UpstreamConnectError(ep.address, ep.port,
                                       "DestinationRule asks for ISTIO_MUTUAL but this sidecar has no certificate")
        # SNI: the DestinationRule's ``sni``, else Istio's for its mTLS clusters,
        # outbound_.<port>_.<subset>_.<host> (what an SNI-routing gateway (AUTO_PASSTHROUGH)
        # reads and a server logs or matches as connection.sni); the peer is checked by
        # its SPIFFE ID, never by this name
        sni = (tls.sni if tls is not None and tls.sni else
               f"outbound_.{cluster.port}_.{cluster.subset or ''}_.{cluster.service}")
        ck: tuple[object, ...] = ("mtls", ep.identity, id(holder), h2, sans, sni)
        got = _cache.get(ck)
        if got is None:
            # the peer's SPIFFE ID: one of subjectAltNames when given, else the endpoint's identity
            expected = frozenset(sans) if sans else (frozenset({ep.identity}) if ep.identity else None)
            got = _cache[ck] = UpstreamTLS("ISTIO_MUTUAL", ("mtls", ep.identity, h2, sni), expected=expected,
                                           holder=holder, h2=h2, sni=sni)
        return got
    # SIMPLE or MUTUAL with files named by the DestinationRule
    assert tls is not None  # mode came from it
    ck = ("tls", mode, tls.ca_certificates, tls.client_certificate, tls.private_key, tls.sni,
          bool(tls.insecure_skip_verify), cluster.service, sans)
    got = _cache.get(ck)
    if got is None:
        check = frozenset(sans) if sans and not tls.insecure_skip_verify else None
        got = _cache[ck] = UpstreamTLS(mode, ck, context=_simple_context(tls, mode, ep, bool(check)),
                                       sni=tls.sni or cluster.service, sans=check)
    return got


def _simple_context(tls, mode: str, ep, by_sans: bool = False) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_certificates or None)
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif by_sans or not tls.sni:
            # chain checked; the names: subjectAltNames after the handshake (UpstreamTLS.wrap),
            # as Envoy's SAN matchers replace the host name check, or none given to check against
            ctx.check_hostname = False
        if mode == "MUTUAL" and tls.client_certificate:
            ctx.load_cert_chain(tls.client_certificate, tls.private_key or None)
        ctx.set_alpn_protocols(list(UPSTREAM_ALPN))
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamConnectError(ep.address, ep.port,
                                   f"DestinationRule tls {mode}: cannot load certificates: {exc}") from None
    return ctx


async def run_with_identity(rt, main, *args, environ=None) -> None:
    """Run ``main(*args)`` (the proxy) with the certificate lifecycle beside it:
    the first certificate is awaited (bounded) before the proxy starts serving.
    ``environ``: where the Citadel URL and token are (default os.environ; the
    sidecar passes what it read from its one-time bootstrap file)."""
    async with aio.open_nursery() as n:
        await n.start(partial(start_identity, rt, environ))
        await main(*args)
        n.cancel_scope.cancel()
