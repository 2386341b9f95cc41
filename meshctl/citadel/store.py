"""Citadel's files in the state directory; the only citadel module that does file I/O.

Layout (file names follow Istio's "plug in CA certificates" convention):

    <state_dir>/ca/               0700
      ca-cert.pem                 the signing CA (the root itself, or the user's intermediate)
      ca-key.pem                  its private key, 0600, never logged
      cert-chain.pem              ca-cert.pem followed by its issuers up to the root
      root-cert.pem               the current root of trust
      trust-bundle.pem            root-cert.pem + old roots still inside their overlap window
      old-roots/<serial>.pem      roots replaced by rotate_root
      ca.json                     trust domain, whether the CA was plugged in, old roots' retirement times
      tokens.json                 bootstrap token hashes (tokens.py), 0600
      issued.jsonl                one line per certificate issued (for `citadel status`)

A host of a multi-host mesh (``citadel join``, hostca.py) keeps the same
files, with ca-key.pem its own intermediate key, ca-cert.pem / cert-chain.pem
its intermediate from the root holder and trust-bundle.pem / cross.pem the
root bundle, all three copied from Consul KV; ca.json then has a ``host``
entry. A root holder's directory (``citadel init --root-dir``) has the same
layout at its top, with ``root_dir`` set in ca.json.

Every write goes to a temporary file and is renamed into place; keys are
created 0600 from the start. Read-modify-write of tokens.json holds an
exclusive flock so the server and `meshctl citadel token` can share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from cryptography import x509

from .ca import DEFAULT_TRUST_DOMAIN, CA, cert_to_pem, certs_to_pem, create_root, cross_sign, key_to_pem, load_ca
from .errors import CAError
from .identity import as_datetime, as_timedelta
from .tokens import TokenStore

CA_DIR = "ca"
DEFAULT_OVERLAP = timedelta(hours=48)  # > the 24 h leaf lifetime: every leaf of the old root outlives nothing


def ca_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / CA_DIR


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.chmod(tmp, mode)
    tmp.replace(path)


def _read_meta(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "ca.json").read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise CAError(f"{d / 'ca.json'} is corrupt: {exc}") from None


def _write_meta(d: Path, meta: dict[str, Any]) -> None:
    _write(d / "ca.json", (json.dumps(meta, indent=1) + "\n").encode())


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def has_ca(state_dir: str | Path) -> bool:
    return (ca_dir(state_dir) / "ca-key.pem").exists()


def _save_ca(d: Path, ca: CA, meta: dict[str, Any], now: datetime) -> None:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    _write(d / "ca-key.pem", key_to_pem(ca.key), 0o600)
    _write(d / "ca-cert.pem", cert_to_pem(ca.cert))
    _write(d / "cert-chain.pem", ca.cert_chain_pem)
    _write(d / "root-cert.pem", ca.root_pem)
    meta["trust_domain"] = ca.trust_domain
    _write_meta(d, meta)
    _write(d / "trust-bundle.pem", _bundle(d, ca, meta, now))


def init_ca(
    state_dir: str | Path,
    trust_domain: str | None = None,
    cert: bytes | str | None = None,
    key: bytes | str | None = None,
    chain: bytes | str | None = None,
    *,
    now: datetime | float | None = None,
    root: bytes | str | None = None,
) -> CA:
    """Create the CA: a new self-signed root, or the user's root/intermediate
    (``cert`` + ``key`` PEM, ``chain`` up to the root for an intermediate).
    ``trust_domain`` defaults to the plugged CA's own (its SPIFFE URI SAN or
    organisation) or ``cluster.local``. Refuses to overwrite an existing CA."""
    return init_ca_in(ca_dir(state_dir), trust_domain, cert, key, chain, now=now, root=root)


def init_ca_in(
    d: Path,
    trust_domain: str | None = None,
    cert: bytes | str | None = None,
    key: bytes | str | None = None,
    chain: bytes | str | None = None,
    *,
    now: datetime | float | None = None,
    root: bytes | str | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> CA:
    """``init_ca`` in the CA directory ``d`` itself (a state's ca/, or a root holder's directory)."""
    now = _utcnow() if now is None else now
    if (d / "ca-key.pem").exists():
        raise CAError(
            f"a CA already exists in {d}; use `meshctl citadel rotate-root` to replace the root, "
            "or remove the directory to start over (every workload certificate becomes untrusted)"
        )
    when = as_datetime(now)
    if (cert is None) != (key is None):
        raise CAError("give both --cert and --key to plug in your own CA, or neither to create a root")
    if cert is not None and key is not None:
        ca = load_ca(cert, key, chain, trust_domain=trust_domain, root_pem=root)
        plugged = True
    else:
        ca = create_root(trust_domain or DEFAULT_TRUST_DOMAIN, when)
        plugged = False
    _save_ca(d, ca, {"plugged": plugged, "created": when.isoformat(), "old_roots": [], **(extra_meta or {})}, when)
    return ca


def ensure_ca(state_dir: str | Path, trust_domain: str | None = None, *, now: datetime | float | None = None) -> CA:
    """Load the CA, creating a root first if there is none (what `meshctl up` wants)."""
    if has_ca(state_dir):
        return load_ca_from(state_dir)
    return init_ca(state_dir, trust_domain, now=now)


def load_ca_from(state_dir: str | Path) -> CA:
    return load_ca_in(ca_dir(state_dir))


def host_of(state_dir: str | Path) -> dict[str, Any] | None:
    """The ``host`` entry of a joined host (name, registry, mesh), else None."""
    return _read_meta(ca_dir(state_dir)).get("host")


def waiting_message(host: dict[str, Any], *, seen_in_kv: bool = True) -> str:
    """What a joined host without its intermediate waits for (``seen_in_kv``: Consul was
    just asked and has none; else only this state directory has none yet)."""
    approve = f"`meshctl citadel approve --root-dir DIR --registry {host['registry']} {host['name']}`"
    where = f"its CSR is published in Consul KV at {host['prefix']}csr/{host['name']}"
    if seen_in_kv:
        return f"host {host['name']} waits for its intermediate CA: {where}; on the root holder run {approve}"
    return (f"host {host['name']} has no intermediate CA yet: {where}; once the root holder approved it with "
            f"{approve}, this host takes it from Consul KV (a running Citadel at once, else at `meshctl up` "
            "or `meshctl citadel join`)")


def load_ca_in(d: Path) -> CA:
    try:
        cert = (d / "ca-cert.pem").read_bytes()
        key = (d / "ca-key.pem").read_bytes()
    except FileNotFoundError:
        host = _read_meta(d).get("host")
        if host and (d / "ca-key.pem").exists():
            raise CAError(waiting_message(host, seen_in_kv=False)) from None
        raise CAError(f"no CA in {d}: run `meshctl citadel init` (or `meshctl up`) first") from None
    chain = (d / "cert-chain.pem").read_bytes() if (d / "cert-chain.pem").exists() else None
    meta = _read_meta(d)
    return load_ca(cert, key, chain, trust_domain=meta.get("trust_domain"))


def _bundle(d: Path, ca: CA, meta: dict[str, Any], now: datetime) -> bytes:
    certs = [ca.root]
    for entry in meta.get("old_roots", []):
        if datetime.fromisoformat(entry["retire_after"]) > now:
            try:
                old = x509.load_pem_x509_certificate((d / entry["file"]).read_bytes())
            except (FileNotFoundError, ValueError):
                continue
            if old not in certs:
                certs.append(old)
    return certs_to_pem(certs)


def trust_bundle_pem(state_dir: str | Path, now: datetime | float) -> bytes:
    """The roots a workload must trust now: current root + old roots in their overlap
    (on a joined host: the bundle copied from KV)."""
    d = ca_dir(state_dir)
    meta = _read_meta(d)
    if meta.get("host"):
        return (d / "trust-bundle.pem").read_bytes()
    return _bundle(d, load_ca_from(state_dir), meta, as_datetime(now))


def rotate_root(
    state_dir: str | Path, now: datetime | float, overlap: timedelta | float = DEFAULT_OVERLAP
) -> CA:
    """Replace a generated root with a new one, without breaking connections:

    - the old root stays in the trust bundle for ``overlap``, so certificates
      it signed keep working until their workloads renew;
    - the old root cross-signs the new one, and Citadel sends that
      cross-certificate after each new workload certificate during the
      overlap, so peers still holding only the old bundle accept them.

    A plugged-in CA is the user's to rotate: refused with a message saying what to do."""
    return rotate_root_in(ca_dir(state_dir), now, overlap)


