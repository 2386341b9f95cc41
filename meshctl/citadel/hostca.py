"""A host of a multi-host mesh: its intermediate key, its CSR in Consul KV, and
the certificates the root holder publishes back (rules in multihost.py).

- ``join``: makes the host's intermediate key (0600, in the state directory's
  ca/, never leaves it), publishes a CSR naming the host under
  ``meshctl/<meshId>/ca/csr/<host>``, and records the host in ca.json.
- ``sync``: reads the root bundle and the host's intermediate from KV, keeps
  what the rules allow, and writes them as the CA files Citadel signs with
  (trust-bundle.pem first, then cert-chain.pem, then ca-cert.pem: Citadel
  reloads its CA when ca-cert.pem changes). Then it publishes the host's
  report (hosts/<host>): the intermediate it signs with, the roots it trusts,
  and until when certificates from an older intermediate live, which is
  what ends a root rotation.
- ``follow``: ``sync`` after every change under the prefix (Consul blocking
  queries), for `citadel serve` on a joined host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from .ca import DEFAULT_TRUST_DOMAIN, cert_to_pem, certs_to_pem, generate_key, key_to_pem, load_key
from .errors import CAError
from .identity import as_datetime
from .kv import KV, kv_prefix
from .multihost import (
    Bundle,
    HostReport,
    accept_bundle,
    check_host_name,
    check_intermediate,
    fingerprint,
    key_id,
    make_host_csr,
    read_intermediate_doc,
    spki,
)
from .store import _read_meta, _write, _write_meta, ca_dir, read_issued, waiting_message

log = logging.getLogger("meshctl.citadel.host")


@dataclass(frozen=True)
class SyncResult:
    ready: bool  # the host has an intermediate and signs with it
    changed: bool  # files were rewritten
    message: str  # what it waits for, or what it signs with
    refused: tuple[str, ...] = ()


def join(
    state_dir: str | Path,
    kv: KV,
    host: str,
    *,
    mesh: str | None = None,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_pin: bytes | None = None,
    now: datetime | float,
) -> dict[str, Any]:
    """Make (or keep) the host's intermediate key and publish its CSR; returns the host entry."""
    check_host_name(host)
    d = ca_dir(state_dir)
    meta = _read_meta(d)
    if (d / "ca-key.pem").exists() and not meta.get("host"):
        raise CAError(
            f"{d} holds a CA of its own (a root or a plugged-in CA): a host joins a shared root with a state "
            "directory without one (remove ca/ to start over, or use another --state-dir)"
        )
    old = meta.get("host")
    if old and (old["name"] != host or old["mesh"] != (mesh or old["mesh"])):
        raise CAError(f"this state directory already joined mesh {old['mesh']} as host {old['name']}")
    mesh = mesh or (old["mesh"] if old else trust_domain)
    prefix = kv_prefix(mesh)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    if (d / "ca-key.pem").exists():
        key = load_key((d / "ca-key.pem").read_bytes(), "host intermediate key")
    else:
        key = generate_key()
        _write(d / "ca-key.pem", key_to_pem(key), 0o600)
    csr = make_host_csr(key, host, trust_domain)
    existing = kv.get(f"{prefix}csr/{host}")
    if existing is not None:
        try:
            other = x509.load_pem_x509_csr(existing.value)
        except ValueError:
            other = None
        if other is not None and spki(other.public_key()) != spki(key.public_key()):
            raise CAError(
                f"host name {host} is taken in mesh {mesh}: {prefix}csr/{host} holds another key. Pick another "
                f"--host, or, if the host it belonged to is gone, have the root holder forget it "
                f"(`meshctl citadel remove-host {host} --root-dir DIR --registry ...`)"
            )
    _write(d / "intermediate.csr", csr)
    if root_pin is not None and not (d / "trust-bundle.pem").exists():
        roots = x509.load_pem_x509_certificates(root_pin)
        _write(d / "trust-bundle.pem", certs_to_pem(roots))
    entry = {"name": host, "mesh": mesh, "registry": kv.url, "prefix": prefix,
             "key_id": key_id(key.public_key()), "joined": as_datetime(now).isoformat()}
    meta.update({"host": entry, "trust_domain": trust_domain, "plugged": False})
    meta.setdefault("old_roots", [])
    _write_meta(d, meta)
    if existing is None or existing.value != csr:
        kv.put(f"{prefix}csr/{host}", csr)
    return entry


def _trusted_now(d: Path) -> list[x509.Certificate]:
    try:
        return list(x509.load_pem_x509_certificates((d / "trust-bundle.pem").read_bytes()))
    except (FileNotFoundError, ValueError):
        return []


def sync(state_dir: str | Path, kv: KV, now: datetime | float, *, leaf_ttl: timedelta | None = None,
         report: bool = True) -> SyncResult:
    """One pass: KV → the CA files of this host (see the module docstring)."""
    d = ca_dir(state_dir)
    meta = _read_meta(d)
    host = meta.get("host")
    if not host:
        raise CAError(f"{d} is not a joined host: run `meshctl citadel join` first")
    when = as_datetime(now)
    _, entries = kv.list(host["prefix"])
    return apply_entries(d, meta, entries, when, kv=kv if report else None, leaf_ttl=leaf_ttl)


