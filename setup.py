"""Build meshctl: pure Python, or with its per-request modules compiled by mypyc.

The metadata is in pyproject.toml; this file only decides about compiling.
The modules in COMPILED are compiled to C extension modules when
- MESHCTL_PURE is not "1" (the opt-out),
- mypyc can be imported in the build environment (it comes with mypy), and
- a C compiler is on PATH.
Otherwise the same package is installed as plain Python, which works the
same way, only slower on the request path. ``meshctl._build.COMPILED`` says
which one an installation got.

pip builds in an isolated environment holding only setuptools, so a plain
``pip install .`` (the README's quick start) is pure Python and quick. For the
compiled build (about 3-7 minutes on 2 cores: one C file for all the modules):

    pip install 'mypy>=1.10' setuptools wheel && pip install --no-build-isolation .
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

from setuptools import setup

# Stable per-request modules that type-check under mypyc (no monkeypatching,
# no dynamic attributes). Others join once they are owned and checked.
# What keeps them fast once compiled (callgrind on bench/hop_bench.py, December 2026):
# module constants read per request are Final (otherwise every read is a lookup in the
# module's dict); a dataclass made per request writes its __init__ out (the one
# dataclass() generates stays interpreted Python); and a value whose type mypyc does not
# know (an unannotated parameter or attribute) is reached through generic attribute
# lookups and calls, as interpreted code would; a function with no annotation at all is
# not type-checked, so every value in it is of unknown type (annotate at least its return).
# A class that must be a trio stream is registered with trio.abc (sockstream.py): mypyc
# compiles no subclass of an ABC as a native class.
COMPILED = [
    "meshctl/dataclass_slots.py",  # must be compiled with the modules that use it (it tells the builds apart)
    "meshctl/core/balance.py",
    "meshctl/core/breaker.py",
    "meshctl/core/errors.py",  # the base of balance's and ratelimit's config errors: a native class needs native bases
    "meshctl/core/fault.py",
    "meshctl/core/hashring.py",
    "meshctl/core/mirror.py",  # has_mirrors, asked after every forwarded request
    "meshctl/core/outlier.py",
    "meshctl/core/pathnorm.py",
    "meshctl/core/ratelimit.py",
    "meshctl/core/retry.py",  # the verdict after every try
    "meshctl/core/route.py",  # Router.decide, for every routed request
    "meshctl/protocol/events.py",  # the base of http2's H2Reset: a native class needs native bases
    "meshctl/protocol/grpc.py",
    "meshctl/protocol/headers.py",
    "meshctl/protocol/http1.py",
    "meshctl/protocol/http2.py",
    "meshctl/proxy/clusterstate.py",  # ClusterState: read a score of times per request (forwarder, stages)
    "meshctl/proxy/connection.py",  # the root of every connection task's await chain
    "meshctl/proxy/connstate.py",  # ConnState: written by the HTTP/1.1 loop on every request
    "meshctl/proxy/errors.py",
    "meshctl/proxy/evloop.py",  # the data plane's own runtime (trio's API on one epoll); not used by the proxy yet
    "meshctl/proxy/forward.py",
    "meshctl/proxy/h1upstream.py",
    "meshctl/proxy/h2conn.py",  # (its H2ConnState, a ConnState, is in connstate.py, with its base)
    "meshctl/proxy/h2pool.py",
    "meshctl/proxy/http.py",
    "meshctl/proxy/listener.py",  # ActiveListener.steps_for, asked once per request
    "meshctl/proxy/outbuf.py",  # the base of h2conn's and h2pool's connections
    "meshctl/proxy/pool.py",
    "meshctl/proxy/request.py",
    "meshctl/proxy/sockstream.py",  # the plain-socket stream of both HTTP/1.1 legs (stream.py re-exports it)
    "meshctl/proxy/stages.py",
    "meshctl/proxy/stats.py",
    "meshctl/proxy/telemetry.py",
]


# The HTTP/2 modules, loaded by a sidecar's first HTTP/2 connection or upstream try
# (proxy/protocols.py): compiled into a library of their own.
HTTP2 = [
    "meshctl/protocol/http2.py",
    "meshctl/proxy/h2conn.py",
    "meshctl/proxy/h2pool.py",
    "meshctl/proxy/outbuf.py",
]


def _why_pure() -> str | None:
    if os.environ.get("MESHCTL_PURE") == "1":
        return "MESHCTL_PURE=1"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed in the build environment"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(os.environ.get("CC", "").split()[0] if os.environ.get("CC") else cc) is None:
        return f"no C compiler ({cc}) on PATH"
    return None


def _ext_modules() -> list:
    why = _why_pure()
    if why is not None:
        print(f"meshctl: building pure Python ({why})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    print(f"meshctl: compiling {len(COMPILED)} modules with mypyc", file=sys.stderr)
    # --no-warn-unused-configs: mypyc reads pyproject's [tool.mypy] (written for the whole
    # tree) and fails the build on any message, notes included; for the few modules it
    # compiles most of those sections are unused.
    # Two shared libraries: a sidecar that never speaks HTTP/2 never loads the second
    # (no compiled module of the first imports one of it: protocols.py, interpreted,
    # does). The resident part of one library grows with all it holds, used or not.
    rest = [m for m in COMPILED if m not in HTTP2]
    exts = mypycify(["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-unused-configs", *COMPILED],
                    opt_level="3", separate=[(rest, "meshctl"), (HTTP2, "meshctl_h2")])
    # Hidden symbols: a library's functions call each other directly instead of through
    # its PLT, and its dynamic symbol table (thousands of functions) is neither kept nor
    # read at load (each module's PyInit_ stays exported: Python's headers mark it so;
    # mypyc joins the libraries and the modules' shims through capsules, not symbols).
    # The library every sidecar loads is built at -O2: after some load nearly all of its
    # text is resident (bench/rss.sh, issue 12's RSS target), and -O2 keeps it ~14%
    # smaller than -O3 at the same CPU per request; -Os kept it ~45% smaller but cost the
    # HTTP/1.1 pair ~20% of its throughput (bench/README.md, rss.sh). The HTTP/2 library,
    # loaded only with HTTP/2 traffic, stays -O3. (The last -O on the command line wins.)
    # Linking (bench/rss.sh, December 2026: -0.27 MB per plain sidecar for the first, ~-0.1 for
    # the second): a library's ~11,000 relative relocations (pointers in its static data)
    # are packed into DT_RELR (8 bytes per 64 pointers against 24 bytes each in .rela.dyn),
    # where the toolchain and the C library support it (binutils >= 2.38, glibc >= 2.36;
    # the probe below): the table is read at load, so all of it stayed resident (~270 KB of
    # the main library). And each module's shim (its own tiny .so, loaded on import: ~15 in
    # a sidecar) is linked without -z separate-code: two segments instead of four, so 3
    # pages resident instead of 5; only the shims (a few hundred bytes of headers and
    # strings become executable), not the libraries, whose code stays apart from data.
    relr = _relr_links()
    for ext in exts:
        extra = ["-fvisibility=hidden"] + (["-O2"] if ext.name == "meshctl__mypyc" else [])
        ext.extra_compile_args = [*ext.extra_compile_args, *extra]
        link = ["-Wl,-z,pack-relative-relocs"] if relr else []
        if not ext.name.endswith("__mypyc"):
            link.append("-Wl,-z,noseparate-code")
        ext.extra_link_args = [*ext.extra_link_args, *link]
    return exts


def _relr_links() -> bool:
    """Whether the C compiler packs relative relocations into DT_RELR for this C library:
    a probe linked with -z pack-relative-relocs must carry glibc's GLIBC_ABI_DT_RELR
    version (which makes an older glibc refuse the library instead of misloading it).
    GNU ld before 2.38 only warns that it ignores the option: no tag, so no."""
    import subprocess
    import tempfile

    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            # one relative relocation, and a call into the C library (so that it is needed: the
            # version is required of the C library the output depends on)
            f.write('#include <stdio.h>\nstatic int x; int *probe_p = &x; int probe(void) { return puts("x"); }\n')
        try:
            r = subprocess.run([*cc.split(), "-shared", "-fPIC", "-Wl,-z,pack-relative-relocs", src, "-o", out],
                               capture_output=True, timeout=60)
            with open(out, "rb") as f:
                return r.returncode == 0 and b"GLIBC_ABI_DT_RELR" in f.read()
        except (OSError, subprocess.SubprocessError):
            return False


setup(ext_modules=_ext_modules())
