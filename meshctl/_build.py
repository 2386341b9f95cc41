"""How this installation of meshctl was built.

``COMPILED`` is True when the per-request modules listed in setup.py were
compiled by mypyc (C extension modules), False for the pure-Python build.
``COMPILED_MODULES`` names the modules that are compiled. Read by
``meshctl --version``-style reports; importing this module loads only the
package ``__init__`` files on the way, not the modules it looks at.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

# the modules setup.py compiles (kept in step by tests/unit/test_build.py)
HOT_PATH = (
    "meshctl.dataclass_slots",
    "meshctl.core.balance",
    "meshctl.core.breaker",
    "meshctl.core.errors",
    "meshctl.core.fault",
    "meshctl.core.hashring",
    "meshctl.core.mirror",
    "meshctl.core.outlier",
    "meshctl.core.pathnorm",
    "meshctl.core.ratelimit",
    "meshctl.core.retry",
    "meshctl.core.route",
    "meshctl.protocol.events",
    "meshctl.protocol.grpc",
    "meshctl.protocol.headers",
    "meshctl.protocol.http1",
    "meshctl.protocol.http2",
    "meshctl.proxy.clusterstate",
    "meshctl.proxy.connection",
    "meshctl.proxy.connstate",
    "meshctl.proxy.errors",
    "meshctl.proxy.evloop",
    "meshctl.proxy.forward",
    "meshctl.proxy.h1upstream",
    "meshctl.proxy.h2conn",
    "meshctl.proxy.h2pool",
    "meshctl.proxy.http",
    "meshctl.proxy.listener",
    "meshctl.proxy.outbuf",
    "meshctl.proxy.pool",
    "meshctl.proxy.request",
    "meshctl.proxy.sockstream",
    "meshctl.proxy.stages",
    "meshctl.proxy.stats",
    "meshctl.proxy.telemetry",
)


def _compiled(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


COMPILED_MODULES: tuple[str, ...] = tuple(m for m in HOT_PATH if _compiled(m))
COMPILED: bool = bool(COMPILED_MODULES)


def describe() -> str:
    """One line for a version report: which build this is."""
    if COMPILED:
        return f"compiled with mypyc ({len(COMPILED_MODULES)} of {len(HOT_PATH)} hot-path modules)"
    return "pure Python (no mypyc build)"
