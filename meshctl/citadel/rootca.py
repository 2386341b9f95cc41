"""The root holder of a multi-host mesh: a directory with the root (or the
user's own CA) that no host has, and the commands that use it against Consul KV.

- ``init_root``: ``citadel init --root-dir DIR``; the same files as a state's
  ca/ (Istio's cacerts names), ``root_dir`` in ca.json.
- ``hosts``: the hosts that published a CSR, and whether each is approved.
- ``approve``: sign the named hosts' CSRs into intermediates and publish them
  with the root bundle (the bundle first, so a host never sees an
  intermediate of a root it has not been told to trust).
- ``start_rotation`` / ``rotation_waits`` / ``finish_rotation``: a new root
  joins the bundle with a cross-certificate from the old one, every approved
  host's key is certified again under the new root, and the old root leaves
  the bundle once every host reported that nothing of the old one is alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from .ca import CA, certs_to_pem
from .errors import CAError
from .identity import as_datetime, as_timedelta
from .kv import KV, kv_prefix
from .multihost import (
    DEFAULT_INTERMEDIATE_TTL,
    Bundle,
    HostReport,
    check_can_sign_intermediates,
    fingerprint,
    intermediate_doc,
    key_id,
    read_intermediate_doc,
    rotation_waits as _waits,
    sign_host_intermediate,
    spki,
)
from .store import DEFAULT_OVERLAP, _read_meta, _write, _write_meta, init_ca_in, load_ca_in, rotate_root_in


def init_root(root_dir: str | Path, trust_domain: str | None, cert: bytes | None = None, key: bytes | None = None,
              chain: bytes | None = None, *, root: bytes | None = None, mesh: str | None = None,
              now: datetime | float) -> CA:
    d = Path(root_dir)
    if cert is not None and key is not None:
        from .ca import load_ca

        check_can_sign_intermediates(load_ca(cert, key, chain, trust_domain=trust_domain, root_pem=root))
    ca = init_ca_in(d, trust_domain, cert, key, chain, now=now, root=root,
                    extra_meta={"root_dir": True, "mesh": mesh or trust_domain or None})
    meta = _read_meta(d)
    if not meta.get("mesh"):
        meta["mesh"] = ca.trust_domain
        _write_meta(d, meta)
    return ca


def load_root(root_dir: str | Path) -> tuple[CA, dict[str, Any]]:
    d = Path(root_dir)
    meta = _read_meta(d)
    if not meta.get("root_dir"):
        if meta.get("host"):
            raise CAError(f"{d} is a host's CA directory, not a root holder's (made by `citadel init --root-dir`)")
        raise CAError(f"{d} holds no root of a multi-host mesh: run `meshctl citadel init --root-dir {d}` first")
    return load_ca_in(d), meta


def prefix_of(meta: dict[str, Any], mesh: str | None) -> str:
    return kv_prefix(mesh or meta.get("mesh") or meta["trust_domain"])


@dataclass(frozen=True)
class HostRow:
    host: str
    state: str  # "pending" | "approved" | "new key" (CSR key differs from its intermediate's)
    key_id: str
    intermediate: x509.Certificate | None
    report: HostReport | None


def hosts(kv: KV, prefix: str) -> list[HostRow]:
    _, entries = kv.list(prefix)
    rows: list[HostRow] = []
    for key, entry in sorted(entries.items()):
        if not key.startswith(f"{prefix}csr/"):
            continue
        name = key[len(f"{prefix}csr/"):]
        try:
            csr = x509.load_pem_x509_csr(entry.value)
        except ValueError:
            rows.append(HostRow(name, "unreadable CSR", "-", None, None))
            continue
        inter = entries.get(f"{prefix}intermediate/{name}")
        cert = read_intermediate_doc(inter.value)[0] if inter is not None else None
        rep_entry = entries.get(f"{prefix}hosts/{name}")
        rep = HostReport.from_json(rep_entry.value) if rep_entry is not None else None
        if cert is None:
            state = "pending"
        elif spki(cert.public_key()) == spki(csr.public_key()):
            state = "approved"
        else:
            state = "new key"
        rows.append(HostRow(name, state, key_id(csr.public_key()), cert, rep))
    return rows


def bundle_of(d: Path, ca: CA, meta: dict[str, Any], now: datetime) -> Bundle:
    """The current root, the old roots still in their overlap and their cross-certificates."""
    from .store import _bundle, rotation_chain_in

    roots = tuple(x509.load_pem_x509_certificates(_bundle(d, ca, meta, now)))
    cross_pem = rotation_chain_in(d, now)
    cross = tuple(x509.load_pem_x509_certificates(cross_pem)) if cross_pem else ()
    return Bundle(roots, cross, int(meta.get("generation", 0)))


def publish_bundle(d: Path, kv: KV, prefix: str, now: datetime) -> Bundle:
    ca, meta = load_root(d)
    meta["generation"] = int(meta.get("generation", 0)) + 1
    _write_meta(d, meta)
    bundle = bundle_of(d, ca, meta, now)
    kv.put(f"{prefix}bundle", bundle.to_json())
    return bundle


def _issue(d: Path, ca: CA, kv: KV, prefix: str, host: str, csr_pem: bytes, now: datetime,
           ttl: timedelta) -> x509.Certificate:
    cert = sign_host_intermediate(ca, csr_pem, host, now, lifetime=ttl)
    kv.put(f"{prefix}intermediate/{host}", intermediate_doc((cert, *ca.chain) if ca.chain else (cert, ca.cert), now))
    _write(d / "issued-hosts.pem", _read(d / "issued-hosts.pem") + certs_to_pem([cert]))
    return cert


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return b""


def approve(root_dir: str | Path, kv: KV, names: list[str] | None, *, mesh: str | None = None,
            now: datetime | float, ttl: timedelta | float = DEFAULT_INTERMEDIATE_TTL) -> list[tuple[str, x509.Certificate]]:
    """Sign the CSRs of ``names`` (None: every pending host; a host whose key changed
    since it was approved is signed only when named) and publish them with the bundle."""
    d = Path(root_dir)
    ca, meta = load_root(d)
    prefix = prefix_of(meta, mesh)
    when = as_datetime(now)
    rows = {r.host: r for r in hosts(kv, prefix)}
    if names is None:
        names = [h for h, r in rows.items() if r.state == "pending"]
    for n in names:
        if n not in rows:
            known = ", ".join(sorted(rows)) or "none"
            raise CAError(f"no CSR from host {n} under {prefix}csr/ (hosts that asked: {known}); "
                          f"run `meshctl citadel join --host {n}` on it first")
    publish_bundle(d, kv, prefix, when)
    out = []
    for n in names:
        entry = kv.get(f"{prefix}csr/{n}")
        assert entry is not None
        out.append((n, _issue(d, ca, kv, prefix, n, entry.value, when, as_timedelta(ttl))))
    return out


def start_rotation(root_dir: str | Path, kv: KV, *, mesh: str | None = None, now: datetime | float,
                   overlap: timedelta | float = DEFAULT_OVERLAP,
                   ttl: timedelta | float = DEFAULT_INTERMEDIATE_TTL) -> CA:
    """A new root (cross-signed by the old), in the bundle beside the old one; every
    approved host's key certified again under it. Refuses while a rotation runs."""
    d = Path(root_dir)
    _, meta = load_root(d)
    if meta.get("rotation"):
        raise CAError("a root rotation is already under way: `meshctl citadel rotate-root --root-dir ... ` "
                      "again continues it")
    prefix = prefix_of(meta, mesh)
    when = as_datetime(now)
    approved = [r for r in hosts(kv, prefix) if r.intermediate is not None]
    changed = [r.host for r in approved if r.state != "approved"]
    if changed:
        raise CAError(
            f"host(s) {', '.join(changed)} published a CSR with another key than their intermediate's: "
            "approve them by name first (`meshctl citadel approve ... HOST`), or remove them"
        )
    new = rotate_root_in(d, when, overlap)
    meta = _read_meta(d)
    meta["rotation"] = {"started": when.isoformat(), "root": fingerprint(new.root), "hosts": {}}
    _write_meta(d, meta)
    publish_bundle(d, kv, prefix, when)  # both roots + the cross-certificate, before any new intermediate
    issued: dict[str, str] = {}
    for r in approved:
        entry = kv.get(f"{prefix}csr/{r.host}")
        assert entry is not None
        cert = _issue(d, new, kv, prefix, r.host, entry.value, when, as_timedelta(ttl))
        issued[r.host] = f"{cert.serial_number:x}"
    meta = _read_meta(d)
    meta["rotation"]["hosts"] = issued
    _write_meta(d, meta)
    return new


