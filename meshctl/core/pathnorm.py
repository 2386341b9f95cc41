"""Request path normalization, as Istio's mesh ``pathNormalization`` option.

One normalized view of the path is used for routing, for AuthorizationPolicy
and for the request forwarded upstream (Istio: "the normalized request will be
used for both the evaluation of authorization policies and the request that is
ultimately sent to the backend server"). Only the path is touched; the query
string is kept byte for byte.

Rules, in the order they apply (Istio's documented algorithm):

    option                    steps
    NONE                      nothing (the path is used as received)
    BASE (default)            1. %00 anywhere in the path: refused (400)
                              2. percent-encoded unreserved characters decoded
                                 once (ALPHA DIGIT - . _ ~, RFC 3986 §2.3;
                                 %2e is a dot, so %2e%2e is a dot segment)
                              3. backslashes become forward slashes
                              4. dot segments removed (RFC 3986 §5.2.4)
                              %2F and %5C are kept encoded
    MERGE_SLASHES             BASE, then runs of slashes merged into one
    DECODE_AND_MERGE_SLASHES  %2F/%2f and %5C/%5c decoded first (to / and \\),
                              then MERGE_SLASHES

Decoding happens once: ``%252e`` becomes ``%2e``, never ``.``. Other
percent-encodings (``%20``, ``%3F``, non-ASCII bytes) are left as they are.
"""

from __future__ import annotations

__all__ = ["MODES", "PathRejected", "normalize_path"]

MODES = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


class PathRejected(ValueError):
    """A path that cannot be normalized safely: the proxy answers 400."""


def _decode(path: str, slashes: bool) -> str:
    """Decode %XX for unreserved characters (and / \\ when ``slashes``), once."""
    if "%" not in path:
        return path
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            b = int(path[i + 1 : i + 3], 16)
            if b == 0:
                raise PathRejected("percent-encoded NUL (%00) in the path")
            if b in _UNRESERVED or (slashes and b in (0x2F, 0x5C)):
                out.append(chr(b))
                i += 3
                continue
            out.append(path[i : i + 3])
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path ("/.." above the root stays at the root)."""
    if "." not in path:
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == "." or seg == "..":
            if seg == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/b/.." is "/a/", as in the RFC's examples
            continue
        out.append(seg)
    return "/" + "/".join(out)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def normalize_path(target: str, mode: str = "BASE") -> str:
    """``target`` (origin-form path with optional ?query) normalized per ``mode``.

    Raises PathRejected for what the proxy must refuse (%00). A target that
    does not start with "/" (``*``, or empty for CONNECT) is returned as is."""
    if mode == "NONE" or not target.startswith("/"):
        return target
    if "%" not in target and "\\" not in target and "/." not in target and (mode == "BASE" or "//" not in target):
        return target  # the common case: nothing to do (a "?" only makes this conservative)
    path, sep, query = target.partition("?")
    if "%00" in path:
        raise PathRejected("percent-encoded NUL (%00) in the path")
    decode_slashes = mode == "DECODE_AND_MERGE_SLASHES"
    if "%" in path:
        path = _decode(path, decode_slashes)
    if "\\" in path:
        path = path.replace("\\", "/")
    path = _remove_dot_segments(path)
    if mode != "BASE":
        path = _merge_slashes(path)
    return path + sep + query if sep else path