def apply_entries(d: Path, meta: dict[str, Any], entries: dict, when: datetime, *, kv: KV | None,
                  leaf_ttl: timedelta | None) -> SyncResult:
    host = meta["host"]
    prefix, name = host["prefix"], host["name"]
    td = meta.get("trust_domain") or DEFAULT_TRUST_DOMAIN
    key = load_key((d / "ca-key.pem").read_bytes(), "host intermediate key")
    bundle_entry = entries.get(f"{prefix}bundle")
    inter_entry = entries.get(f"{prefix}intermediate/{name}")
    if bundle_entry is None or inter_entry is None:
        return SyncResult(False, False, waiting_message(host))
    trusted = _trusted_now(d)
    accepted = accept_bundle(trusted, Bundle.from_json(bundle_entry.value), when)
    for why in accepted.refused:
        log.warning("root bundle in KV: %s", why)
    if not accepted.roots:
        return SyncResult((d / "ca-cert.pem").exists(), False,
                          "the root bundle in KV has no root this host trusts; keeping the current one", accepted.refused)
    chain = read_intermediate_doc(inter_entry.value)
    try:
        ca = check_intermediate(key, chain, accepted.roots, td, when)
    except CAError as exc:
        if chain and spki(chain[0].public_key()) != spki(key.public_key()):
            return SyncResult(False, False, f"{exc}; {waiting_message(host)}")
        raise
    changed = False
    bundle_pem = certs_to_pem(accepted.roots)
    cross_pem = certs_to_pem(accepted.cross)
    current = (d / "ca-cert.pem").read_bytes() if (d / "ca-cert.pem").exists() else b""
    if _read(d / "trust-bundle.pem") != bundle_pem:
        _write(d / "trust-bundle.pem", bundle_pem)
        changed = True
    if _read(d / "cross.pem") != cross_pem:
        _write(d / "cross.pem", cross_pem)
        changed = True
    if current != cert_to_pem(ca.cert):
        _write(d / "cert-chain.pem", ca.cert_chain_pem)
        _write(d / "root-cert.pem", ca.root_pem)
        meta = _read_meta(d)
        meta["since"] = when.isoformat()
        _write_meta(d, meta)
        _write(d / "ca-cert.pem", cert_to_pem(ca.cert))  # last: Citadel reloads on its change
        changed = True
    meta = _read_meta(d)
    if kv is not None:
        rep = host_report(d, ca.cert, accepted.roots, meta.get("since") or when.isoformat(), when, leaf_ttl)
        seen = entries.get(f"{prefix}hosts/{name}")
        # only when it says something new: each write wakes every host's watch
        if seen is None or _same_report(seen.value, rep) is False:
            kv.put(f"{prefix}hosts/{name}", rep.to_json())
    return SyncResult(True, changed, f"host {name} signs with intermediate {ca.cert.serial_number:x} under "
                      f"{ca.root.subject.rfc4514_string()}", accepted.refused)


def _same_report(raw: bytes, rep: HostReport) -> bool:
    try:
        old = HostReport.from_json(raw)
    except CAError:
        return False
    return (old.intermediate, old.roots, old.since, old.leaf_ttl, old.old_leaves_until) == (
        rep.intermediate, rep.roots, rep.since, rep.leaf_ttl, rep.old_leaves_until)


def _read(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None


def host_report(d: Path, current: x509.Certificate, roots, since: str, when: datetime,
                leaf_ttl: timedelta | None) -> HostReport:
    serial = f"{current.serial_number:x}"
    old_until: str | None = None
    for rec in read_issued(d.parent):
        if rec.get("issuer") != serial and rec["not_after"] > when.isoformat():
            if old_until is None or rec["not_after"] > old_until:
                old_until = rec["not_after"]
    return HostReport(
        intermediate=serial,
        roots=tuple(fingerprint(r) for r in roots),
        since=since,
        leaf_ttl=(leaf_ttl or timedelta(hours=24)).total_seconds(),
        old_leaves_until=old_until,
        updated=when.isoformat(),
    )


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def follow(state_dir: str | Path, kv: KV, *, leaf_ttl: timedelta | None = None, wait: float = 10.0) -> None:
    """Forever: ``sync`` after each change under the prefix, and at least every ``wait``
    seconds (the longest a blocking query is held). Errors are logged and retried; the
    CA files of the last good pass keep serving meanwhile."""
    d = ca_dir(state_dir)
    meta = _read_meta(d)
    prefix = meta["host"]["prefix"]
    index: int | None = None
    backoff = 0.5
    last_msg = ""
    while True:
        try:
            index_before = index
            index, entries = await trio.to_thread.run_sync(
                lambda: kv.list(prefix, index=index_before, wait=wait if index_before else None),
                abandon_on_cancel=True,
            )
            res = await trio.to_thread.run_sync(
                lambda: apply_entries(d, _read_meta(d), entries, _utcnow(), kv=kv, leaf_ttl=leaf_ttl))
            if res.message != last_msg:
                (log.info if res.ready else log.warning)("%s", res.message)
                last_msg = res.message
            backoff = 0.5
        except CAError as exc:
            log.warning("shared CA: %s; retrying in %.1fs", exc, backoff)
            index = None
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