def remove_host(root_dir: str | Path, kv: KV, name: str, *, mesh: str | None = None) -> None:
    """Forget a host: its CSR, intermediate and report leave KV, so it gets no new
    intermediate and a rotation no longer waits for it. Its current intermediate stays
    valid under the current root (there is no revocation list): `rotate-root` afterwards
    ends the trust in it, as the old root leaves every bundle."""
    d = Path(root_dir)
    _, meta = load_root(d)
    prefix = prefix_of(meta, mesh)
    if kv.get(f"{prefix}csr/{name}") is None and kv.get(f"{prefix}intermediate/{name}") is None:
        raise CAError(f"no host {name} under {prefix}")
    for what in ("intermediate", "csr", "hosts"):
        kv.delete(f"{prefix}{what}/{name}")
    rot = meta.get("rotation")
    if rot and name in rot.get("hosts", {}):
        del rot["hosts"][name]
        _write_meta(d, meta)


def rotation_state(root_dir: str | Path, kv: KV, *, mesh: str | None = None,
                   now: datetime | float) -> tuple[dict[str, Any] | None, list[str]]:
    """(the rotation under way or None, what its end still waits for)."""
    d = Path(root_dir)
    _, meta = load_root(d)
    rot = meta.get("rotation")
    if not rot:
        return None, []
    prefix = prefix_of(meta, mesh)
    _, entries = kv.list(prefix + "hosts/")
    reports = {k[len(prefix + "hosts/"):]: HostReport.from_json(e.value) for k, e in entries.items()}
    return rot, _waits(rot["hosts"], reports, rot["root"], now)


def finish_rotation(root_dir: str | Path, kv: KV, *, mesh: str | None = None, now: datetime | float) -> Bundle:
    """The old root leaves the bundle (and the cross-certificate with it)."""
    d = Path(root_dir)
    _, meta = load_root(d)
    when = as_datetime(now)
    for entry in meta.get("old_roots", []):
        entry["retire_after"] = min(entry["retire_after"], (when - timedelta(seconds=1)).isoformat())
    meta.pop("rotation", None)
    _write_meta(d, meta)
    ca = load_ca_in(d)
    from .store import _bundle

    _write(d / "trust-bundle.pem", _bundle(d, ca, meta, when))
    return publish_bundle(d, kv, prefix_of(meta, mesh), when)
