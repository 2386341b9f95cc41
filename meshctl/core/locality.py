"""Locality load balancing: which endpoints a request may go to, by where its caller runs.

Istio's DestinationRule ``trafficPolicy.loadBalancer.localityLbSetting``,
carried out as Istio configures Envoy for it (priority levels, locality
weights). Pure: ``plan_locality`` is computed once per cluster and config;
``choose`` runs per request over the eligible endpoints (registry-healthy,
not ejected by outlier detection) with an injected random source.

A locality is ``region/zone/subzone`` (trailing parts may be left out). A
caller's comes from mesh.yaml (``settings.locality``, `up --locality`,
``versions[].locality``); an endpoint's from its registry instance's
metadata (``meshctl.io/locality``), or a WorkloadEntry's / ServiceEntry
endpoint's ``locality``.

Rules:

1. Off (every endpoint in one pool, as without localities): ``enabled:
   false``; no localityLbSetting and no outlierDetection; failover settings
   without outlierDetection (Istio: the proxy would never see a level fail,
   so it never moves on; ``route validate`` warns); a ``distribute`` list
   none of whose ``from`` matches the caller.
2. Failover, the default once outlierDetection is set (Istio's mesh-wide
   localityLbSetting is enabled by default). Each endpoint gets a priority
   level by what it shares with the caller's locality:
       0 region, zone and subzone · 1 region and zone · 2 region · 3 nothing;
   with ``failover: [{from: A, to: B}]`` where A is the caller's region,
   endpoints in regions other than B are at 4 instead of 3.
   With ``failoverPriority`` (labels, in order), an endpoint matching the
   caller on all N labels is at 0, one whose first mismatch is the j-th
   label (from 0) at N - j; ``label=value`` compares with that value instead
   of the caller's; the labels topology.kubernetes.io/region,
   topology.kubernetes.io/zone and topology.istio.io/subzone are read from
   localities. With failoverPriority and failover both, the level is
   5 × the label level + the locality level. Empty levels are dropped and
   the rest renumbered 0, 1, 2 ...
3. Which level takes a request: Envoy's priority load. Health of level P:
   h(P) = min(100, 140 × eligible / endpoints) percent (overprovisioning
   factor 1.4); with T = min(100, Σ h), level 0 takes min(100, h(0)·100/T)
   percent of requests and each next level what is left, up to h(P)·100/T.
   So a level keeps all its traffic while at least 72 % of its endpoints
   are eligible and none once it has no eligible endpoint. No eligible
   endpoint at any level: no endpoint (503 no healthy upstream).
4. Distribute: the first ``distribute[]`` whose ``from`` matches the caller
   applies (with or without outlierDetection, as in Istio). Each ``to``
   pattern's share goes to the localities it matches (in YAML order, a
   locality taken by an earlier pattern is not matched again), split among
   them in proportion to their endpoint weights and rounded up, as Istio
   does. Endpoints of localities no pattern matches get no traffic. Per
   request a locality is drawn by share × availability, where availability
   is min(1, 1.4 × eligible / endpoints) (Envoy's locality weighted load
   balancing), then the cluster's balancer picks within it.
5. Matching a pattern (``from``, ``to``) against a locality: region, zone,
   subzone in turn; ``*`` matches anything, a missing zone or subzone
   matches any (Istio's LocalityMatch).
6. Retries (VirtualService ``retries.retryRemoteLocalities: true``; Envoy's
   previous_priorities with Istio's update frequency 2): before every second
   try the levels tried so far are left out of the priority load (rule 3 over
   the others), and that holds until the next update; when no other level has
   an eligible endpoint, the plain loads apply. Without it a retry draws a
   level as any request does.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..model.istio import LocalityFailover, LocalityLoadBalancerSetting
from ..model.proxyconfig import Endpoint

__all__ = [
    "Locality",
    "Group",
    "LocalityPlan",
    "OFF",
    "parse_locality",
    "locality_problem",
    "pattern_matches",
    "lb_priority",
    "plan_locality",
    "priority_loads",
    "choose",
    "explain",
    "RetryPriorities",
    "setting_problems",
    "REGION_LABEL",
    "ZONE_LABEL",
    "SUBZONE_LABEL",
]

OVERPROVISIONING = 1.4  # Envoy's default overprovisioning factor (Istio leaves it)
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
_TOPOLOGY = (REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL)


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""

    def __str__(self) -> str:
        return "/".join((self.region, self.zone, self.subzone)).rstrip("/")

    def labels(self) -> dict[str, str]:
        """The topology labels Istio gives workloads of this locality."""
        return {k: v for k, v in zip(_TOPOLOGY, (self.region, self.zone, self.subzone)) if v}


def parse_locality(text: str) -> Locality:
    parts = (text.strip().split("/") + ["", "", ""])[:3]
    return Locality(parts[0], parts[1], parts[2])


def locality_problem(text: str) -> str | None:
    """Why ``text`` is not a locality (region/zone/subzone), None when it is."""
    parts = text.split("/")
    if len(parts) > 3:
        return f"{text!r} is not region/zone/subzone (at most three parts)"
    for p in parts:
        if "*" in p:
            return f"{text!r}: a workload's locality has no wildcards"
        if p != p.strip() or any(c.isspace() for c in p):
            return f"{text!r}: no spaces in a locality"
    if any(not p for p in parts) and text:
        return f"{text!r}: an empty part (give region, region/zone or region/zone/subzone)"
    return None


def pattern_matches(loc: Locality, pattern: str) -> bool:
    """Istio's LocalityMatch: ``*`` matches anything, a missing zone/subzone matches any."""
    p = parse_locality(pattern)
    return (
        (p.region == "*" or p.region == loc.region)
        and (p.zone in ("*", "") or p.zone == loc.zone)
        and (p.subzone in ("*", "") or p.subzone == loc.subzone)
    )