def rotate_root_in(d: Path, now: datetime | float, overlap: timedelta | float = DEFAULT_OVERLAP) -> CA:
    when = as_datetime(now)
    meta = _read_meta(d)
    if meta.get("host"):
        raise CAError(
            f"this host's CA is an intermediate of the mesh's shared root (host {meta['host']['name']}): "
            "rotate the root on the root holder with `meshctl citadel rotate-root --root-dir DIR --registry ...`"
        )
    old = load_ca_in(d)
    if meta.get("plugged"):
        raise CAError(
            "this mesh uses a plugged-in CA (citadel init --cert/--key): rotate it in your own PKI, "
            f"then replace the files in {d}"
        )
    (d / "old-roots").mkdir(exist_ok=True)
    retire = when + as_timedelta(overlap)
    new = create_root(old.trust_domain, when)
    rel = f"old-roots/{old.root.serial_number:x}.pem"
    cross_rel = f"old-roots/{new.root.serial_number:x}-by-{old.root.serial_number:x}.pem"
    _write(d / rel, old.root_pem)
    _write(d / cross_rel, cert_to_pem(cross_sign(old, new, when, retire)))
    kept = [e for e in meta.get("old_roots", []) if datetime.fromisoformat(e["retire_after"]) > when]
    kept.append({"file": rel, "cross": cross_rel, "retire_after": retire.isoformat(), "rotated": when.isoformat()})
    meta["old_roots"] = kept
    _save_ca(d, new, meta, when)
    return new


