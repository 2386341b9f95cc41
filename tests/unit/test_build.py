"""meshctl._build: which build this is, and setup.py's list of compiled modules."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
from pathlib import Path

import meshctl._build as build

ROOT = Path(__file__).resolve().parents[2]


def _setup_list() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPILED":
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    raise AssertionError("setup.py has no COMPILED list")


def test_the_flag_names_the_modules_setup_py_compiles():
    paths = _setup_list()
    assert [p[:-3].replace("/", ".") for p in paths] == list(build.HOT_PATH)


def test_the_flag_tells_what_was_actually_imported():
    for name in build.HOT_PATH:
        mod = importlib.import_module(name)
        native = not mod.__file__.endswith(".py")
        assert native == (name in build.COMPILED_MODULES), name
    assert build.COMPILED == bool(build.COMPILED_MODULES)
    assert ("compiled with mypyc" in build.describe()) == build.COMPILED


def test_events_have_a_fixed_layout_in_either_build():
    # pure Python: dataclasses with __slots__; compiled: native classes (which may not have
    # __slots__). Either way no per-event __dict__, and a misspelt attribute is an error.
    # The same for the per-request dataclasses of core/ (retry's Outcome, route's RequestView
    # and Forward), whose options come from the same module (meshctl/dataclass_slots.py).
    from meshctl import dataclass_slots
    from meshctl.core import retry, route
    from meshctl.protocol import events, http2

    compiled = "meshctl.protocol.events" in build.COMPILED_MODULES
    assert ("meshctl.dataclass_slots" in build.COMPILED_MODULES) == compiled
    assert dataclass_slots.DATACLASS_SLOTS == ({} if compiled else {"slots": True})
    from meshctl.model.istio import Destination, HTTPRoute, HTTPRouteDestination

    view = route.RequestView("GET", "http", "a", "/", [])
    dest = HTTPRouteDestination(destination=Destination(host="h"))
    samples = [events.RequestHead("GET", "/", []), events.ResponseHead(200, []), events.Data(b"x", 1),
               events.EndOfMessage(), events.Reset("gone", 3), events.Upgraded(b""),
               http2.H2Reset("refused", 5, http2.REFUSED_STREAM), http2.GoAway(7), http2.WindowUpdated(1),
               retry.Outcome(status=503), view,
               route.Forward(HTTPRoute(), 0, "vh", dest, "c", "/", "a", [], (), None, retry.NO_RETRY, None)]
    for ev in samples:
        assert not hasattr(ev, "__dict__"), type(ev).__name__
        try:
            setattr(ev, "stram_id", 1)
        except AttributeError:
            pass
        else:
            raise AssertionError(f"{type(ev).__name__} took an attribute it does not have")
    assert http2.H2Reset("refused", 5, http2.REFUSED_STREAM).refused
