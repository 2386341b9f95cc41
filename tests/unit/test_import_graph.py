"""meshctl's import graph, read from the source with ast (nothing is imported or run).

The layers of DESIGN.md, lowest first; a module may import its own layer's
modules and any lower layer's, never a higher one's:

    0  model/, and the helpers at the top that import no other layer (httpapi, loopback, plainhttp,
       state, credentials, secrets, _build, dataclass_slots)
    1  protocol/ (sans-IO codecs), core/ (decisions): each imports only layer 0
    2  loader/ (YAML → model)
    3  registry/, citadel/, pilot/, mixer/, proxy/ (the roles)
    4  supervisor/; launch (how meshctl starts itself again: argv for roles and sidecars) and
       controlclient (the CLI's one client of the control plane)
    5  cli/, and the entry points meshctl/__main__ and frozen (the one-file build's)

Within layer 3 the roles are peers; the imports between them that exist are
listed in PEER_IMPORTS with their reason, and no other is allowed. Function-
level imports count like top-level ones: a lazy import is still a dependency.
Known violations still to remove are listed in ALLOWED_EDGES, each with its issue;
no import circle is allowed anywhere, with no exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

import meshctl

ROOT = Path(meshctl.__file__).parent

LAYER = {
    "model": 0, "httpapi": 0, "loopback": 0, "plainhttp": 0, "state": 0, "credentials": 0, "secrets": 0, "_build": 0, "dataclass_slots": 0,
    "protocol": 1, "core": 1,
    "loader": 2,
    "registry": 3, "citadel": 3, "pilot": 3, "mixer": 3, "proxy": 3,
    "supervisor": 4, "launch": 4, "controlclient": 4,
    "cli": 5, "__main__": 5, "frozen": 5,
}

# imports between layer-1 and layer-3 peers that are part of the design
PEER_IMPORTS = {
    ("pilot", "registry"),  # Pilot watches the registry's endpoints
    ("proxy", "citadel"),   # the sidecar's certificates and the peer identity check
    ("citadel", "registry"),  # a multi-host mesh's CA certificates travel in the registry's Consul KV
}

# Known violations, each with the issue that removes it. The test fails when one
# of them disappears (so the list only ever shrinks) or a new one appears.
ALLOWED_EDGES: set[tuple[str, str]] = set()  # none left


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                # "from .. import httpapi" imports the module httpapi, not the package
                targets = subs if subs and len(subs) == len(node.names) else [base, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            out.update(t for t in targets if t in mods and t != name)
        edges[name] = out
    return edges


def _layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return top, LAYER.get(top, -1)


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer():
    tops = {_layer_of(m)[0] for m in _modules() if m != "meshctl"}
    assert tops <= set(LAYER), f"add these to LAYER (and DESIGN.md): {sorted(tops - set(LAYER))}"


def test_no_import_cycle_in_meshctl():
    # no exception: the last circle (registry/__init__ ↔ its backends) went with issue 14
    assert not _cycles(_graph()), [sorted(c) for c in _cycles(_graph())]


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = set()
    for a, targets in _graph().items():
        ta, la = _layer_of(a)
        for b in targets:
            tb, lb = _layer_of(b)
            if ta == tb:
                continue
            if lb > la:
                bad.add((a, b))
            elif lb == la and la in (1, 3):
                if (ta, tb) not in PEER_IMPORTS:
                    bad.add((a, b))
    assert bad <= ALLOWED_EDGES, sorted(bad - ALLOWED_EDGES)
    assert ALLOWED_EDGES <= bad, f"gone, remove from ALLOWED_EDGES: {sorted(ALLOWED_EDGES - bad)}"


def test_the_proxy_has_no_import_cycle_and_core_needs_no_protocol():
    # the two circles issue 12 and 14 named: proxy/http.py ↔ h2conn/h2pool/ratelimit_stage,
    # and core/ importing HeaderList from protocol/
    edges = _graph()
    assert not [c for c in _cycles(edges) if any(m.startswith("meshctl.proxy.") for m in c)]
    assert not [(a, b) for a, bs in edges.items() if a.startswith("meshctl.core") for b in bs
                if b.startswith("meshctl.protocol")]
    assert "meshctl.proxy.telemetry" not in edges["meshctl.mixer.aggregate"]
    assert not [b for b in edges["meshctl.proxy.pilot_client"] if b.startswith("meshctl.pilot")]


def test_the_supervisor_is_in_no_import_cycle_and_its_lifecycle_rules_are_pure():
    # issue 14: supervisor/run.py, supervisor/citadel.py and mixer/supervise.py imported
    # each other; the lifecycle rules run without trio (tested like core/outlier.py)
    edges = _graph()
    assert not [c for c in _cycles(edges) if any(m.startswith("meshctl.supervisor") for m in c)]
    assert "meshctl.mixer.supervise" not in edges  # the supervisor's own code lives in supervisor/
    tree = ast.parse((ROOT / "supervisor" / "lifecycle.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "enum"}, imported


# The names of trio that a module of the sidecar (meshctl/proxy/) may use directly: none, but
# tls.py's trio.SSLStream (TLS over a stream that is not a socket: only tests on trio have
# one). Everything of trio's (its run, tasks, cancel scopes, clock, parking, I/O waits,
# threads, resolver, and the stream ABCs and exceptions) is reached through proxy/aio.py, the
# one module bound to the runtime (issue 12): on evloop, a sidecar imports no trio at all.
TRIO_PLAIN: set[str] = set()
TRIO_PLAIN_IN = {"tls": {"SSLStream"}}
NOT_THROUGH_AIO = {"aio", "testing"}  # the seam itself; test support (trio.testing's memory streams)


def _trio_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of each trio name a module uses: ``trio.x.y`` (under any alias of
    trio or of one of its modules) and ``from trio[.mod] import name``."""
    alias: dict[str, str] = {}  # local name -> the trio module it is
    uses: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "trio" or a.name.startswith("trio."):
                    if a.asname:
                        alias[a.asname] = a.name
                        if a.name != "trio":
                            uses.append((node.lineno, a.name))
                    else:
                        alias["trio"] = "trio"  # `import trio.lowlevel` binds trio
                        if a.name != "trio":
                            uses.append((node.lineno, a.name))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module is not None:
            if node.module == "trio" or node.module.startswith("trio."):
                for a in node.names:
                    uses.append((node.lineno, f"{node.module}.{a.name}"))
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in alias:
                uses.append((node.lineno, ".".join([alias[cur.id], *reversed(parts)])))
    return uses


