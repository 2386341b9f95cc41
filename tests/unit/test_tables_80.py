"""At 80 columns, tables keep every name whole (issue 18, item 6): a long name wraps
onto the next line, or `top` drops the columns that say nothing, instead of cutting it
to 'istio-ingressga…'; `status` shows the last event of a restarted workload."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rich.console import Console

from meshctl.cli.citadel import identities_table
from meshctl.cli.mesh import print_table
from meshctl.cli.mixer import render_top


def rendered(renderable=None, *, status: dict | None = None) -> list[str]:
    con = Console(record=True, width=80, color_system=None)
    if status is not None:
        print_table(status, out=con)
    else:
        con.print(renderable)
    lines = con.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert not any("…" in line for line in lines), "\n".join(lines)
    return lines


def first_column(lines: list[str], header: str, next_header: str) -> str:
    """The first column's text, rows run together (a wrapped cell continues on the next line)."""
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith(header))
    width = lines[head].index(next_header)
    return "".join(line[:width].strip() for line in lines[head + 1:])


def row(name: str, **kw) -> dict:
    base = {"service": name, "version": "v1", "requests": 10, "rps": 1.0, "success_rate": 1.0, "p50": 1.0,
            "p90": 2.0, "p99": 3.0, "errors": 0, "active_connections": 0, "ejected_hosts": 0, "overflows": 0,
            "rate_limited": 0}
    return {**base, **kw}


def test_top_makes_room_for_a_gateway_name_from_columns_that_are_all_zero():
    data = {"window": 10.0, "covered": 10.0, "targets": 2, "failing": {},
            "rows": [row("istio-ingressgateway-canary.istio-system.svc.cluster.local"), row("reviews.default.svc.cluster.local")]}
    lines = rendered(render_top(data, width=80))
    assert any(line.startswith("istio-ingressgateway-canary.istio-system ") for line in lines), lines
    header = next(line for line in lines if line.startswith("SERVICE"))
    assert "RL" not in header.split() and "P99" in header.split()


def test_top_wraps_a_name_when_every_column_has_something_to_say():
    name = "a-service-with-a-name-longer-than-any-column.prod.svc.cluster.local"
    data = {"window": 10.0, "covered": 10.0, "targets": 1, "failing": {},
            "rows": [row(name, active_connections=3, ejected_hosts=1, overflows=2, rate_limited=5)]}
    lines = rendered(render_top(data, width=80))
    assert first_column(lines, "SERVICE", "VER").startswith("a-service-with-a-name-longer-than-any-column.prod")
    header = next(line for line in lines if line.startswith("SERVICE"))
    assert header.split()[-4:] == ["CONN", "EJECT", "UO", "RL"]


def test_status_keeps_long_workload_names_and_shows_the_last_event():
    workloads = [
        {"name": name, "version": "v1", "state": state, "app_address": "127.0.0.1:21001",
         "inbound_address": "127.0.0.1:21002", "outbound_address": "127.0.0.1:21003",
         "admin_address": "127.0.0.1:21004", "restarts": restarts, "last_event": event}
        for name, state, restarts, event in [
            ("payments-processor-canary-v2-0", "ready", 0, ""),
            ("recommendations-engine-v1-0", "restarting", 2, "exited with code 1; restart #2 in 0.4s"),
        ]
    ]
    st = {"workloads": workloads, "gateways": [{"name": "istio-ingressgateway", "address": "127.0.0.1:8080",
                                               "ports": {"80": 8080}, "state": "ready"}],
          "control_plane": {"pilot": "http://127.0.0.1:21000"}, "registry": {"url": "embedded"}}
    lines = rendered(status=st)
    names = first_column(lines, "WORKLOAD", "VERSION")
    assert "payments-processor-canary-v2-0" in names and "recommendations-engine-v1-0" in names
    assert "istio-ingressgateway" in first_column(lines, "GATEWAY", "ADDRESS")
    assert any("recommendations-engine-v1-0: exited with code 1; restart #2" in line for line in lines), lines


def test_citadel_status_shows_whole_identities():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ids = ["spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
           "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
    issued = {i: {"spiffe_id": i, "serial": "0123456789abcdef0123", "not_after": (now + timedelta(hours=20)).isoformat(),
                  "how": "csr"} for i in ids}
    lines = rendered(identities_table(issued, now))
    text = first_column(lines, "IDENTITY", "SERIAL")
    for i in ids:
        assert i in text, "\n".join(lines)
