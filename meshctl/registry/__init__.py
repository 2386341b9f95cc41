"""Service registries: embedded (default), Consul and Eureka.

``open_registry(url, state_dir)`` turns a registry URL from mesh.yaml or the
command line into a :class:`~meshctl.registry.base.Registry`:

=================================== =======================================
``""`` / ``"embedded"``              :class:`EmbeddedRegistry` in ``state_dir``
``consul://127.0.0.1:8500``          :class:`ConsulRegistry` (HTTP API)
``consul+https://host:8501``         the same over HTTPS
``eureka://127.0.0.1:8761/eureka``   :class:`EurekaRegistry` (REST v2)
``eureka+https://host/eureka``       the same over HTTPS
=================================== =======================================

Nothing is contacted here: the URL is only parsed. ``await registry.ping()``
checks that the server answers and raises :class:`RegistryError` saying what
was tried when it does not.

Also re-exported here, from ``registry/watch.py`` (shared by the remote
registries, which import it from there, never from this package: no import
circle): :class:`WatchState`, the "last snapshot, reachable, last error"
record that ``meshctl status`` shows, and :func:`keep_alive_loop`, the
heartbeat task a sidecar or supervisor runs for each instance it registered.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .base import Instance, Registry, RegistryError, Snapshot
from .watch import EMPTY_SNAPSHOT, Backoff, BackgroundWatcher, WatchedRegistry, WatchState, keep_alive_loop, make_snapshot

__all__ = [
    "Instance",
    "Registry",
    "RegistryError",
    "Snapshot",
    "WatchState",
    "Backoff",
    "BackgroundWatcher",
    "EMPTY_SNAPSHOT",
    "WatchedRegistry",
    "keep_alive_loop",
    "make_snapshot",
    "open_registry",
    "parse_registry_url",
]

_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# ---------------------------------------------------------------------------
# URL parsing


def _bad(url: str, why: str) -> RegistryError:
    return RegistryError(
        f"registry URL {url!r}: {why} (expected 'embedded', 'consul://HOST:PORT' or 'eureka://HOST:PORT/eureka')"
    )


def parse_registry_url(url: str) -> dict[str, Any]:
    """Split a registry URL into its kind and connection settings.

    Returns ``{"kind": "embedded"}`` or ``{"kind": "consul"|"eureka",
    "scheme": "http"|"https", "host": ..., "port": ..., "path": ...,
    "token": ...}``. Raises RegistryError naming the URL and the problem.
    """
    text = (url or "").strip()
    if text in ("", "embedded", "embedded://", "embedded:"):
        return {"kind": "embedded"}
    if "://" not in text:
        raise _bad(url, "no scheme" if ":" not in text else f"unknown scheme {text.split(':', 1)[0]!r}")
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    kinds = {
        "consul": ("consul", "http"),
        "consul+http": ("consul", "http"),
        "consul+https": ("consul", "https"),
        "eureka": ("eureka", "http"),
        "eureka+http": ("eureka", "http"),
        "eureka+https": ("eureka", "https"),
    }
    if scheme not in kinds:
        raise _bad(url, f"unknown scheme {scheme!r}")
    kind, http_scheme = kinds[scheme]
    if not rest:
        raise _bad(url, "no host")
    parts = urlsplit(f"{http_scheme}://{rest}")
    try:
        port = parts.port
    except ValueError:
        raise _bad(url, "the port is not a number between 1 and 65535") from None
    host = parts.hostname or ""
    if not host:
        raise _bad(url, "no host")
    if not (_HOST_RE.match(host) or (":" in host and re.fullmatch(r"[0-9A-Fa-f:.]+", host))):
        raise _bad(url, f"bad host {host!r}")
    if port == 0:
        raise _bad(url, "port 0 is not a valid server port")
    query = parse_qs(parts.query, keep_blank_values=True)
    token = query.pop("token", [None])[-1]
    if parts.username and not token:
        token = parts.username if not parts.password else parts.password
    if query:
        raise _bad(url, f"unknown query parameter(s) {', '.join(sorted(query))}")
    if parts.fragment:
        raise _bad(url, "a '#fragment' has no meaning here")
    if kind == "consul":
        if parts.path not in ("", "/"):
            raise _bad(url, f"a Consul URL has no path (got {parts.path!r})")
        return {
            "kind": "consul",
            "scheme": http_scheme,
            "host": host,
            "port": port or (8501 if http_scheme == "https" else 8500),
            "path": "",
            "token": token,
        }
    path = parts.path.rstrip("/") or "/eureka"
    return {
        "kind": "eureka",
        "scheme": http_scheme,
        "host": host,
        "port": port or 8761,
        "path": path,
        "token": token,
    }


def open_registry(url: str, state_dir: Path | str, *, token: str | None = None) -> Registry:
    """The registry named by ``url`` (see the module docstring).

    ``token``: Consul ACL token; defaults to ``?token=`` in the URL, then the
    ``CONSUL_HTTP_TOKEN`` environment variable. ``state_dir`` is only used by
    the embedded registry. Raises RegistryError for a malformed URL.
    """
    spec = parse_registry_url(url)
    if spec["kind"] == "embedded":
        from .embedded import EmbeddedRegistry

        return EmbeddedRegistry(Path(state_dir))
    if spec["kind"] == "consul":
        from .consul import ConsulRegistry

        tok = token or spec["token"] or os.environ.get("CONSUL_HTTP_TOKEN") or None
        return ConsulRegistry(
            host=spec["host"], port=spec["port"], scheme=spec["scheme"], token=tok, url=url.strip()
        )
    from .eureka import EurekaRegistry

    base = f"{spec['scheme']}://{_netloc(spec['host'], spec['port'])}{spec['path']}"
    return EurekaRegistry(base, url=url.strip())


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
