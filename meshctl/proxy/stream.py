"""The proxy's socket streams, and connecting, listening and relaying over them.

``FastSocketStream`` (plain sockets; compiled, in sockstream.py, re-exported
here) and ``TLSSocketStream`` (a non-blocking ``ssl.SSLSocket``) try the
syscall first (see shared/PERFORMANCE.md): they call ``recv_into`` / ``send``
on the non-blocking socket directly and only park
(``trio.lowlevel.wait_readable`` / ``wait_writable``) when the kernel (or
OpenSSL) says it must wait. Every park is a cancellation point; to stay fair
to other connections, and to deliver cancellation to a task that never has to
park, they also run an explicit ``trio.lowlevel.checkpoint()`` every
``checkpoint_every`` calls.

Both are ``aio.HalfCloseableStream``s (FastSocketStream by registration,
see sockstream.py): TLS can wrap them and tests can swap them for
``trio.testing.memory_stream_pair()``.

Errors are mapped at this edge: connection resets and broken pipes become
``aio.BrokenResourceError``; use after ``aclose()`` is
``aio.ClosedResourceError``.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import ssl
import weakref
from typing import TYPE_CHECKING, Any, Callable

import meshctl.proxy.aio as aio
from .dns import lookup as dns_lookup
from .sockstream import DEFAULT_CHECKPOINT_EVERY, RECV_SIZE, SHARED, SHARED_VIEW, tune_socket

if TYPE_CHECKING:
    from .sockstream import FastSocketStream as _Native

    class FastSocketStream(_Native, aio.HalfCloseableStream):  # type: ignore[misc]  # (__aenter__ returns the class, not Self)
        """What type checkers see: the compiled class is a HalfCloseableStream by
        registration (sockstream.py), which they cannot follow."""
else:
    from .sockstream import FastSocketStream

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY", "RECV_SIZE", "FastSocketStream", "TLSSocketStream", "PeekSocket", "UpstreamConnectError",
    "tune_socket", "start_tls", "record_sni", "connect_tcp", "bind_listener", "accept", "is_alive", "relay",
]

PIPE_SIZE = 1 << 20  # relay pipes (os.splice)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# (the receive buffer is the plain stream's: one for every stream of the process)
_SHARED = SHARED
_SHARED_VIEW = SHARED_VIEW

_wait_readable = aio.wait_readable
_wait_writable = aio.wait_writable
_checkpoint = aio.checkpoint


class UpstreamConnectError(Exception):
    """Connecting to an upstream failed: refused, unreachable, timed out or unresolvable."""

    def __init__(self, address: str, port: int, cause: str) -> None:
        super().__init__(f"connect to {address}:{port} failed: {cause}")
        self.address = address
        self.port = port
        self.cause = cause


# ------------------------------------------------------------------ TLS


_WantRead = ssl.SSLWantReadError
_WantWrite = ssl.SSLWantWriteError
_CLOSE_NOTIFY_WAIT = 1.0  # seconds aclose() waits for room to send close_notify


class PeekSocket:
    """The part of a TLS connection's socket the proxy uses from outside the
    stream: a TCP-level ``recv(n, MSG_PEEK)`` ("is the peer gone?"; an
    ``ssl.SSLSocket`` refuses flags) and the addresses."""

    __slots__ = ("_ssl",)

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._ssl = sock

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not flags:
            raise ValueError("PeekSocket only peeks: read through the TLS stream")
        s = self._ssl
        fd = s.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "socket is closed")
        # a plain socket object on the same descriptor, detached before it can close it
        view = socket.socket(s.family, s.type, 0, fd)
        try:
            return view.recv(bufsize, flags)
        finally:
            view.detach()

    def getpeername(self):
        return self._ssl.getpeername()

    def getsockname(self):
        return self._ssl.getsockname()

    def fileno(self) -> int:
        return self._ssl.fileno()


def _tls_broken(exc: BaseException) -> aio.BrokenResourceError:
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)  # (None for some: typeshed says str, compiled code would check)
        return aio.BrokenResourceError(f"TLS error: {reason or exc}")
    return aio.BrokenResourceError(f"connection lost: {exc}")


class TLSSocketStream(aio.HalfCloseableStream):
    """TLS over a non-blocking ``ssl.SSLSocket``, trying the syscall first like
    ``FastSocketStream`` (trio's ``SSLStream`` pumps a memory BIO through the
    scheduler and costs about twice as much per round trip, see
    shared/PERFORMANCE.md).

    OpenSSL reads and writes the socket itself; this class only parks:
    ``SSLWantReadError`` waits for readability, ``SSLWantWriteError`` for
    writability, in either direction (a read can need a write: a TLS 1.3
    KeyUpdate the peer asks us to answer; a write can need a read). A write
    that could not finish is retried with the same bytes, as OpenSSL requires.
    ``aclose()`` sends close_notify (not waiting for the peer's) and closes;
    ``close_now()`` closes at once, without it. A close_notify or a TCP EOF
    from the peer (HTTP frames its own messages: a truncated message is seen
    there) reads as EOF. TLS and socket errors become
    ``aio.BrokenResourceError``; use after close ``aio.ClosedResourceError``.

    The proxy's extras: ``peer_id`` / ``principal`` / ``alpn`` (set by the
    handshake code in proxy/tls.py and proxy/identity.py), ``sni`` (server
    side: the server name of the client's ClientHello, when its context was
    given to ``record_sni``), ``socket`` (a
    ``PeekSocket``), ``closed``, ``close_now()``, ``fileno()``.

    Half-closeable the way the receiving side reads it: ``send_eof()`` sends a
    TCP FIN under the session and keeps receiving (Python's ssl sends close_notify
    only inside a two-way ``unwrap``, whose second SSL_shutdown drops application
    records the peer is still sending); the peer reads the FIN as EOF and may go on
    sending (opaque TCP over mTLS: relay() passes each direction's end on alone).
    """

    __slots__ = (
        "raw", "sock", "peer_id", "principal", "alpn", "sni", "quickack", "on_session", "park_after_send",
        "_send_busy", "_handshaken", "_write_pending", "_owed", "_eof_sent", "_obj",
        "_recv_busy", "_park_next", "_calls", "_every",
    )

    def __init__(self, raw: FastSocketStream, sock: ssl.SSLSocket) -> None:
        self.raw = raw  # raw.socket is the SSLSocket now: raw.close_now() closes it
        self.sock = sock
        self.peer_id: str | None = None
        self.principal: str | None = None
        self.alpn: str | None = None
        self.sni: str | None = None
        self.quickack = False
        # called once with the connection's resumable session (client side; see identity.UpstreamTLS)
        self.on_session: Callable[[ssl.SSLSession], None] | None = None
        self.park_after_send = raw.park_after_send
        self._calls = 0
        self._every = raw._every
        self._recv_busy = False
        self._send_busy = False
        self._park_next = False
        self._handshaken = False
        self._write_pending = False  # a send_all was cancelled with a record half-written
        self._owed: object = None  # the bytes of that write: a send_all of this very object may finish it
        self._eof_sent = False
        # The SSL object under ``sock`` (``_ssl._SSLSocket``): reads, writes and
        # pending() go to it directly. SSLSocket's Python methods (recv_into -> read ->
        # _sslobj.read, send -> _sslobj.write, pending, each with a _checkClosed) only
        # add frames on a connected socket; the one thing they add, ragged EOF read as
        # EOF, receive_some does itself.
        self._obj = sock._sslobj  # type: ignore[attr-defined]

    # -------------------------------------------------------------- handshake

    async def do_handshake(self) -> None:
        """Run the TLS handshake. Raises aio.BrokenResourceError (cause: the
        ssl or OS error) when it fails."""
        sock = self.sock
        if self.raw.closed:
            raise aio.ClosedResourceError("stream was closed")
        while True:
            try:
                sock.do_handshake()
                break
            except _WantRead:
                await _wait_readable(sock)
            except _WantWrite:
                await _wait_writable(sock)
            except (ssl.SSLError, OSError) as exc:
                if self.raw.closed:
                    raise aio.ClosedResourceError("stream was closed") from None
                raise _tls_broken(exc) from exc
        self._handshaken = True
        self.alpn = sock.selected_alpn_protocol()
        if sock.server_side:
            self.sni = _SNI_SEEN.pop(sock, None)
        if self.on_session is not None and sock.version() != "TLSv1.3":
            self._offer_session()  # TLS 1.2: the session is complete now

    def _offer_session(self) -> None:
        """Hand the connection's resumable session to ``on_session``, and look only
        once: TLS 1.2's is complete with the handshake; a TLS 1.3 ticket comes after
        the handshake, ahead of the server's first bytes, so the first read that
        returns any has taken it in, or the server sends none. (Reading
        ``sock.session`` copies the session, peer certificate included: 0.2-0.5 ms
        of CPU. Looking again on every read, for a server that sends no tickets,
        cost that much per read.)"""
        cb = self.on_session
        self.on_session = None
        s = self.sock.session
        if cb is not None and s is not None and (s.has_ticket or self.sock.version() != "TLSv1.3"):
            cb(s)

    # -------------------------------------------------------------- receive

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Try the SSL object's read first, straight into the shared buffer; park only
        on want-read (on want-write: a KeyUpdate to answer first)."""
        if self._recv_busy:
            raise aio.BusyResourceError("another task is already receiving on this stream")
        if self.raw._closed:
            raise aio.ClosedResourceError("stream was closed")
        size = RECV_SIZE if max_bytes is None or max_bytes > RECV_SIZE else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._recv_busy = True
        try:
            obj = self._obj
            if self._park_next and not obj.pending():
                # right after a send the answer cannot be there yet: wait for it
                # (unless OpenSSL holds decrypted bytes already)
                self._park_next = False
                self._calls = 0
                await _wait_readable(self.sock)
            else:
                self._park_next = False
                self._calls += 1
                if self._calls >= self._every:
                    self._calls = 0
                    await _checkpoint()
            while True:
                try:
                    n = obj.read(size, _SHARED)
                except _WantRead:
                    await _wait_readable(self.sock)
                    continue
                except _WantWrite:  # answering the peer (a KeyUpdate) must write first
                    await self._wait_other(False)
                    continue
                except ssl.SSLEOFError:  # a TCP EOF without close_notify: EOF (ssl's suppress_ragged_eofs)
                    n = 0
                except (OSError, ValueError) as exc:  # (SSLError is an OSError)
                    raise self._map_error(exc) from exc
                if self.on_session is not None and n:
                    self._offer_session()
                return _SHARED_VIEW[:n].tobytes()
        finally:
            self._recv_busy = False

    def _map_error(self, exc: Exception) -> aio.ClosedResourceError | aio.BrokenResourceError:
        if self.raw._closed or isinstance(exc, ValueError):
            return aio.ClosedResourceError("stream was closed")
        return _tls_broken(exc)

    async def _wait_other(self, readable: bool) -> None:
        """Park for the direction the other task normally waits on (a read
        that must write, or a write that must read). If that task is parked
        on it already, trio allows no second waiter: let it run, then retry."""
        try:
            if readable:
                await _wait_readable(self.sock)
            else:
                await _wait_writable(self.sock)
        except aio.BusyResourceError:
            await aio.sleep(0.001)

    # -------------------------------------------------------------- send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise aio.BusyResourceError("another task is already sending on this stream")
        raw = self.raw
        if raw._closed:
            raise aio.ClosedResourceError("stream was closed")
        self._send_busy = True
        try:
            self._calls += 1
            if self._calls >= self._every:
                self._calls = 0
                await _checkpoint()
            total = len(data)
            if not total:
                return
            if self._write_pending and data is not self._owed:
                raise aio.BrokenResourceError("an earlier send_all was cancelled in the middle of a TLS record")
            if self._eof_sent:
                raise aio.ClosedResourceError("send_eof() was called: this side is closed for sending")
            self._park_next = self.park_after_send
            obj = self._obj
            # SSL_write takes all of it or nothing (ssl sets no partial-write mode): one
            # call on the common path; after a want-read/want-write OpenSSL needs the same
            # bytes again (it keeps what it has encrypted and sent of them)
            while True:
                try:
                    obj.write(data)
                    self._write_pending = False
                    self._owed = None
                    return
                except _WantWrite:
                    self._write_pending = True
                    self._owed = data
                    await _wait_writable(self.sock)
                except _WantRead:
                    self._write_pending = True
                    self._owed = data
                    await self._wait_other(True)
                except (OSError, ValueError) as exc:  # (SSLError is an OSError)
                    if raw._closed or isinstance(exc, ValueError):
                        raise aio.ClosedResourceError("stream was closed") from None
                    raise _tls_broken(exc) from exc
        finally:
            self._send_busy = False

    def send_nowait(self, data: bytes) -> int:
        """Write ``data`` now, without parking (outbuf.py): ``len(data)`` when OpenSSL took it
        all; 0 when it took nothing (another task is sending, or a write is unfinished); -1
        when OpenSSL must wait for the socket with a record started: ``send_all`` of this
        very ``data`` object finishes it, and nothing else may be sent first. Errors as
        send_all's."""
        if self._send_busy or self._write_pending:
            return 0
        raw = self.raw
        if raw._closed:
            raise aio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise aio.ClosedResourceError("send_eof() was called: this side is closed for sending")
        if not data:
            return 0
        self._park_next = self.park_after_send
        try:
            self._obj.write(data)
        except (_WantWrite, _WantRead):
            self._write_pending = True
            self._owed = data
            return -1
        except (OSError, ValueError) as exc:  # (SSLError is an OSError)
            if raw._closed or isinstance(exc, ValueError):
                raise aio.ClosedResourceError("stream was closed") from None
            raise _tls_broken(exc) from exc
        return len(data)

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise aio.BusyResourceError("another task is already sending on this stream")
        if self.raw._closed:
            raise aio.ClosedResourceError("stream was closed")
        self._send_busy = True
        try:
            await _wait_writable(self.sock)
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        """Half-close: a TCP FIN, no close_notify (see the class doc); receiving goes on."""
        if self._send_busy:
            raise aio.BusyResourceError("another task is sending on this stream")
        if self.raw._closed:
            raise aio.ClosedResourceError("stream was closed")
        await _checkpoint()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)  # not SSLSocket.shutdown: it drops the session
        except OSError:
            pass  # peer already gone: nothing left to half-close

    # -------------------------------------------------------------- close

    def _close_notify(self) -> bool:
        """Try to send close_notify now; False if the socket buffer is full."""
        try:
            self.sock.unwrap()
        except _WantRead:
            pass  # ours is out; the peer's is not awaited
        except _WantWrite:
            return False
        except (ssl.SSLError, OSError, ValueError):
            pass  # peer gone or never handshaken: nothing to say goodbye to
        return True

    def close_now(self) -> None:
        """Close at once, without close_notify (an abort)."""
        self.raw.close_now()

    async def aclose(self) -> None:
        """Send close_notify (waiting up to a second for room to), then close."""
        raw = self.raw
        if raw._closed:
            await _checkpoint()
            return
        try:
            if self._handshaken and not self._send_busy and not self._eof_sent and not self._close_notify():
                with aio.move_on_after(_CLOSE_NOTIFY_WAIT):
                    await _wait_writable(self.sock)
                    self._close_notify()
        finally:
            raw.close_now()
        await _checkpoint()

    @property
    def closed(self) -> bool:
        return self.raw._closed

    @property
    def socket(self) -> PeekSocket:
        return PeekSocket(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def ack_now(self) -> None:
        self.raw.ack_now()

    # -------------------------------------------------------------- what ssl knows

    def getpeercert(self, binary_form: bool = False):
        return self.sock.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self.sock.selected_alpn_protocol()

    @property
    def session_reused(self) -> bool:
        return bool(self.sock.session_reused)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.sock.session

    def version(self) -> str | None:
        return self.sock.version()


# The server name each server-side handshake's ClientHello carried, by SSL
# socket, until do_handshake takes it (connection.sni in AuthorizationPolicy).
_SNI_SEEN: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def _note_sni(sock: object, name: str | None, ctx: ssl.SSLContext) -> None:
    if name:
        _SNI_SEEN[sock] = name


def record_sni(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make server-side TLSSocketStreams of ``context`` record the client's SNI (``.sni``)."""
    context.sni_callback = _note_sni
    return context


def start_tls(
    raw: FastSocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> TLSSocketStream:
    """Put TLS on ``raw`` (handshake not yet run: ``await s.do_handshake()``).
    From here on the socket belongs to the returned stream. ``session`` (client
    side) asks to resume an earlier session of the same context."""
    if raw._closed:
        raise aio.ClosedResourceError("stream was closed")
    # (ssl refuses a session of another context, and closes the socket doing so:
    # callers keep each session with the context it came from)
    sock = context.wrap_socket(raw.socket, server_side=server_side, do_handshake_on_connect=False,
                               server_hostname=server_hostname, session=session)
    raw.socket = sock  # wrap_socket detached the plain socket object; raw closes the SSLSocket
    return TLSSocketStream(raw, sock)


# ------------------------------------------------------------------ connect / listen


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def connect_tcp(host: str, port: int, *, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> FastSocketStream:
    """Open a TCP connection. Raises UpstreamConnectError (never OSError).

    Callers put their own deadline around it (connect timeout)."""
    infos: list[tuple[int, tuple[Any, ...]]]
    if _is_ip(host):
        infos = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
    else:
        try:
            infos = await dns_lookup(host, port)  # TTL-respecting cache, refreshed off the request path (dns.py)
        except OSError as exc:
            raise UpstreamConnectError(host, port, f"cannot resolve {host!r}: {exc}") from None
    last = "no address"
    for family, addr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                try:
                    await _wait_writable(sock)
                except BaseException:
                    sock.close()
                    raise
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                return FastSocketStream(sock, checkpoint_every=checkpoint_every, quickack=True)
            last = os.strerror(err)
        except OSError as exc:
            last = str(exc)
        sock.close()
    raise UpstreamConnectError(host, port, last)


def bind_listener(address: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking socket. Raises OSError with the address."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}:{port}: {getattr(exc, 'strerror', None)}") from None
    return sock


async def accept(listen_sock: socket.socket) -> tuple[socket.socket, tuple]:
    """Accept one connection, parking only when none is pending."""
    while True:
        try:
            conn, addr = listen_sock.accept()
        except BlockingIOError:
            await _wait_readable(listen_sock)
            continue
        except OSError as exc:
            code = getattr(exc, "errno", None)  # (None is possible, whatever typeshed says)
            if code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                await aio.sleep(0.05)  # out of fds: back off instead of spinning
                continue
            if code in (errno.ECONNABORTED, errno.EPROTO):
                continue
            raise
        return conn, addr


def is_alive(stream: FastSocketStream | TLSSocketStream) -> bool:
    """Cheap check that an idle pooled connection was not closed by the peer."""
    if stream.closed:
        return False
    if isinstance(stream, TLSSocketStream) and stream.sock.pending():
        return False  # decrypted bytes nobody asked for
    try:
        data = stream.socket.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    # b"" is EOF; unsolicited bytes on an idle HTTP connection make it unusable too
    del data
    return False


# ------------------------------------------------------------------ opaque relay


async def _splice_one_way(src: FastSocketStream, dst: FastSocketStream, counts: list[int], i: int) -> None:
    """Move bytes src → dst through a pipe with os.splice (no copy into Python),
    then half-close dst. Adds the bytes moved to ``counts[i]`` as they go."""
    r, w = os.pipe()
    try:  # a 1 MiB pipe (the default maximum): 16x fewer splices and wake-ups than 64 KiB
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    sfd, dfd = src.socket.fileno(), dst.socket.fileno()
    calls = 0
    try:
        while True:
            try:
                n = os.splice(sfd, w, 1 << 20, flags=flags)
            except BlockingIOError:
                await _wait_readable(src.socket)
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise aio.BrokenResourceError(str(exc)) from exc
            if n == 0:
                break
            left = n
            while left:
                try:
                    m = os.splice(r, dfd, left, flags=flags)
                except BlockingIOError:
                    await _wait_writable(dst.socket)
                    continue
                except (ConnectionResetError, BrokenPipeError) as exc:
                    raise aio.BrokenResourceError(str(exc)) from exc
                left -= m
                counts[i] += m
            calls += 1
            if calls % 16 == 0:
                await _checkpoint()
    finally:
        os.close(r)
        os.close(w)
    if not dst.closed:
        try:
            dst.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass


async def _copy_one_way(src: aio.Stream, dst: aio.Stream, counts: list[int], i: int) -> None:
    while True:
        data = await src.receive_some()
        if not data:
            break
        await dst.send_all(data)
        counts[i] += len(data)
    if isinstance(dst, aio.HalfCloseableStream):
        try:
            await dst.send_eof()
        except (aio.BrokenResourceError, aio.ClosedResourceError):
            pass


async def relay(a: aio.Stream, b: aio.Stream) -> tuple[int, int]:
    """Relay opaque bytes both ways until both directions saw EOF, propagating
    half-close. Uses os.splice when both legs are plain sockets. Returns
    (bytes a→b, bytes b→a), counted as they are passed on, so a direction cut short
    (the other leg's EOF on a TLS leg, a reset) still counts what it moved.
    Connection errors end the relay quietly."""
    use_splice = isinstance(a, FastSocketStream) and isinstance(b, FastSocketStream) and hasattr(os, "splice")
    one_way = _splice_one_way if use_splice else _copy_one_way
    counts = [0, 0]

    async def run(i: int, src: aio.Stream, dst: aio.Stream, cancel: aio.CancelScope) -> None:
        try:
            await one_way(src, dst, counts, i)  # type: ignore[arg-type]
        except (aio.BrokenResourceError, aio.ClosedResourceError, OSError):
            cancel.cancel()  # a reset on one leg ends both
            return
        if not isinstance(dst, aio.HalfCloseableStream):
            cancel.cancel()  # no way to pass the EOF on (TLS leg): closing both is the only EOF there is

    async with aio.open_nursery() as nursery:
        nursery.start_soon(run, 0, a, b, nursery.cancel_scope)
        nursery.start_soon(run, 1, b, a, nursery.cancel_scope)
    return counts[0], counts[1]
