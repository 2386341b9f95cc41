"""The sidecar process's entry point, importing only the data path.

``meshctl proxy run`` re-executes itself as ``python -m meshctl.proxy`` so the
long-running sidecar does not carry the whole CLI (typer, rich, httpx, every
noun's modules) in memory: about 17 MB less RSS per sidecar.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .runtime import ConfigRejected

EXIT_BAD_CONFIG = 2
DEFAULT_LOOP = "evloop"  # the runtime of a sidecar without MESHCTL_PROXY_LOOP (proxy/aio.py)
TRIM_EVERY = 30.0  # seconds between hand-backs of the C heap's free pages (_release_free_memory)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("meshctl")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False


def _quiet_gc() -> None:
    """Keep the cyclic GC off the latency tail: everything loaded so far
    (modules, the config) lives for the whole process, so move it out of the
    collector's sight, and collect the young generation less often (the data
    path makes few reference cycles)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 20, 100)


_TRIM: "Callable[[int], int] | bool | None" = None


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``).

    Start-up leaves free chunks all through the heap (import machinery, the
    config's YAML or JSON, the first compile), and bursts leave more (access-log
    batches, buffers of connections gone); malloc keeps them resident. Trimming
    after the first config is applied, then every TRIM_EVERY seconds, takes ~1.2 MB
    off a plain sidecar's RSS and costs ~0.1 ms. Does nothing where libc has no
    ``malloc_trim`` (musl, macOS). ctypes is loaded by trio already."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if callable(_TRIM):
        _TRIM(0)


async def _freezing(rt, main, *args) -> None:
    """Run ``main(*args)``; once the first config is applied (snapshot compiled,
    listeners bound, TLS loaded: with Pilot that is after start-up), freeze
    what exists then too, so the long-lived config is out of the GC's sight;
    then hand free heap pages back to the kernel, now and every TRIM_EVERY s."""
    import gc

    import meshctl.proxy.aio as aio

    async def freeze_after_first_config() -> None:
        while rt.stats.config_applied == 0:
            await aio.sleep(0.05)
        await aio.sleep(0.5)
        gc.collect()
        gc.freeze()
        while True:
            _release_free_memory()
            await aio.sleep(TRIM_EVERY)

    async with aio.open_nursery() as n:
        n.start_soon(freeze_after_first_config)
        await main(*args)
        n.cancel_scope.cancel()


def _observe(rt, access_log: Path | None, mixer: str | None) -> None:
    """Access log file and Mixer (global rate-limit quotas) for a runtime."""
    import os

    if access_log is not None:
        from .accesslog import AccessLog

        rt.access_log = AccessLog(access_log)
    rt.ratelimits.mixer_url = (mixer or os.environ.get("MESHCTL_MIXER") or "").rstrip("/") or None


def _loop_refused() -> str:
    """Why the sidecar cannot start on the runtime MESHCTL_PROXY_LOOP names, or "" (a name that
    is not a runtime)."""
    import meshctl.proxy.aio as aio

    if aio.ASKED and aio.ASKED not in aio.LOOPS:
        return f"MESHCTL_PROXY_LOOP={aio.ASKED!r} is not a runtime: {' or '.join(aio.LOOPS)} ({DEFAULT_LOOP} when unset)"
    return ""


