"""A sidecar's certificates, fetched by a short-lived child process.

The key, the CSR, the proof of possession and the check of what Citadel
returned all need `cryptography`, which costs a sidecar about 12 MB of RSS for
the rest of its life; the TLS handshakes themselves do not need it
(citadel/leaf.py). So a sidecar does none of that in its own process:
``ChildCertificateSource.obtain`` (what ``proxy.tls.keep_renewed`` calls, at
start and at every renewal) starts

    python -m meshctl.citadel.fetch        (meshctl __citadel_fetch__ in the one-file binary)

writes one JSON request to its stdin, and reads one JSON answer from its
stdout: pipes only, the token and the keys never touch a named file, argv or
the environment. The child (``main``) runs citadel/client.py as the sidecar
did before:

- first certificate: a fresh P-256 key and CSR for the one-time bootstrap
  token (POST /v1/sign);
- renewal: the current chain and key come in the request; a fresh key and
  CSR, proven with the current key (POST /v1/renew);

then checks the chain Citadel sent as a peer would (citadel.identity.verify_peer:
chain to the bundle, validity, one SPIFFE ID, usages, key strength) and that
it is for the new key, and answers (chain, new key, bundle) or the error:
its class and reason travel back, so the sidecar raises the same
TokenReused / TokenExpired / PeerRejected / "cannot reach Citadel ..." it
raised when it did this itself. The token is spent only by a first
certificate that came back: until then it is kept for the next try, as
before (a network failure did not spend it on Citadel's side). A certificate
Citadel issued but the check refused comes back with the error: the sidecar
does not serve with it, and its next try renews with it, as before.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import Any, Awaitable, Callable

from . import errors
from .errors import CitadelError, TokenError

InThread = Callable[[Callable[[], Any]], Awaitable[Any]]  # a runtime's run_sync_in_thread

# the classes an answer may name (nothing else is instantiated from the child's words)
_CLASSES: dict[str, type[CitadelError]] = {
    cls.__name__: cls
    for cls in (errors.CitadelError, errors.CAError, errors.WeakKey, errors.CSRError, errors.PeerRejected,
                errors.TokenError, errors.TokenReused, errors.TokenExpired, errors.TokenUnknown, errors.TLSError)
}
START_GRACE = 20.0  # seconds for the child to start (imports) and answer, on top of the HTTP timeout


class ChildCertificateSource:
    """The sidecar's way to its certificates (``obtain`` fits ``proxy.tls.keep_renewed``):
    the bootstrap token first, then renewals with the current certificate and
    a fresh key each time; each exchange in a child process."""

    def __init__(self, citadel_url: str, token: str, *, timeout: float = 10.0,
                 in_thread: InThread | None = None) -> None:
        self.url = citadel_url
        self.in_thread = in_thread  # see _run_child
        self._token: str | None = token
        self._key: bytes | None = None
        self._chain: bytes | None = None
        self.timeout = timeout

    async def obtain(self) -> tuple[bytes, bytes, bytes]:
        """(chain PEM, key PEM, bundle PEM) for a new certificate, already
        checked as a peer would check it."""
        request: dict[str, Any] = {"url": self.url, "timeout": self.timeout}
        if self._chain is None or self._key is None:
            if self._token is None:
                raise TokenError("no bootstrap token left: the first certificate was never obtained")
            request["token"] = self._token
        else:
            request["chain"], request["key"] = self._chain.decode(), self._key.decode()
        answer = await _run_child(request, self.timeout + START_GRACE, self.in_thread)
        chain, key, bundle = (answer[k].encode() for k in ("chain", "key", "bundle"))
        self._token = None  # spent: Citadel issued a certificate
        self._key, self._chain = key, chain
        if "error" in answer:  # issued, but not one a peer would accept
            raise _error(answer)
        return chain, key, bundle


def fetch_argv() -> list[str]:
    """How to start the child: the same interpreter (or one-file binary) as this process,
    as meshctl/launch.py starts sidecars (that module is the supervisor's layer, above
    this one; meshctl/frozen.py dispatches ``__citadel_fetch__``)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "__citadel_fetch__"]
    return [sys.executable, "-m", "meshctl.citadel.fetch"]


