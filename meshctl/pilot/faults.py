"""Injected faults: `meshctl inject-fault`, layered over the user's routes by Pilot.

An injected fault is a delay and/or abort for one service, optionally only for
requests matching a few conditions (``header:end-user=jason``) and only for
routes that send traffic to one subset, with an optional expiry. The user's
rules in the store are never edited: Pilot adds the fault at compile time, so
`route get` keeps showing what the user applied and clearing a fault (or its
TTL running out) gives back exactly the routing the user had.

The pure part (no clock, no files: ``now`` is passed in):

- ``active_faults(faults, now)``: the faults in force at ``now``;
- ``layer_faults(routes, faults)``: the routes of a virtual host with the
  faults layered in. Rules, in order:

  1. A fault is layered over every route it applies to: every route of the
     service's own virtual host, or, with a subset, only routes with a
     destination of that subset. (A route that splits traffic between subsets
     is faulted as a whole: a fault is decided before the subset is drawn.)
  2. For a route R and a fault F, a copy R' of R is placed right before R,
     with F's fault and a match that is R's match AND F's match: each of R's
     match blocks (ORed) gets F's conditions added. Where a condition cannot
     hold together with R's (``exact: jason`` and ``exact: bob`` on the same
     header) that block is dropped; when none is left, R gets no copy.
  3. R' keeps everything else of R (destinations, timeout, retries, headers,
     rewrite), so faulted requests are routed exactly as before.
  4. Several faults on one route: newest first, one copy each; a request gets
     the fault of the first copy it matches.
  5. Redirect and direct-response routes are not faulted (nothing is forwarded).

- ``parse_match`` / ``parse_ttl`` / ``new_fault``: turn CLI text into a
  fault, with messages naming what is wrong.

The I/O part is ``FaultStore``: ``state_dir/faults.json``, written to a temp
file and renamed under an flock, like the rule store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Protocol, Sequence

import trio

from ..core.regex import RegexError, compile_regex
from ..loader.codec import LoadError, from_data, parse_duration, to_data
from ..model.base import FrozenDict, format_duration
from ..model.istio import (
    FaultAbort,
    FaultDelay,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRoute,
    Percent,
    StringMatch,
)

__all__ = [
    "FaultError",
    "InjectedFault",
    "FaultStore",
    "FaultStoreLike",
    "active_faults",
    "layer_faults",
    "faults_for_host",
    "parse_match",
    "parse_ttl",
    "new_fault",
    "describe",
]

ROUTE_PREFIX = "inject-fault"

log = logging.getLogger("meshctl.pilot.faults")


class FaultError(ValueError):
    """A bad inject-fault request or a damaged faults file; the message says which."""


@dataclass(frozen=True, slots=True)
class InjectedFault:
    id: str
    service: str  # the service's FQDN, as virtual hosts name it
    fault: HTTPFaultInjection
    match: HTTPMatchRequest | None = None  # None: every request
    subset: str | None = None
    created: float = 0.0  # wall clock, seconds
    expires: float | None = None  # wall clock; None: until cleared

    def active(self, now: float) -> bool:
        return self.expires is None or now < self.expires


# ------------------------------------------------------------------ pure: selection


def active_faults(faults: Iterable[InjectedFault], now: float) -> tuple[InjectedFault, ...]:
    """The faults in force at ``now`` (expiry is exclusive), newest first."""
    live = [f for f in faults if f.active(now)]
    return tuple(sorted(live, key=lambda f: (-f.created, f.id)))


def faults_for_host(faults: Iterable[InjectedFault], host: str) -> tuple[InjectedFault, ...]:
    return tuple(f for f in faults if f.service == host)


def next_expiry(faults: Iterable[InjectedFault], now: float) -> float | None:
    """When the next active fault ends (for Pilot's timer), or None."""
    ends = [f.expires for f in faults if f.expires is not None and f.expires > now]
    return min(ends) if ends else None


# ------------------------------------------------------------------ pure: layering

_UNSAT = object()


def _string_ok(m: StringMatch, value: str) -> bool:
    if m.exact is not None:
        return value == m.exact
    if m.prefix is not None:
        return value.startswith(m.prefix)
    if m.regex is not None:
        try:
            return compile_regex(m.regex).fullmatch(value) is not None
        except RegexError:
            return False
    return True


def _and_string(a: StringMatch | None, b: StringMatch | None) -> Any:
    """One StringMatch meaning ``a AND b``, or _UNSAT when that can't be written
    as one (or can never hold)."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if a.exact is not None:
        return a if _string_ok(b, a.exact) else _UNSAT
    if b.exact is not None:
        return b if _string_ok(a, b.exact) else _UNSAT
    if a.prefix is not None and b.prefix is not None:
        longer, shorter = (a, b) if len(a.prefix) >= len(b.prefix) else (b, a)
        return longer if longer.prefix is not None and shorter.prefix is not None and longer.prefix.startswith(shorter.prefix) else _UNSAT
    # Two regexes, or a regex and a prefix: not expressible as one condition.
    return _UNSAT


def _and_map(a: FrozenDict, b: FrozenDict) -> Any:
    out = dict(a)
    for k, v in b.items():
        both = _and_string(out.get(k), v)
        if both is _UNSAT:
            return _UNSAT
        out[k] = both
    return FrozenDict(out)


def and_match(user: HTTPMatchRequest, extra: HTTPMatchRequest) -> HTTPMatchRequest | None:
    """``user AND extra`` as one match block, or None when it can never hold or
    can't be expressed (rule 2). ``extra`` carries only uri/method/headers."""
    headers = _and_map(user.headers, extra.headers)
    if headers is _UNSAT:
        return None
    uri, method = _and_string(user.uri, extra.uri), _and_string(user.method, extra.method)
    if uri is _UNSAT or method is _UNSAT:
        return None
    if user.ignore_uri_case and extra.uri is not None and uri is extra.uri:
        return None  # the user's case-insensitive uri and a case-sensitive one: not one condition
    # A header required by the fault and forbidden by the user's withoutHeaders still
    # works as written: both conditions are kept, the proxy checks both.
    return replace(user, headers=headers, uri=uri, method=method)


def _goes_to_subset(route: HTTPRoute, subset: str) -> bool:
    return any(rd.destination.subset == subset for rd in route.route)


def _goes_to_host(route: HTTPRoute, host: str) -> bool:
    return any(rd.destination.host == host for rd in route.route)


def _faulted_copy(route: HTTPRoute, f: InjectedFault, index: int) -> HTTPRoute | None:
    if not route.route:  # redirect / direct response (rule 5)
        return None
    if f.subset is not None and not _goes_to_subset(route, f.subset):
        return None
    if f.match is None:
        matches = route.match
    elif not route.match:
        matches = (f.match,)
    else:
        matches = tuple(m for m in (and_match(um, f.match) for um in route.match) if m is not None)
        if not matches:
            return None
    base = route.name or f"route {index}"
    return replace(route, name=f"{ROUTE_PREFIX} {f.id} over {base}", match=matches, fault=f.fault)


def layer_faults(routes: Sequence[HTTPRoute], faults: Sequence[InjectedFault], *, host: str | None = None) -> tuple[HTTPRoute, ...]:
    """``routes`` with a faulted copy before each route a fault applies to.

    ``faults`` are those already chosen for this virtual host, in precedence
    order (``active_faults`` gives newest first). With ``host``, only routes
    with a destination of that host are faulted (a gateway's virtual host,
    whose routes may go to several services).
    """
    if not faults:
        return tuple(routes)
    out: list[HTTPRoute] = []
    for i, r in enumerate(routes):
        already = (r.name or "").startswith(ROUTE_PREFIX + " ")  # a copy made for another host's fault
        if not already and (host is None or _goes_to_host(r, host)):
            for f in faults:
                copy = _faulted_copy(r, f, i)
                if copy is not None:
                    out.append(copy)
        out.append(r)
    return tuple(out)


def subsets_routed(routes: Sequence[HTTPRoute]) -> set[str]:
    """Which subsets any route sends traffic to (the CLI warns about a --subset none does)."""
    return {rd.destination.subset for r in routes for rd in r.route if rd.destination.subset}


# ------------------------------------------------------------------ pure: CLI text → fault

_MATCH = re.compile(r"^(?P<kind>header|uri|method):(?P<rest>.+)$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _string_match(op: str, value: str, what: str) -> StringMatch:
    if op == "=":
        return StringMatch(exact=value)
    if op == "^=":
        return StringMatch(prefix=value)
    try:
        compile_regex(value)  # RE2, as the proxy matches it
    except RegexError as e:
        raise FaultError(f"{what}: bad regex: {e}") from None
    return StringMatch(regex=value)


def parse_match(specs: Sequence[str]) -> HTTPMatchRequest | None:
    """``header:NAME=VALUE`` (exact), ``header:NAME^=PREFIX``, ``header:NAME~=REGEX``,
    ``uri:/PREFIX`` (or ``uri:=/exact``, ``uri:~=REGEX``), ``method:GET``; all ANDed."""
    if not specs:
        return None
    headers: dict[str, StringMatch] = {}
    uri: StringMatch | None = None
    method: StringMatch | None = None
    for spec in specs:
        m = _MATCH.match(spec.strip())
        if not m:
            raise FaultError(f"bad --match {spec!r}: use header:NAME=VALUE, uri:/PREFIX or method:GET")
        kind, rest = m["kind"], m["rest"]
        if kind == "header":
            hm = re.match(r"^(?P<name>[^=^~]+)(?P<op>\^=|~=|=)(?P<value>.*)$", rest)
            if not hm or not _HEADER_NAME.match(hm["name"]):
                raise FaultError(f"bad --match {spec!r}: use header:NAME=VALUE (exact), header:NAME^=PREFIX or header:NAME~=REGEX")
            name = hm["name"].lower()
            if name in headers:
                raise FaultError(f"--match names header {name!r} twice")
            headers[name] = _string_match(hm["op"], hm["value"], f"--match {spec!r}")
        elif kind == "uri":
            if uri is not None:
                raise FaultError("--match names uri twice")
            if rest.startswith("^="):
                uri = StringMatch(prefix=rest[2:])
            elif rest.startswith("~="):
                uri = _string_match("~=", rest[2:], f"--match {spec!r}")
            elif rest.startswith("="):
                uri = StringMatch(exact=rest[1:])
            else:
                uri = StringMatch(prefix=rest)
            if not (uri.exact or uri.prefix or uri.regex or "").strip():
                raise FaultError(f"bad --match {spec!r}: empty uri")
        else:
            if method is not None:
                raise FaultError("--match names method twice")
            if not re.fullmatch(r"[A-Za-z]+", rest):
                raise FaultError(f"bad --match {spec!r}: method:GET, method:POST, ...")
            method = StringMatch(exact=rest.upper())
    return HTTPMatchRequest(headers=FrozenDict(headers), uri=uri, method=method)


def parse_ttl(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        d = float(parse_duration(text))
    except ValueError as e:
        raise FaultError(f"bad --ttl: {e}") from None
    if d <= 0:
        raise FaultError(f"bad --ttl {text!r}: must be more than 0s")
    return d


def new_fault(
    *,
    id: str,
    service: str,
    now: float,
    delay: str | None = None,
    abort: int | None = None,
    percent: float = 100.0,
    match: Sequence[str] = (),
    subset: str | None = None,
    ttl: str | None = None,
) -> InjectedFault:
    """Build a fault from CLI values; raises FaultError naming the bad one."""
    if delay is None and abort is None:
        raise FaultError("give --delay DURATION and/or --abort STATUS")
    if not 0.0 <= percent <= 100.0 or percent != percent:
        raise FaultError(f"--percent {percent:g} is out of range: it must be between 0 and 100")
    pct = Percent(value=float(percent))
    d = a = None
    if delay is not None:
        try:
            fixed = parse_duration(delay)
        except ValueError as e:
            raise FaultError(f"bad --delay: {e}") from None
        if fixed < 0.001:
            raise FaultError(f"bad --delay {delay!r}: must be at least 1ms")
        d = FaultDelay(fixed_delay=fixed, percentage=pct)
    if abort is not None:
        if not 200 <= abort <= 599:
            raise FaultError(f"--abort {abort} is not an HTTP status to answer with: use 200-599 (e.g. 503)")
        a = FaultAbort(http_status=abort, percentage=pct)
    seconds = parse_ttl(ttl)
    return InjectedFault(
        id=id,
        service=service,
        fault=HTTPFaultInjection(delay=d, abort=a),
        match=parse_match(match),
        subset=subset or None,
        created=now,
        expires=None if seconds is None else now + seconds,
    )


def _show_string(m: StringMatch) -> str:
    if m.exact is not None:
        return f"={m.exact}"
    if m.prefix is not None:
        return f"^={m.prefix}"
    return f"~={m.regex}"


def describe_match(m: HTTPMatchRequest | None) -> str:
    if m is None:
        return "all requests"
    parts = [f"header:{k}{_show_string(v)}" for k, v in sorted(m.headers.items())]
    if m.uri is not None:
        parts.append(f"uri:{_show_string(m.uri)}")
    if m.method is not None:
        parts.append(f"method:{m.method.exact}")
    return " and ".join(parts) or "all requests"


def describe(f: InjectedFault) -> str:
    """``delay 2s, 100% of requests`` / ``abort 503, 50% of requests``."""
    out = []
    if f.fault.delay is not None and f.fault.delay.fixed_delay is not None:
        pct = f.fault.delay.percentage.value if f.fault.delay.percentage else 100.0
        out.append(f"delay {format_duration(f.fault.delay.fixed_delay)} for {pct:g}%")
    if f.fault.abort is not None:
        pct = f.fault.abort.percentage.value if f.fault.abort.percentage else 100.0
        out.append(f"abort {f.fault.abort.http_status} for {pct:g}%")
    return ", ".join(out)


# ------------------------------------------------------------------ JSON form


def fault_to_dict(f: InjectedFault) -> dict[str, Any]:
    return {
        "id": f.id,
        "service": f.service,
        "fault": to_data(f.fault),
        "match": to_data(f.match) if f.match is not None else None,
        "subset": f.subset,
        "created": f.created,
        "expires": f.expires,
    }


def fault_from_dict(d: Any) -> InjectedFault:
    try:
        return InjectedFault(
            id=str(d["id"]),
            service=str(d["service"]),
            fault=from_data(HTTPFaultInjection, d["fault"] or {}),
            match=from_data(HTTPMatchRequest, d["match"]) if d.get("match") is not None else None,
            subset=d.get("subset"),
            created=float(d.get("created", 0.0)),
            expires=None if d.get("expires") is None else float(d["expires"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, LoadError) as e:
        raise FaultError(f"bad injected fault {d!r}: {e}") from None


# ------------------------------------------------------------------ I/O: the file


class FaultStore:
    """``state_dir/faults.json``: ``{"faults": [...]}``, replaced atomically under a lock."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "faults.json"
        self._lock = Path(state_dir) / ".faults.lock"

    def stamp(self) -> tuple[float, int]:
        try:
            st = self.path.stat()
            return (st.st_mtime, st.st_size)
        except FileNotFoundError:
            return (0.0, 0)

    def load(self) -> list[InjectedFault]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(text)
            items = data["faults"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FaultError(f"{self.path}: corrupt ({e}); remove it to clear every injected fault") from None
        return [fault_from_dict(d) for d in items]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _save(self, faults: Sequence[InjectedFault]) -> None:
        body = json.dumps({"faults": [fault_to_dict(f) for f in faults]}, indent=1)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def add(self, fault: InjectedFault, now: float) -> None:
        """Store ``fault``, dropping faults expired at ``now`` on the way."""
        with self._locked():
            kept = [f for f in self.load() if f.active(now)]
            if any(f.id == fault.id for f in kept):
                raise FaultError(f"an injected fault with id {fault.id} already exists")
            self._save(kept + [fault])

    def remove(self, pred, now: float) -> list[InjectedFault]:
        """Remove active faults for which ``pred(fault)`` is true (and every expired
        one); return the active ones removed."""
        with self._locked():
            removed: list[InjectedFault] = []
            kept: list[InjectedFault] = []
            for f in self.load():
                if not f.active(now):
                    continue
                (removed if pred(f) else kept).append(f)
            self._save(kept)
            return removed

    def prune(self, now: float) -> bool:
        """Drop expired faults from the file; True if any was dropped."""
        with self._locked():
            faults = self.load()
            kept = [f for f in faults if f.active(now)]
            if len(kept) == len(faults):
                return False
            self._save(kept)
            return True

    # Pilot's side (FaultStoreLike)

    @property
    def location(self) -> str:
        return str(self.path)

    def last_known(self) -> list[InjectedFault]:
        return self.load()

    async def watch(self, poll: float = 0.5) -> AsyncIterator[list[InjectedFault]]:
        """The stored faults, then again each time the file changes."""
        last: tuple[float, int] | None = None
        while True:
            stamp = self.stamp()
            if stamp != last:
                last = stamp
                try:
                    yield self.load()
                except FaultError as e:  # keep the faults we had; the CLI reports the same error
                    log.warning("injected faults not reloaded: %s", e)
            await trio.sleep(poll)


class FaultStoreLike(Protocol):
    """:class:`FaultStore` (state_dir/faults.json) or
    :class:`~meshctl.pilot.kvstore.ConsulFaultStore` (one key in Consul KV, shared by every host).
    Expiry is a wall-clock time stored with the fault, so every host's Pilot ends it at the same moment
    whichever host injected it."""

    @property
    def location(self) -> str: ...
    def load(self) -> list[InjectedFault]: ...
    def add(self, fault: InjectedFault, now: float) -> None: ...
    def remove(self, pred: Callable[[InjectedFault], bool], now: float) -> list[InjectedFault]: ...
    def prune(self, now: float) -> bool: ...
    def last_known(self) -> list[InjectedFault]: ...
    def watch(self) -> AsyncIterator[list[InjectedFault]]: ...
