"""The local user behind an accepted loopback connection (Linux NETLINK_SOCK_DIAG).

One exact inet_diag lookup per accepted connection on an outbound or binding
listener: an ``inet_diag_req_v2`` (SOCK_DIAG_BY_FAMILY, TCP, the peer's socket
id: its address and port as source, ours as destination, no cookie) sent on a
netlink socket kept open for the proxy's life. The kernel answers within the
send() with one ``inet_diag_msg`` whose ``idiag_uid`` owns the peer's socket,
or an NLMSG_ERROR (ENOENT: no such socket). core/peeruid.py decides.

Where the lookup cannot run (no AF_NETLINK, the socket cannot be opened, or
the start-up probe, a lookup of a connection of our own, does not answer our
own uid), the check is off: ``off_reason`` says why, logged once.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Any

import meshctl.proxy.aio as aio
from ..core.logthrottle import held_back
from ..core.peeruid import Admit, LookupFailed, NoSocket, PeerLookup, decide, resolve_users
from .overload import Refusal, refuse

log = logging.getLogger("meshctl.proxy")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_PORTS = struct.Struct("!HH")  # sport, dport (network order)
_TAIL = struct.Struct("=III")  # if, cookie[2]
_UID_OFFSET = 16 + 4 + 48 + 12  # nlmsghdr, family/state/timer/retrans, sockid, expires/rqueue/wqueue
OFF_LOG = "outbound listeners: the local-user check is OFF (%s): every local user can send with this workload's identity"
_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF


def _addr16(family: int, address: str) -> bytes:
    raw = socket.inet_pton(family, address)
    return raw + bytes(16 - len(raw))


class PeerUids:
    """The netlink lookup; ``off_reason`` is not None when it cannot run here."""

    __slots__ = ("_nl", "_seq", "off_reason")

    def __init__(self, *, quiet: bool = False) -> None:
        self._nl: socket.socket | None = None
        self._seq = 0
        self.off_reason: str | None = None
        family = getattr(socket, "AF_NETLINK", None)
        try:
            if family is None:
                raise OSError("this system has no netlink (not Linux)")
            nl = socket.socket(family, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            nl.bind((0, 0))
        except OSError as exc:
            self.off_reason = f"no NETLINK_SOCK_DIAG: {exc.strerror or exc}"
            if not quiet:
                log.warning(OFF_LOG, self.off_reason)
            return
        self._nl = nl
        self.off_reason = self._probe()
        if self.off_reason is not None:
            self.close()
            if not quiet:
                log.warning(OFF_LOG, self.off_reason)

    def _probe(self) -> str | None:
        """A lookup of a loopback connection of our own must answer our uid."""
        try:
            with socket.socket() as ls:
                ls.bind(("127.0.0.1", 0))
                ls.listen(1)
                with socket.create_connection(ls.getsockname(), timeout=2.0) as c:
                    s, _ = ls.accept()
                    with s:
                        got = self.lookup(s)
        except OSError as exc:
            return f"the start-up probe failed: {exc.strerror or exc}"
        if got != os.geteuid():
            return f"the start-up probe's own connection was not found ({got!r})"
        return None

    def lookup(self, sock: socket.socket) -> PeerLookup:
        """The uid owning the other end of the accepted TCP socket ``sock``."""
        nl = self._nl
        if nl is None:
            return LookupFailed(self.off_reason or "closed")
        try:
            family = sock.family
            peer = sock.getpeername()
            local = sock.getsockname()
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
            req = (_REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES)
                   + _PORTS.pack(peer[1], local[1]) + _addr16(family, peer[0]) + _addr16(family, local[0])
                   + _TAIL.pack(0, _NOCOOKIE, _NOCOOKIE))
            nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + req)
            while True:  # the answer is queued before send() returns; skip any stale one
                data = nl.recv(1024, socket.MSG_DONTWAIT)
                _, typ, _, got_seq, _ = _NLMSG_HDR.unpack_from(data)
                if got_seq == seq:
                    break
        except BlockingIOError:
            return LookupFailed("no answer from the kernel")
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # the peer is gone already
                return NoSocket()
            return LookupFailed(exc.strerror or str(exc))
        if typ == NLMSG_ERROR:
            code = -int(struct.unpack_from("=i", data, 16)[0])
            if code == errno.ENOENT:
                return NoSocket()
            return LookupFailed(os.strerror(code))
        if len(data) < _UID_OFFSET + 4:
            return LookupFailed("short answer from the kernel")
        return int(struct.unpack_from("=I", data, _UID_OFFSET)[0])

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None


def socket_of(stream: Any) -> socket.socket | None:
    """The kernel socket under an accepted stream (None for in-memory test streams)."""
    sock = getattr(stream, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


def check_off_reason() -> str | None:
    """None when the outbound listeners' user check can run on this host, else why
    not (for `meshctl status`, which asks on the sidecars' host)."""
    p = PeerUids(quiet=True)
    p.close()
    return p.off_reason


def user_uid(name: str) -> int | None:
    """The uid of a user name on this host (the passwd database), None when unknown."""
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def allowed_uids(entries: tuple[Any, ...]) -> tuple[frozenset[int], list[str]]:
    """settings.outboundUsers resolved on this host, with the proxy's own uid; problems by field."""
    allowed, problems = resolve_users(entries, os.geteuid(), user_uid)
    return allowed, [f"outboundUsers[{i}]: {why}" for i, why in problems]


def _forbidden(reason: str) -> Refusal:
    return Refusal(403, "Forbidden", "local user not allowed", f"forbidden: {reason}\n")


async def admit_peer(rt: Any, al: Any, stream: Any, client_ip: str) -> bool:
    """Once per accepted connection on an outbound or binding listener: may its local
    user use this sidecar's identity? A refused connection is logged (uid, listener),
    counted (meshctl_downstream_cx_peer_refused), answered 403 on HTTP, and closed."""
    uids: PeerUids | None = rt.peer_uids
    sock = socket_of(stream)
    if uids is None or uids.off_reason is not None or sock is None:
        return True
    decision = decide(rt.peer_allowed, uids.lookup(sock))
    if isinstance(decision, Admit):
        return True
    spec = al.spec
    who = f"uid {decision.uid}" if decision.uid is not None else "an unknown user"
    held = rt.refusal_log.admit(("peer", spec.name, decision.uid), aio.current_time())
    if held is not None:
        log.warning("listener %s: refused a connection from %s (%s): %s%s", spec.name, who, client_ip,
                    decision.reason, held_back(held))
    rt.stats.listener(spec.name).cx_peer_refused += 1
    await refuse(stream, spec.protocol == "http", _forbidden(decision.reason))
    return False
