"""Istio Telemetry metric overrides applied to a sidecar's Prometheus text.

``apply_metric_overrides`` runs when /metrics is scraped and the config carries
overrides (proxy/admin.py imports it then), never per request: interpreted on
purpose, out of the compiled library every sidecar keeps resident (setup.py
compiles proxy/telemetry.py, which records and renders the metrics).
"""

from __future__ import annotations

import re
from typing import Sequence

from .telemetry import _num

__all__ = ["apply_metric_overrides"]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (.*)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_SUFFIXES = ("_bucket", "_sum", "_count")


def apply_metric_overrides(text: str, overrides: Sequence) -> str:
    """Prometheus text with Istio Telemetry metric overrides applied (model/telemetry_api.py
    MetricOverride, in order): a disabled metric's samples are left out for the reporters
    it names, a removed tag is dropped from its labels, and the samples that then share
    their labels are summed (counters and histogram parts alike), as Envoy's stats would
    have been recorded without the tag. A family left with no sample loses its HELP/TYPE."""
    if not overrides:
        return text
    out: list[str] = []
    sums: dict[tuple[str, str], int] = {}  # (name, labels) → index in out
    values: dict[int, float] = {}
    kept_families: set[str] = set()
    pending_meta: dict[str, list[str]] = {}
    families: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                pending_meta.setdefault(parts[2], []).append(line)
                families.add(parts[2])
                continue
            out.append(line)
            continue
        m = _SAMPLE.match(line)
        if m is None:
            out.append(line)
            continue
        name, labelstr, value = m.group(1), m.group(2) or "", m.group(3)
        family = name
        for suf in _SUFFIXES:
            if name.endswith(suf) and name[: -len(suf)] in families:
                family = name[: -len(suf)]
        labels = _LABEL.findall(labelstr)
        reporter = next((v for k, v in labels if k == "reporter"), "")
        disabled = False
        removed: set[str] = set()
        for o in overrides:
            if family in o.families and reporter in o.reporters:
                if o.disabled is not None:
                    disabled = o.disabled
                removed.update(o.remove_tags)
        if disabled:
            continue
        if family not in kept_families:
            kept_families.add(family)
            out.extend(pending_meta.pop(family, []))
        if not removed:
            out.append(line)
            continue
        lab = ",".join(f'{k}="{v}"' for k, v in labels if k not in removed)
        key = (name, lab)
        try:
            num = float(value)
        except ValueError:
            out.append(line)
            continue
        at = sums.get(key)
        if at is None:
            sums[key] = len(out)
            values[len(out)] = num
            out.append("")
        else:
            values[at] += num
    for key, at in sums.items():
        name, lab = key
        out[at] = f"{name}{{{lab}}} {_num(values[at])}"
    return "\n".join(out) + "\n"