def lb_priority(caller: Locality, ep: Locality) -> int:
    """0 same region/zone/subzone, 1 same region/zone, 2 same region, 3 other region."""
    if caller.region != ep.region:
        return 3
    if caller.zone != ep.zone:
        return 2
    if caller.subzone != ep.subzone:
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class Group:
    locality: str  # of its endpoints
    endpoints: tuple[Endpoint, ...]
    share: float = 0.0  # distribute: its share of requests (percent); failover: unused


@dataclass(frozen=True, slots=True)
class LocalityPlan:
    mode: str  # off | failover | distribute
    caller: str = ""
    levels: tuple[tuple[Group, ...], ...] = ()  # failover: by priority; distribute: one level
    reason: str = ""  # why this mode, for `route explain`

    @property
    def active(self) -> bool:
        """Whether ``choose`` can narrow the endpoints at all."""
        return self.mode == "distribute" or (self.mode == "failover" and len(self.levels) > 1)

    def level_of(self, ep: Endpoint) -> int:
        """The priority level of one of its endpoints (-1: none)."""
        key = (ep.address, ep.port)
        for p, level in enumerate(self.levels):
            for g in level:
                for e in g.endpoints:
                    if (e.address, e.port) == key:
                        return p
        return -1


OFF = LocalityPlan("off", reason="no locality load balancing")


def _w(ep: Endpoint) -> int:
    return ep.weight if ep.weight > 1 else 1


def _groups(endpoints: Sequence[Endpoint]) -> dict[str, list[Endpoint]]:
    out: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        out.setdefault(str(parse_locality(ep.locality)), []).append(ep)
    return out


def plan_locality(
    lb: LocalityLoadBalancerSetting | None,
    outlier_detection: bool,
    caller_locality: str,
    caller_labels: Mapping[str, str],
    endpoints: Sequence[Endpoint],
) -> LocalityPlan:
    """How a cluster's endpoints are split for a caller (rules 1, 2 and 4)."""
    caller = parse_locality(caller_locality)
    shown = str(caller) or "(none)"
    if lb is not None and lb.enabled is False:
        return LocalityPlan("off", shown, reason="localityLbSetting.enabled is false")
    if lb is not None and lb.distribute:
        for i, d in enumerate(lb.distribute):
            if pattern_matches(caller, d.from_):
                return _distribute(lb, i, caller, endpoints)
        return LocalityPlan("off", shown, reason=f"no distribute[].from matches the caller's locality {shown}")
    if not outlier_detection:
        why = ("localityLbSetting without outlierDetection: failover needs it (as in Istio)" if lb is not None
               else "no outlierDetection (locality failover needs it)")
        return LocalityPlan("off", shown, reason=why)
    by_level: dict[int, list[Endpoint]] = {}
    caller_view = {**caller_labels, **caller.labels()}
    prio_labels = lb.failover_priority if lb is not None else ()
    failover = lb.failover if lb is not None else ()
    for ep in endpoints:
        loc = parse_locality(ep.locality)
        if prio_labels:
            level = _label_level(prio_labels, caller_view, {**ep.labels, **loc.labels()})
            if failover:
                level = 5 * level + _locality_level(caller, loc, failover)
        else:
            level = _locality_level(caller, loc, failover)
        by_level.setdefault(level, []).append(ep)
    levels = tuple(
        tuple(Group(loc, tuple(eps)) for loc, eps in sorted(_groups(by_level[p]).items())) for p in sorted(by_level)
    )
    how = "failoverPriority " + ", ".join(prio_labels) if prio_labels else "locality"
    if failover:
        how += "; failover " + ", ".join(f"{f.from_}→{f.to}" for f in failover)
    return LocalityPlan("failover", shown, levels, reason=f"failover by {how} (outlierDetection is set)")