async def _run_child(request: dict[str, Any], timeout: float, in_thread: InThread | None = None) -> dict[str, Any]:
    """The child's answer. ``in_thread``: a runtime's "run this blocking call in a worker thread"
    (the sidecar on evloop, which has no trio.run_process, passes its own); None: trio.run_process."""
    import subprocess

    argv = fetch_argv()
    slow = CitadelError(f"the certificate fetch process ({' '.join(argv)}) did not answer within {timeout:.0f}s",
                        "fetch-failed")
    stdin = json.dumps(request).encode()
    try:
        if in_thread is not None:
            try:
                done = await in_thread(partial(subprocess.run, argv, input=stdin, capture_output=True, check=False,
                                               timeout=timeout))
            except subprocess.TimeoutExpired:  # (subprocess.run killed the child)
                raise slow from None
        else:
            import trio

            try:
                with trio.fail_after(timeout):
                    done = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True,
                                                  check=False)
            except trio.TooSlowError:
                raise slow from None
    except OSError as exc:
        raise CitadelError(f"cannot start the certificate fetch process ({' '.join(argv)}): {exc}",
                           "fetch-failed") from None
    assert isinstance(done, subprocess.CompletedProcess)
    try:
        answer = json.loads(done.stdout)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise CitadelError(f"the certificate fetch process ({' '.join(argv)}) failed (exit {done.returncode}): "
                           f"{' / '.join(tail) or 'no output'}", "fetch-failed") from None
    if not all(isinstance(answer.get(k), str) for k in ("chain", "key", "bundle")):
        if "error" in answer:
            raise _error(answer)
        raise CitadelError("the certificate fetch process answered without a certificate", "fetch-failed")
    return answer


def _error(answer: dict[str, Any]) -> CitadelError:
    cls = _CLASSES.get(str(answer.get("class")), CitadelError)
    return cls(str(answer["error"]), str(answer.get("reason") or cls.reason))


# ---------------------------------------------------------------- the child


async def _exchange(request: dict[str, Any]) -> dict[str, str]:
    from datetime import datetime, timezone

    from .ca import generate_key, key_to_pem, load_key
    from .client import renew_certificate, request_certificate
    from .identity import load_certificates, verify_peer

    url, timeout = str(request["url"]), float(request.get("timeout", 10.0))
    new_key = generate_key()
    if "token" in request:
        chain, bundle = await request_certificate(url, str(request["token"]), new_key, timeout=timeout)
    else:
        key = load_key(str(request["key"]), "the current private key")
        chain, bundle = await renew_certificate(url, str(request["chain"]), key, new_key, timeout=timeout)
    got = {"chain": chain.decode(), "key": key_to_pem(new_key).decode(), "bundle": bundle.decode()}
    # what CertificateHolder.update(verify=True) checked in the sidecar before; Citadel has
    # issued the certificate by now (the token is spent), so a refusal here still hands it
    # back: the next try renews with it, as the sidecar did when it ran this itself
    try:
        verify_peer(chain, bundle, None, datetime.now(timezone.utc))
        if load_certificates(chain)[0].public_key() != new_key.public_key():
            raise errors.PeerRejected("Citadel's certificate is not for the key this sidecar sent", "bad-certificate")
    except errors.PeerRejected as exc:
        return {**got, "error": f"refusing to use our own certificate: {exc}", "reason": exc.reason,
                "class": "TLSError"}
    return got


def main() -> int:
    """The child: one JSON request on stdin, one JSON answer on stdout."""
    import trio

    try:
        request = json.loads(sys.stdin.buffer.read())
        if not isinstance(request, dict) or "url" not in request:
            raise ValueError("expected a JSON object with url")
        answer: dict[str, Any] = trio.run(_exchange, request)
    except CitadelError as exc:
        answer = {"error": str(exc), "reason": exc.reason, "class": type(exc).__name__}
    except (ValueError, KeyError) as exc:
        answer = {"error": f"bad request to the certificate fetch process: {exc}", "reason": "fetch-failed"}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
