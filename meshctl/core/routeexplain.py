"""``meshctl route explain``: a human-readable trace of ``Router.decide``.

``explain(router, request)`` walks the same compiled table ``decide`` uses
(core/route.py): which virtual host the authority selected and by which rule
(exact domain, address range, wildcard, default), each route in order with the
first condition that failed it (its value and what was wanted), and for the
route that matched, what it does: the redirect's Location, the direct
response, or the destinations with their share of requests, the rewrites, the
timeout and the retry policy.

Only the CLI imports this module; a sidecar never loads it (setup.py compiles
core/route.py, not this).
"""

from __future__ import annotations

from .route import RequestView, Router, _Cond, _Match, _Req, _Route

__all__ = ["explain"]


def explain(router: Router, req: RequestView) -> list[str]:
    """The trace of ``router.decide(req)``, one line per step."""
    lines = [
        f"request: {req.method} {req.scheme}://{req.authority}{req.path}"
        + (f" port {req.port}" if req.port is not None else "")
        + f" via {req.gateway or 'mesh'}"
    ]
    cv, how = router._lookup(req.authority)
    if cv is None:
        lines.append(f"no virtual host for {req.authority!r} in route table {router.table.name!r} → 404"
                     f"{router._no_vhost_hint(req.authority)}")
        return lines
    lines.append(f"virtual host {cv.vh.name!r}, selected by {how}")
    r = _Req(req)
    for route in cv.routes:
        m = route.first_match(r)
        if m is None:
            lines.append(f"  {route.label}: no match")
            for i, cm in enumerate(route.matches):
                failing = next(c for c in cm.conds if not c.ok(r))
                name: str | None = f" {route.route.match[i].name!r}" if route.route.match[i].name else ""
                lines.append(f"    match {i}{name}: {_why_not(failing, r)}")
            continue
        if m.index < 0:
            lines.append(f"  {route.label}: matches (no match conditions)")
        else:
            name = route.route.match[m.index].name
            shown = "; ".join(f"{c.label} {c.expect}" for c in m.conds) or "no conditions"
            lines.append(f"  {route.label}: matches by match {m.index}" + (f" {name!r}" if name else "") + f" ({shown})")
        lines.extend(_explain_action(route, r, m))
        return lines
    lines.append(f"no route matched in virtual host {cv.vh.name!r} → 404")
    return lines


def _why_not(c: _Cond, r: _Req) -> str:
    v = c.get(r)
    if c.negate:
        return f"{c.label} is {v!r} and must not {c.expect} (withoutHeaders)"
    if v is None:
        return f"{c.label} is absent (wanted: {c.expect})"
    return f"{c.label} is {v!r}, which does not {c.expect}"


def _explain_action(route: _Route, r: _Req, m: _Match) -> list[str]:
    if route.kind == "redirect":
        return [f"→ redirect {route.redirect_status} to {route.location(r)}"]
    if route.kind == "direct":
        dr = route.direct
        assert dr is not None
        return [f"→ direct response {dr.status} with a {len(dr.body)}-byte body"]
    out = []
    for d in route.dests:
        share = 100.0 * d.weight / route.total
        out.append(f"→ forward to {d.cluster} ({share:g}% of requests)")
    path = route.rewrite_path(r, m) if (route.rewrite_uri is not None or route.regex_rewrite) else r.view.path
    if path != r.view.path:
        out.append(f"  path rewritten to {path}")
    if route.rewrite_authority:
        out.append(f"  authority rewritten to {route.rewrite_authority}")
    out.append(f"  timeout {f'{route.timeout:g}s' if route.timeout else 'none'}")
    rp = route.retry
    if rp.attempts:
        codes = f" (status codes {','.join(map(str, sorted(rp.retriable_status_codes)))})" if rp.retriable_status_codes else ""
        per_try = f", {rp.per_try_timeout:g}s per try" if rp.per_try_timeout else ""
        out.append(f"  retries: up to {rp.attempts} on {','.join(sorted(rp.retry_on))}{codes}{per_try}")
    else:
        out.append("  retries: none")
    if route.route.fault is not None:
        out.append("  fault injection configured")
    return out
