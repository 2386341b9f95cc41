"""Small probes and helpers the supervisor and the CLI share: is a port free, does
a TCP connect or an HTTP GET answer, the tail of a log, a registry URL fit to show."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterator

import trio

__all__ = ["http_get_json", "http_ok", "leaves", "port_is_free", "redact_url", "tail", "tcp_ok"]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def tcp_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    with trio.move_on_after(timeout):
        try:
            s = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await s.aclose()
        return True
    return False


async def http_ok(host: str, port: int, path: str, timeout: float = 1.0) -> bool:
    """GET path answers 2xx or 3xx."""
    with trio.move_on_after(timeout):
        try:
            s = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        try:
            await s.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = await s.receive_some(1024)
                if not chunk:
                    break
                data += chunk
            parts = data.split(b" ", 2)
            return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
        except (trio.BrokenResourceError, OSError):
            return False
        finally:
            await s.aclose()
    return False


def redact_url(url: str) -> str:
    """A registry URL fit for status and logs: an ACL token in it is hidden."""
    from urllib.parse import urlsplit, urlunsplit

    text = url or "embedded"
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(("token=***" if q.startswith("token=") else q) for q in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def http_get_json(address: str, path: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> Any:
    """GET http://ADDRESS/PATH as JSON, blocking (for CLI commands); None on any failure."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(f"http://{address}{path}", headers=headers or {}), timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def leaves(e: BaseException) -> Iterator[BaseException]:
    """Every exception in e, looking inside exception groups."""
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from leaves(sub)
    else:
        yield e


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