def _direct_trio_primitives(mods: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in sorted(mods.items()):
        if not name.startswith("meshctl.proxy."):
            continue
        short = name.rsplit(".", 1)[1]
        if short in NOT_THROUGH_AIO:
            continue
        allowed = TRIO_PLAIN | TRIO_PLAIN_IN.get(short, set())
        for line, dotted in sorted(_trio_uses(ast.parse(path.read_text(encoding="utf-8")))):
            parts = dotted.split(".")
            if len(parts) < 2 or parts[1] not in allowed:
                bad.append(f"{name}:{line}: {dotted}")
    return bad


def test_the_sidecar_reaches_trios_primitives_only_through_aio():
    # issue 12: the data plane moves to a runtime of its own; proxy/aio.py is the one seam
    bad = _direct_trio_primitives(_modules())
    assert not bad, "use meshctl.proxy.aio (import meshctl.proxy.aio as aio) instead:\n" + "\n".join(bad)
    import meshctl.proxy.aio as aio

    assert all(hasattr(aio, n) for n in aio.__all__)
    assert {"Stream", "HalfCloseableStream", "ClosedResourceError", "BrokenResourceError"} <= set(aio.__all__)


def test_the_aio_check_sees_every_way_of_naming_a_trio_primitive(tmp_path):
    src = (
        "import trio\nimport trio.lowlevel\nimport trio as t\nfrom trio import sleep, ClosedResourceError\n"
        "from trio.lowlevel import checkpoint as cp\nfrom trio import lowlevel as ll\nimport trio.to_thread as th\n"
        "async def f(s: trio.abc.Stream) -> None:\n"
        "    await trio.sleep(1)\n    await t.lowlevel.wait_readable(s)\n    await ll.checkpoint()\n"
        "    await th.run_sync(print)\n    raise trio.BrokenResourceError()\n"
    )
    (tmp_path / "mod.py").write_text(src)
    (tmp_path / "aio.py").write_text(src)  # the seam itself is not checked
    found = _direct_trio_primitives({"meshctl.proxy.mod": tmp_path / "mod.py", "meshctl.proxy.aio": tmp_path / "aio.py"})
    assert [f.split(":", 1)[1] for f in found] == [
        "2: trio.lowlevel", "4: trio.ClosedResourceError", "4: trio.sleep", "5: trio.lowlevel.checkpoint",
        "6: trio.lowlevel", "7: trio.to_thread", "8: trio.abc.Stream", "9: trio.sleep",
        "10: trio.lowlevel.wait_readable", "11: trio.lowlevel.checkpoint", "12: trio.to_thread.run_sync",
        "13: trio.BrokenResourceError",
    ], found