def rotation_chain_pem(state_dir: str | Path, now: datetime | float) -> bytes:
    """Cross-certificates to send after a workload certificate while old roots
    are inside their overlap (newest first), so peers that still trust only
    an old root accept certificates of the new one. Empty outside rotations."""
    d = ca_dir(state_dir)
    meta = _read_meta(d)
    if meta.get("host"):
        try:
            return (d / "cross.pem").read_bytes()
        except FileNotFoundError:
            return b""
    return rotation_chain_in(d, now)


def rotation_chain_in(d: Path, now: datetime | float) -> bytes:
    when = as_datetime(now)
    out = b""
    for entry in reversed(_read_meta(d).get("old_roots", [])):
        if entry.get("cross") and datetime.fromisoformat(entry["retire_after"]) > when:
            try:
                out += (d / entry["cross"]).read_bytes()
            except FileNotFoundError:
                continue
    return out


def ca_info(state_dir: str | Path, now: datetime | float) -> dict[str, Any]:
    """What `citadel status` shows about the CA (no key material)."""
    d = ca_dir(state_dir)
    ca = load_ca_from(state_dir)
    meta = _read_meta(d)
    when = as_datetime(now)
    return {
        "trust_domain": ca.trust_domain,
        "plugged": bool(meta.get("plugged")),
        "ca_subject": ca.cert.subject.rfc4514_string(),
        "ca_not_after": ca.cert.not_valid_after_utc.isoformat(),
        "root_subject": ca.root.subject.rfc4514_string(),
        # the signing CA up to the root: what every workload certificate chains to
        "chain": [
            {"subject": c.subject.rfc4514_string(), "not_after": c.not_valid_after_utc.isoformat(),
             "root": c is ca.root}
            for c in (ca.cert, *ca.chain)
        ],
        "old_roots": [e for e in meta.get("old_roots", []) if datetime.fromisoformat(e["retire_after"]) > when],
        "host": meta.get("host"),  # a joined host of a multi-host mesh (hostca.py), else None
    }


# ---------------------------------------------------------------- issued certificates


def record_issued(state_dir: str | Path, spiffe_id: str, cert: x509.Certificate, how: str,
                  issuer: x509.Certificate | None = None) -> None:
    line = {
        "spiffe_id": spiffe_id,
        "serial": f"{cert.serial_number:x}",
        "issuer": f"{issuer.serial_number:x}" if issuer is not None else "",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "how": how,  # "token" | "renewal"
    }
    d = ca_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "issued.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def read_issued(state_dir: str | Path) -> list[dict[str, Any]]:
    try:
        text = (ca_dir(state_dir) / "issued.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def latest_by_identity(state_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The most recent certificate issued to each SPIFFE ID."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_issued(state_dir):
        cur = latest.get(rec["spiffe_id"])
        if cur is None or rec["not_before"] >= cur["not_before"]:
            latest[rec["spiffe_id"]] = rec
    return latest


# ---------------------------------------------------------------- tokens


class TokenFile:
    """TokenStore persisted in tokens.json; each call is lock → load → change → save."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = ca_dir(state_dir) / "tokens.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[TokenStore]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(".tokens.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                data = {}
            except json.JSONDecodeError as exc:
                raise CAError(f"{self.path} is corrupt: {exc}") from None
            store = TokenStore.from_json(data)
            before = json.dumps(store.to_json(), sort_keys=True)
            yield store
            after = store.to_json()
            if json.dumps(after, sort_keys=True) != before:
                _write(self.path, (json.dumps(after, indent=1) + "\n").encode(), 0o600)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def issue_token(self, workload_identity: str, ttl: timedelta | float | None, now: datetime | float) -> str:
        with self._locked() as store:
            store.prune(now)
            return store.issue_token(workload_identity, ttl, now)

    def redeem(self, token: str, now: datetime | float) -> str:
        with self._locked() as store:
            return store.redeem(token, now)

    def outstanding(self, now: datetime | float):
        with self._locked() as store:
            return store.outstanding(now)
