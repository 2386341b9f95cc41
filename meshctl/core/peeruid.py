"""Who may use a sidecar's outbound listeners: the local user behind a connection. Pure.

A sidecar's outbound listener (HTTP_PROXY) and its upstream bindings send what
arrives on with the workload's mTLS identity, so whoever can connect to them
speaks as that workload. They listen on loopback, where every local user can
connect; the proxy therefore asks the kernel which user owns the other end of
each accepted connection (proxy/peercheck.py: one NETLINK_SOCK_DIAG lookup of
the exact 4-tuple) and this module decides.

Rules:

1. Checked listeners: direction ``outbound`` and ``binding`` (HTTP and TCP).
   Inbound listeners are guarded by mTLS and authorization; gateways take
   traffic from anyone by design.
2. Allowed: the proxy's own effective uid, and every user of mesh.yaml
   ``settings.outboundUsers`` (names resolved to uids on this host, or uids).
3. The peer's uid is known: allowed or refused by rule 2.
4. No local socket has that 4-tuple (the peer is not on this host, or has
   already closed): refused. An outbound listener serves local apps only.
5. The lookup failed (an error from the kernel): refused. A check that cannot
   run for one connection fails closed.
6. Where the lookup cannot run at all (not Linux, netlink unavailable, the
   start-up probe did not find its own socket), the check is off: every
   connection is admitted, the proxy logs that once and `meshctl status` says so.
   That is decided at the edge; no ``decide`` call happens then.

A decision is taken once per accepted connection, never per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..model.proxyconfig import outbound_user_problem as entry_problem

__all__ = ["CHECKED_DIRECTIONS", "Admit", "LookupFailed", "NoSocket", "PeerLookup", "Refuse", "checks", "decide",
           "entry_problem", "resolve_users"]

CHECKED_DIRECTIONS = ("outbound", "binding")


@dataclass(frozen=True, slots=True)
class NoSocket:
    """The kernel has no socket with the connection's 4-tuple."""


@dataclass(frozen=True, slots=True)
class LookupFailed:
    reason: str


PeerLookup = int | NoSocket | LookupFailed


@dataclass(frozen=True, slots=True)
class Admit:
    uid: int


@dataclass(frozen=True, slots=True)
class Refuse:
    uid: int | None  # None: unknown
    reason: str  # for the log line and the 403 body


def checks(direction: str) -> bool:
    """Does a listener of this direction check its peers' users (rule 1)?"""
    return direction in CHECKED_DIRECTIONS


def resolve_users(entries: tuple[Any, ...], own_uid: int,
                  lookup_name: Callable[[str], int | None]) -> tuple[frozenset[int], list[tuple[int, str]]]:
    """The allowed uids (rule 2) and the problems as (index, message).

    ``lookup_name`` maps a user name to its uid on this host (pwd), None when
    there is no such user: an unknown name is refused, never skipped."""
    uids = {own_uid}
    problems: list[tuple[int, str]] = []
    for i, entry in enumerate(entries):
        why = entry_problem(entry)
        if why is not None:
            problems.append((i, why))
        elif isinstance(entry, int) or entry.isdigit():
            uids.add(int(entry))
        else:
            uid = lookup_name(entry)
            if uid is None:
                problems.append((i, f"unknown user {entry!r}: no such user on this host"))
            else:
                uids.add(uid)
    return frozenset(uids), problems


def decide(allowed: frozenset[int], peer: PeerLookup) -> Admit | Refuse:
    """Rules 3-5 for one accepted connection."""
    if isinstance(peer, int):
        if peer in allowed:
            return Admit(peer)
        shown = ", ".join(str(u) for u in sorted(allowed))
        return Refuse(peer, f"uid {peer} may not use this sidecar's outbound listeners "
                            f"(allowed uids: {shown}; mesh.yaml settings.outboundUsers adds users)")
    if isinstance(peer, NoSocket):
        return Refuse(None, "no local socket has this connection's address (the peer is not on this host "
                            "or has gone): outbound listeners serve local apps only")
    return Refuse(None, f"the peer's uid could not be looked up ({peer.reason}): refused, the check fails closed")