def serve(config: Path, admin_port: int = 15000, log_level: str = "info", *,
          access_log: Path | None = None, mixer: str | None = None) -> int:
    """Load ``config`` and serve until SIGTERM. Returns the process exit code:
    0 after a drain, 2 for a config that cannot be loaded or run."""
    import meshctl.proxy.aio as aio

    from ..loader.codec import LoadError
    from ..loader.proxyconfig import load_proxy_config
    from .runtime import ProxyRuntime

    _setup_logging(log_level)

    def fail(message: str) -> int:
        print(f"meshctl proxy run: {message}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    if not config.exists():
        return fail(f"{config}: no such file")
    try:
        cfg = load_proxy_config(config)
    except LoadError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{config}: {exc.strerror or exc}")
    rt = ProxyRuntime(config_path=config, loader=load_proxy_config)
    rt.admin_verifier = _BOOT.get("admin_verifier", "")  # `proxy run --config F --state-dir D`
    try:
        _observe(rt, access_log, mixer)
    except Exception as exc:  # AccessLogError names the file
        return fail(str(exc))
    refused = _loop_refused()
    if refused:
        return fail(refused)
    logging.getLogger("meshctl.proxy").info("running on %s", aio.LOOP)
    _quiet_gc()
    try:
        from functools import partial

        from .identity import run_with_identity  # Citadel certificate (env MESHCTL_CITADEL_URL/TOKEN)

        aio.run(partial(run_with_identity, rt, partial(_freezing, rt, partial(rt.run, cfg, admin_port=admin_port)),
                         environ=_boot_env()))
    except BaseException as exc:  # ConfigRejected, possibly inside the identity nursery's group
        rej = _rejected(exc)
        if rej is None:
            raise
        return fail(f"{config}: config rejected: {rej.reason}")
    return 0


def _rejected(exc: BaseException) -> "ConfigRejected | None":
    """The ConfigRejected inside ``exc`` (possibly wrapped in exception groups)."""
    from .runtime import ConfigRejected

    if isinstance(exc, ConfigRejected):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            found = _rejected(e)
            if found is not None:
                return found
    return None


_BOOT: dict[str, str] = {}


def _boot_env() -> dict[str, str]:
    """Where the identity code finds the Citadel URL and one-time token: the bootstrap
    file's entries when the launcher wrote one, else the process environment."""
    import os

    if _BOOT:
        return {k: v for k, v in _BOOT.items() if k.startswith("MESHCTL_CITADEL_")}
    return os.environ  # type: ignore[return-value]


def serve_pilot(pilot_url: str, node_file: Path, state_dir: Path | None, admin_port: int = 15000,
                log_level: str = "info", *, access_log: Path | None = None, mixer: str | None = None) -> int:
    """Serve under Pilot (long-poll, ACK/NACK, last good config in ``state_dir``)."""
    import json
    from functools import partial

    import meshctl.proxy.aio as aio

    from ..loader.codec import LoadError, from_data
    from ..model.proxyconfig import Node
    from .pilot_client import run_with_pilot
    from .identity import run_with_identity  # Citadel certificate (env MESHCTL_CITADEL_URL/TOKEN)
    from .runtime import ProxyRuntime

    _setup_logging(log_level)
    refused = _loop_refused()
    if refused:
        print(f"meshctl proxy run: {refused}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.getLogger("meshctl.proxy").info("running on %s", aio.LOOP)
    try:
        node = from_data(Node, json.loads(node_file.read_text()), path="", file=str(node_file))
    except FileNotFoundError:
        print(f"meshctl proxy run: {node_file}: no such file", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except (ValueError, LoadError) as exc:
        print(f"meshctl proxy run: {node_file}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    rt = ProxyRuntime()
    if state_dir is not None:
        rt.gateway_credentials.secrets_dir = state_dir / "secrets"  # `meshctl secret create tls`
    try:
        _observe(rt, access_log, mixer)
    except Exception as exc:  # AccessLogError names the file
        print(f"meshctl proxy run: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _quiet_gc()
    try:
        credential = _BOOT.get("pilot_credential", "")
        if not credential:
            logging.getLogger("meshctl.proxy").warning(
                "no Pilot credential in a bootstrap file: Pilot will refuse this proxy (run it with "
                "`meshctl proxy run --state-dir` as the mesh's user, or under `meshctl up`)")
        rt.ratelimits.mixer_credential = credential
        rt.admin_verifier = _BOOT.get("admin_verifier", "")
        aio.run(partial(run_with_identity, rt, _freezing, rt, run_with_pilot, rt, pilot_url, node, state_dir,
                         admin_port, credential, environ=_boot_env()))
    except BaseException as exc:
        rej = _rejected(exc)
        if rej is None:
            raise
        print(f"meshctl proxy run: config from {pilot_url} rejected: {rej.reason}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshctl proxy run")
    p.add_argument("--config", "-c", type=Path)
    p.add_argument("--pilot")
    p.add_argument("--node", type=Path)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--admin-port", type=int, default=15000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", type=Path)
    p.add_argument("--mixer")
    a = p.parse_args(argv)
    # before the first import of proxy/aio.py, which binds the runtime once
    os.environ.setdefault("MESHCTL_PROXY_LOOP", DEFAULT_LOOP)
    from ..credentials import take_bootstrap

    _BOOT.update(take_bootstrap())  # read once and deleted: no secret stays on disk or in /proc/PID/environ
    extra = {"access_log": a.access_log, "mixer": a.mixer}
    if a.pilot:
        if a.node is None:
            print("meshctl proxy run: --pilot needs --node FILE", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return serve_pilot(a.pilot, a.node, a.state_dir, a.admin_port, a.log_level, **extra)
    if a.config is None:
        print("meshctl proxy run: give --config FILE, or --pilot URL --node FILE", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return serve(a.config, a.admin_port, a.log_level, **extra)