def _locality_level(caller: Locality, loc: Locality, failover: Sequence[LocalityFailover]) -> int:
    p = lb_priority(caller, loc)
    if p == 3:
        for f in failover:
            if f.from_ == caller.region:
                if loc.region != f.to:
                    p = 4
                break
    return p


def _label_level(labels: Sequence[str], caller: Mapping[str, str], ep: Mapping[str, str]) -> int:
    n = len(labels)
    for j, item in enumerate(labels):
        name, eq, value = item.partition("=")
        want = value if eq else caller.get(name)
        if want is None or ep.get(name) != want:
            return n - j
    return 0


def _distribute(lb: LocalityLoadBalancerSetting, index: int, caller: Locality, endpoints: Sequence[Endpoint]) -> LocalityPlan:
    d = lb.distribute[index]
    groups = _groups(endpoints)
    left = set(groups)
    shares: dict[str, float] = {}
    for pattern, weight in d.to.items():
        matched = [loc for loc in sorted(left) if pattern_matches(parse_locality(loc), pattern)]
        total = sum(_w(ep) for loc in matched for ep in groups[loc])
        for loc in matched:
            left.discard(loc)
            share = math.ceil(sum(_w(ep) for ep in groups[loc]) * weight / total) if total else 0
            if share > 0:
                shares[loc] = float(share)
    level = tuple(Group(loc, tuple(groups[loc]), shares[loc]) for loc in sorted(shares))
    return LocalityPlan("distribute", str(caller) or "(none)", (level,) if level else (),
                        reason=f"distribute[{index}] (from {d.from_})")


# ---------------------------------------------------------------- per request


def priority_loads(health: Sequence[float]) -> list[float]:
    """Envoy's priority load (percent of requests per level) from each level's health (rule 3)."""
    total = min(100.0, sum(health))
    if total <= 0:
        return [0.0] * len(health)
    left = 100.0
    out = []
    for h in health:
        load = min(left, h * 100.0 / total)
        out.append(load)
        left -= load
    return out


def _health(eligible: int, total: int) -> float:
    return min(100.0, OVERPROVISIONING * 100.0 * eligible / total) if total else 0.0


def _split(plan: LocalityPlan, eligible: Sequence[Endpoint]) -> list[list[tuple[Group, list[Endpoint]]]]:
    ok = {(e.address, e.port) for e in eligible}
    return [[(g, [e for e in g.endpoints if (e.address, e.port) in ok]) for g in level] for level in plan.levels]


def _level_health(level: list[tuple[Group, list[Endpoint]]]) -> float:
    return _health(sum(len(x) for _, x in level), sum(len(g.endpoints) for g, _ in level))


def choose(plan: LocalityPlan, eligible: Sequence[Endpoint], rand: random.Random,
           excluded: frozenset[int] = frozenset()) -> list[Endpoint]:
    """The endpoints the balancer picks from for one request (rules 3, 4 and 6)."""
    split = _split(plan, eligible)
    health = [_level_health(level) for level in split]
    loads = priority_loads(health)
    if excluded:
        left = priority_loads([0.0 if p in excluded else h for p, h in enumerate(health)])
        if sum(left) > 0:  # every level with eligible endpoints excluded: the plain loads
            loads = left
    x = rand.random() * 100.0
    chosen: list[tuple[Group, list[Endpoint]]] | None = None
    acc = 0.0
    for level, load in zip(split, loads):
        if load <= 0:
            continue
        chosen = level
        acc += load
        if x < acc:
            break
    if chosen is None:
        return []
    if plan.mode != "distribute":
        return [e for _, eps in chosen for e in eps]
    weights = [g.share * min(1.0, _health(len(eps), len(g.endpoints)) / 100.0) for g, eps in chosen]
    total = sum(weights)
    if total <= 0:
        return []
    y = rand.random() * total
    for (g, eps), w in zip(chosen, weights):
        if y < w:
            return eps
        y -= w
    return next(eps for (g, eps), w in zip(reversed(chosen), reversed(weights)) if w > 0)


UPDATE_FREQUENCY = 2  # Istio's previous_priorities update_frequency for retryRemoteLocalities


