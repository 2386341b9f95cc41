"""Pure header helpers the proxy pipeline applies to every request/response.

Header lists are ``[(name, value), ...]`` with lower-case names (see events.py).
Every helper returns a new list and leaves its argument untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Final

from .events import HeaderList

__all__ = ["HOP_BY_HOP", "strip_hop_by_hop", "append_forwarded_for", "ensure_request_id", "prepare_request_headers"]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",  # only meaningful with Upgrade: h2c, which is never relayed
    }
)

# cheap pre-check: most header lists carry none of these
_LOOK: Final = HOP_BY_HOP


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def strip_hop_by_hop(headers: HeaderList, *, keep_upgrade: bool = False) -> HeaderList:
    """Remove hop-by-hop headers and every header named by a Connection token.

    ``te`` survives as ``te: trailers`` when it asks for trailers (gRPC needs it).
    With ``keep_upgrade`` (forwarding an Upgrade the proxy relays), ``upgrade``
    and ``connection: upgrade`` are kept.
    """
    for k, v in headers:  # (a loop, not any() over a generator: this runs for every message)
        if k in _LOOK and (k != "te" or v != "trailers"):  # (te: trailers alone stays as it is)
            break
    else:
        return list(headers)
    nominated: set[str] = set()
    for k, v in headers:
        if k == "connection":
            if v == "keep-alive" or v == "close":  # (the usual value, one token: no split, no list)
                nominated.add(v)
            else:
                nominated.update(_tokens(v))
    upgrade_kept = keep_upgrade and "upgrade" in nominated
    out: HeaderList = []
    # (the fields kept are appended as the objects they are, through Any views of the lists:
    # mypyc keeps a tuple[str, str] variable unboxed, and appending it makes a new tuple)
    boxed: list[Any] = headers
    kept: list[Any] = out
    for i in range(len(headers)):
        k = headers[i][0]
        if k == "te":
            if "trailers" in _tokens(headers[i][1]):
                out.append(("te", "trailers"))
            continue
        if upgrade_kept and k == "upgrade":
            kept.append(boxed[i])
            continue
        if k in HOP_BY_HOP or k in nominated:
            continue
        kept.append(boxed[i])
    if upgrade_kept:
        out.append(("connection", "upgrade"))
    return out


def append_forwarded_for(headers: HeaderList, client_ip: str) -> HeaderList:
    """Append ``client_ip`` to x-forwarded-for (several such headers are folded into one)."""
    out: HeaderList = []
    at = -1
    for k, v in headers:
        if k == "x-forwarded-for":
            if at < 0:
                at = len(out)
                out.append((k, v))
            else:
                out[at] = (k, f"{out[at][1]}, {v}")
        else:
            out.append((k, v))
    if at < 0:
        out.append(("x-forwarded-for", client_ip))
    else:
        prior = out[at][1].strip()
        out[at] = ("x-forwarded-for", f"{prior}, {client_ip}" if prior else client_ip)
    return out


def trusted_client_address(headers: HeaderList, peer: str, trusted_hops: int) -> str:
    """The client address behind ``trusted_hops`` trusted proxies (Envoy's
    xff_num_trusted_hops, Istio's numTrustedProxies): the ``trusted_hops``-th
    address from the right of the x-forwarded-for the request arrived with;
    the peer when there are none to trust or too few addresses."""
    if trusted_hops <= 0:
        return peer
    addrs = [a.strip() for k, v in headers if k == "x-forwarded-for" for a in v.split(",") if a.strip()]
    return addrs[-trusted_hops] if len(addrs) >= trusted_hops else peer


def ensure_request_id(headers: HeaderList, new_id: Callable[[], str]) -> tuple[HeaderList, str]:
    """Keep a non-empty x-request-id; otherwise add one made by ``new_id()``."""
    for k, v in headers:
        if k == "x-request-id" and v.strip():
            return list(headers), v
    rid = new_id()
    out = [(k, v) for k, v in headers if k != "x-request-id"]
    out.append(("x-request-id", rid))
    return out, rid


def prepare_request_headers(headers: HeaderList, client_ip: str, new_id: Callable[[], str], *,
                            keep_upgrade: bool = False) -> tuple[HeaderList, str]:
    """``strip_hop_by_hop``, then ``append_forwarded_for``, then ``ensure_request_id``,
    with the same result, in one pass over the list in the common case (the
    proxy's request preparation, once per request)."""
    for k, v in headers:
        if k in _LOOK and (k != "te" or v != "trailers"):  # (gRPC's te: trailers alone stays as it is)
            headers = strip_hop_by_hop(headers, keep_upgrade=keep_upgrade)
            break
    # the common case, at most one x-forwarded-for and no empty x-request-id before the
    # first one: a copy of the list (its fields as they are, not unpacked and made anew),
    # one field replaced and one or two added
    xff = -1
    rid = ""
    i = 0
    for k, v in headers:
        if k == "x-forwarded-for":
            if xff >= 0:
                break
            xff = i
        elif k == "x-request-id" and not rid:
            if not v.strip():
                break
            rid = v
        i += 1
    else:
        copy = list(headers)
        if xff < 0:
            copy.append(("x-forwarded-for", client_ip))
        else:
            prior = copy[xff][1].strip()
            copy[xff] = ("x-forwarded-for", f"{prior}, {client_ip}" if prior else client_ip)
        if not rid:
            rid = new_id()
            copy.append(("x-request-id", rid))
        return copy, rid
    out: HeaderList = []
    xff = -1
    rid = ""
    empty_ids = False
    for h in headers:
        k = h[0]
        if k == "x-forwarded-for":
            if xff < 0:
                xff = len(out)
                out.append(h)
            else:
                out[xff] = (k, f"{out[xff][1]}, {h[1]}")
            continue
        if k == "x-request-id":
            if not rid:
                if h[1].strip():
                    rid = h[1]
                else:
                    empty_ids = True
        out.append(h)
    if xff < 0:
        out.append(("x-forwarded-for", client_ip))
    else:
        prior = out[xff][1].strip()
        out[xff] = ("x-forwarded-for", f"{prior}, {client_ip}" if prior else client_ip)
    if rid:
        return out, rid
    if empty_ids:
        out = [h for h in out if h[0] != "x-request-id"]
    rid = new_id()
    out.append(("x-request-id", rid))
    return out, rid