class RetryPriorities:
    """Rule 6, for one request: the levels its retries leave out (Envoy's previous_priorities)."""

    __slots__ = ("attempted", "excluded")

    def __init__(self) -> None:
        self.attempted: list[int] = []
        self.excluded: frozenset[int] = frozenset()

    def before_pick(self) -> frozenset[int]:
        if self.attempted and len(self.attempted) % UPDATE_FREQUENCY == 0:
            self.excluded = frozenset(self.attempted)
        return self.excluded

    def tried(self, level: int) -> None:
        self.attempted.append(level)


def explain(plan: LocalityPlan, eligible: Sequence[Endpoint]) -> list[str]:
    """`route explain`'s account of the locality decision."""
    lines = [f"locality: caller {plan.caller or '(none)'}: {plan.reason}"]
    if not plan.levels:
        if plan.mode == "distribute":
            lines.append("  no endpoint in a locality that distribute sends to: 503 (no healthy upstream)")
        return lines
    split = _split(plan, eligible)
    loads = priority_loads([_level_health(level) for level in split])
    for p, (level, load) in enumerate(zip(split, loads)):
        for g, eps in level:
            where = g.locality or "(no locality)"
            counts = f"{len(eps)}/{len(g.endpoints)} endpoint{'s' if len(g.endpoints) != 1 else ''} eligible"
            if plan.mode == "distribute":
                lines.append(f"  {where}: share {g.share:g}%, {counts}")
            else:
                lines.append(f"  priority {p}: {where}, {counts}")
        if plan.mode != "distribute":
            lines.append(f"  → priority {p} takes {load:.4g}% of requests")
    return lines


# ---------------------------------------------------------------- validation


def setting_problems(lb: LocalityLoadBalancerSetting) -> list[tuple[str, str]]:
    """(field under localityLbSetting, message) for settings Istio refuses or meshctl could not carry out."""
    out: list[tuple[str, str]] = []
    if lb.distribute and (lb.failover or lb.failover_priority):
        out.append(("distribute", "only one of distribute, failover or failoverPriority can be set "
                                  "(failover and failoverPriority may go together)"))
    if lb.failover and lb.failover_priority:
        for j, label in enumerate(lb.failover_priority):
            if label.partition("=")[0] in _TOPOLOGY:
                out.append((f"failoverPriority[{j}]", f"cannot set failover and the topology label {label!r} in "
                                                      "failoverPriority together"))
    froms: set[str] = set()
    for i, d in enumerate(lb.distribute):
        prob = _pattern_problem(d.from_)
        if prob:
            out.append((f"distribute[{i}].from", prob))
        if d.from_ in froms:
            out.append((f"distribute[{i}].from", f"locality {d.from_!r} is given twice"))
        froms.add(d.from_)
        if not d.to:
            out.append((f"distribute[{i}].to", "give the localities to send traffic to, with weights summing to 100"))
            continue
        total = 0
        for loc, weight in d.to.items():
            prob = _pattern_problem(loc)
            if prob:
                out.append((f"distribute[{i}].to.{loc}", prob))
            if not 1 <= weight <= 100:
                out.append((f"distribute[{i}].to.{loc}", f"locality weight must be in range [1, 100], got {weight}"))
            total += weight
        if total != 100:
            out.append((f"distribute[{i}].to", f"total locality weight {total} != 100"))
    for i, f in enumerate(lb.failover):
        if not f.from_ or not f.to:
            out.append((f"failover[{i}]", "from and to (regions) are required"))
        elif f.from_ == f.to:
            out.append((f"failover[{i}]", "locality lb failover settings must specify different regions"))
        if "/" in f.from_ or "/" in f.to:
            out.append((f"failover[{i}]", "locality lb failover only specifies regions (no '/')"))
        if "*" in f.from_ or "*" in f.to:
            out.append((f"failover[{i}]", "locality lb failover regions cannot contain the '*' wildcard"))
    for j, label in enumerate(lb.failover_priority):
        if not label.partition("=")[0]:
            out.append((f"failoverPriority[{j}]", "empty label name"))
    return out


def _pattern_problem(pattern: str) -> str | None:
    """Istio's validateLocalities: ``*`` only as a whole last part."""
    if not pattern:
        return "locality is required (region, region/zone, region/zone/subzone, '*' for all)"
    parts = pattern.split("/")
    if len(parts) > 3:
        return f"{pattern!r} has more than three parts"
    for k, p in enumerate(parts):
        if "*" in p and (p != "*" or k != len(parts) - 1):
            return f"{pattern!r}: '*' may only be a whole, last part (region/*, region/zone/*)"
        if not p:
            return f"{pattern!r}: empty part"
    return None
