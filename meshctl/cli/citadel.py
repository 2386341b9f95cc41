"""`meshctl citadel`: init, serve, status, rotate-root, token; join and approve
for a mesh over several hosts (one root, an intermediate per host, through Consul KV)."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import typer

from .common import StateDirOption, Table, console, fail, serve_forever

app = typer.Typer(help="Citadel: the mesh's CA, workload certificates and bootstrap tokens.", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="citadel")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _state(explicit: Optional[str], create: bool) -> Path:
    from ..state import STATE_DIR_NAME, find_state_dir

    # A command that makes a CA (init, join) works on the mesh of this directory: never on
    # the mesh `up` started last elsewhere, which would get a second CA written into it.
    found = find_state_dir(explicit, use_current=not create)
    if found is not None:
        return found
    if create:
        return Path(STATE_DIR_NAME)
    fail(
        f"no mesh state directory: no {STATE_DIR_NAME}/ here or in any parent of {Path.cwd()}; "
        "run `meshctl citadel init` or `meshctl up` first, or pass --state-dir"
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _duration(text: str, what: str) -> timedelta:
    m = _DURATION.match(text)
    if not m:
        fail(f"{what}: cannot read duration {text!r} (examples: 90s, 30m, 24h, 2d)")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
    return timedelta(seconds=float(m.group(1)) * unit)


def _read(path: Optional[Path], what: str) -> Optional[bytes]:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror}")


@app.command("init")
def init(
    cert: Optional[Path] = typer.Option(
        None, "--ca-cert", "--cert", help="Your CA certificate, PEM: an intermediate (Istio's ca-cert.pem) or a root."),
    key: Optional[Path] = typer.Option(None, "--ca-key", "--key", help="Its private key, PEM, unencrypted (ca-key.pem)."),
    chain: Optional[Path] = typer.Option(
        None, "--cert-chain", "--chain", help="The CA's chain up to the root, PEM (Istio's cert-chain.pem)."),
    root_cert: Optional[Path] = typer.Option(
        None, "--root-cert", help="Your organisation's root, PEM (root-cert.pem): the chain must end there; "
        "sidecars trust only it."),
    cacerts: Optional[Path] = typer.Option(
        None, "--cacerts", help="A directory with Istio's cacerts files: ca-cert.pem, ca-key.pem, root-cert.pem, "
        "cert-chain.pem."),
    trust_domain: Optional[str] = typer.Option(
        None, "--trust-domain", help="SPIFFE trust domain (default: the plugged CA's, else cluster.local)."
    ),
    root_dir: Optional[Path] = typer.Option(
        None, "--root-dir", help="Make the root of a multi-host mesh in this directory (kept off the hosts; "
        "`citadel approve` signs each host's intermediate with it)."),
    mesh: Optional[str] = typer.Option(None, "--mesh-id", help="With --root-dir: the meshId, where the CA lives in Consul KV "
                                       "(default: the trust domain)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Create the mesh CA: a new root, or plug in your own (Istio's plug-in CA: cacerts)."""
    from ..citadel.errors import CitadelError
    from ..citadel.store import ca_dir, init_ca

    if cacerts is not None:
        if not cacerts.is_dir():
            fail(f"--cacerts {cacerts}: not a directory")
        cert = cert or cacerts / "ca-cert.pem"
        key = key or cacerts / "ca-key.pem"
        root_cert = root_cert or (cacerts / "root-cert.pem" if (cacerts / "root-cert.pem").exists() else None)
        chain = chain or (cacerts / "cert-chain.pem" if (cacerts / "cert-chain.pem").exists() else None)
    if root_cert is not None and cert is None:
        fail("--root-cert goes with --ca-cert and --ca-key (the CA that signs workload certificates)")
    if root_dir is not None:
        from ..citadel.rootca import init_root

        try:
            ca = init_root(root_dir, trust_domain, _read(cert, "--ca-cert"), _read(key, "--ca-key"),
                           _read(chain, "--cert-chain"), root=_read(root_cert, "--root-cert"), mesh=mesh, now=_now())
        except CitadelError as e:
            fail(str(e))
        kind = "plugged-in CA" if cert else "new root CA"
        console.print(
            f"{kind} of the multi-host mesh (trust domain [bold]{ca.trust_domain}[/]) in {root_dir}, valid until "
            f"{ca.cert.not_valid_after_utc:%Y-%m-%d}; its key stays here. Join hosts with "
            "`meshctl citadel join`, then sign their intermediates with `meshctl citadel approve`.",
            highlight=False,
        )
        return
    if mesh is not None:
        fail("--mesh-id goes with --root-dir")
    sd = _state(state, create=True)
    try:
        ca = init_ca(sd, trust_domain, _read(cert, "--ca-cert"), _read(key, "--ca-key"), _read(chain, "--cert-chain"),
                     now=_now(), root=_read(root_cert, "--root-cert"))
    except CitadelError as e:
        fail(str(e))
    kind = "plugged-in CA" if cert else "new root CA"
    console.print(
        f"{kind} for trust domain [bold]{ca.trust_domain}[/] in {ca_dir(sd)}, "
        f"valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}",
        highlight=False,
    )
    if cert:
        console.print(f"workload certificates chain to root {ca.root.subject.rfc4514_string()}", highlight=False)


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (tokens are bearer secrets: keep it private)."),
    port: int = typer.Option(15012, help="Port (0 picks a free one)."),
    trust_domain: str = typer.Option("cluster.local", "--trust-domain", help="Trust domain if a CA must be created."),
    leaf_ttl: str = typer.Option("24h", "--cert-ttl", help="Lifetime of workload certificates."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Run Citadel's signing endpoint in the foreground (creates a root CA if there is none)."""
    import trio

    from ..citadel.errors import CitadelError
    from ..citadel.server import serve as serve_citadel
    from ..citadel.store import ensure_ca
    from ..state import write_control

    from ..citadel.store import host_of

    sd = _state(state, create=True)
    ttl = _duration(leaf_ttl, "--cert-ttl")
    joined = host_of(sd)
    try:
        if joined is None:
            ca = ensure_ca(sd, trust_domain, now=_now())
    except CitadelError as e:
        fail(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s citadel %(levelname)s %(message)s")

    async def main() -> None:
        async with trio.open_nursery() as n:
            bound = await n.start(lambda task_status: serve_citadel(sd, host, port, leaf_ttl=ttl, task_status=task_status))
            url = f"http://{host}:{bound}"
            write_control(sd, citadel=url)
            if joined is None:
                logging.info("serving on %s (trust domain %s, state %s)", url, ca.trust_domain, sd)
            else:
                logging.info("serving on %s as host %s of mesh %s (shared root in %s; state %s)", url,
                             joined["name"], joined["mesh"], joined["registry"], sd)

    serve_forever(main, host, port)


def _left(not_after: str, now: datetime) -> str:
    left = datetime.fromisoformat(not_after) - now
    if left.total_seconds() <= 0:
        return "[red]expired[/]"
    hours = left.total_seconds() / 3600
    return f"{hours:.1f}h" if hours < 48 else f"{hours / 24:.0f}d"


@app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state: Optional[str] = StateDirOption,
) -> None:
    """The CA, and the latest certificate issued to each identity with its expiry."""
    from ..citadel.errors import CitadelError
    from ..citadel.store import TokenFile, ca_info, latest_by_identity

    sd = _state(state, create=False)
    now = _now()
    try:
        info = ca_info(sd, now)
        issued = latest_by_identity(sd)
        tokens = len(TokenFile(sd).outstanding(now))
    except CitadelError as e:
        fail(str(e))
    if as_json:
        print(json.dumps({"ca": info, "identities": list(issued.values()), "outstanding_tokens": tokens}, indent=1))
        return
    console.print(
        f"trust domain [bold]{info['trust_domain']}[/]; CA {info['ca_subject']} "
        f"({'issued by the root holder' if info.get('host') else 'plugged in' if info['plugged'] else 'generated'}), valid until {info['ca_not_after'][:10]}",
        highlight=False,
    )
    if info.get("host"):
        h = info["host"]
        console.print(f"host [bold]{h['name']}[/] of mesh {h['mesh']}: its own intermediate under the shared root, "
                      f"certificates through {h['registry']} ({h['prefix']})", highlight=False)
    for i, link in enumerate(info.get("chain", [])):
        role = "signs workload certificates" if i == 0 else ("root, trusted by sidecars" if link["root"] else "intermediate")
        console.print(f"  {'└─ ' if i else ''}{link['subject']} (until {link['not_after'][:10]}; {role})", highlight=False)
    for old in info["old_roots"]:
        console.print(f"old root still trusted until {old['retire_after'][:16]}", highlight=False)
    console.print(f"{tokens} bootstrap token(s) outstanding", highlight=False)
    if not issued:
        console.print("no certificates issued yet")
        return
    console.print(identities_table(issued, now))


def identities_table(issued: dict, now) -> Table:
    """Issued certificates, one row each; identities wrap rather than being cut."""
    table = Table("IDENTITY", "SERIAL", "EXPIRES", "LEFT", "HOW", box=None)
    for rec in sorted(issued.values(), key=lambda r: r["spiffe_id"]):
        table.add_row(rec["spiffe_id"], rec["serial"][:16], rec["not_after"][:19], _left(rec["not_after"], now), rec["how"])
    return table


@app.command("rotate-root")
def rotate_root(
    overlap: str = typer.Option("48h", help="How long the old root stays trusted (longer than the cert TTL)."),
    root_dir: Optional[Path] = typer.Option(
        None, "--root-dir", help="Multi-host mesh: the root holder's directory (with --registry)."),
    registry: Optional[str] = typer.Option(None, "--registry", help="Multi-host mesh: consul://HOST:PORT."),
    mesh: Optional[str] = typer.Option(None, "--mesh-id", help="The meshId whose CA this is in Consul KV (default: the root's)."),
    wait: str = typer.Option("1h", "--wait", help="Multi-host: how long to wait for the hosts before the old root "
                             "leaves the bundle (0: start or check, and return; run again to continue)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Replace the generated root; the old one stays in the trust bundle for --overlap.

    With --root-dir and --registry (a multi-host mesh): the new root joins every host's bundle,
    cross-signed by the old one; each host's intermediate is issued again from it; once every host
    signs with its new intermediate and no certificate of the old one is alive, the old root leaves
    the bundle. Run again to continue a rotation that --wait cut short."""
    from ..citadel.errors import CitadelError
    from ..citadel.store import rotate_root as rotate

    if root_dir is not None or registry is not None:
        if root_dir is None or registry is None:
            fail("a multi-host rotation needs both --root-dir and --registry")
        _rotate_shared(root_dir, registry, mesh, _duration(overlap, "--overlap"), _duration(wait, "--wait"))
        return
    sd = _state(state, create=False)
    span = _duration(overlap, "--overlap")
    try:
        ca = rotate(sd, _now(), span)
    except CitadelError as e:
        fail(str(e))
    console.print(
        f"new root {ca.root.subject.rfc4514_string()}; the old root stays trusted for {overlap}. "
        "Sidecars pick up the new bundle when they renew (at half of their certificate's life).",
        highlight=False,
    )


@app.command("token")
def token(
    identity: str = typer.Argument(..., help="SPIFFE ID, or NAMESPACE/SERVICE_ACCOUNT in the CA's trust domain."),
    ttl: str = typer.Option("1h", help="How long the token can be redeemed."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Issue a one-time bootstrap token for a workload identity (printed alone, for scripts)."""
    from ..citadel.errors import CitadelError
    from ..citadel.identity import spiffe_id
    from ..citadel.store import TokenFile, load_ca_from

    sd = _state(state, create=False)
    try:
        if not identity.startswith("spiffe://"):
            ns, sep, sa = identity.partition("/")
            if not sep:
                fail(f"identity {identity!r}: give a SPIFFE ID or NAMESPACE/SERVICE_ACCOUNT")
            identity = spiffe_id(load_ca_from(sd).trust_domain, ns, sa)
        print(TokenFile(sd).issue_token(identity, _duration(ttl, "--ttl"), _now()))
    except CitadelError as e:
        fail(str(e))


def _kv(registry: str):
    from ..citadel.errors import CitadelError
    from ..citadel.kv import open_kv

    try:
        return open_kv(registry)
    except CitadelError as e:
        fail(str(e))


def _rotate_shared(root_dir: Path, registry: str, mesh: Optional[str], overlap: timedelta, wait: timedelta) -> None:
    import time

    from ..citadel.errors import CitadelError
    from ..citadel.rootca import finish_rotation, rotation_state, start_rotation

    kv = _kv(registry)
    try:
        rot, waits = rotation_state(root_dir, kv, mesh=mesh, now=_now())
        if rot is None:
            new = start_rotation(root_dir, kv, mesh=mesh, now=_now(), overlap=overlap)
            console.print(f"new root {new.root.subject.rfc4514_string()} is in the bundle beside the old one, "
                          "cross-signed by it; every host's intermediate was issued again from it", highlight=False)
        else:
            console.print(f"continuing the rotation started {rot['started'][:19]}", highlight=False)
        deadline = time.monotonic() + wait.total_seconds()
        shown: list[str] = []
        while True:
            rot, waits = rotation_state(root_dir, kv, mesh=mesh, now=_now())
            if rot is None or not waits:
                break
            if waits != shown:
                console.print("waiting for: " + "; ".join(waits), highlight=False)
                shown = waits
            if time.monotonic() >= deadline:
                console.print("the old root stays in the bundle for now; run the same command again to finish",
                              highlight=False)
                raise typer.Exit(3)
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        finish_rotation(root_dir, kv, mesh=mesh, now=_now())
    except CitadelError as e:
        fail(str(e))
    console.print("rotation done: every host signs under the new root; the old root left the bundle", highlight=False)


@app.command("join")
def join(
    registry: str = typer.Option(..., "--registry", help="Consul, where the mesh's CA certificates live: "
                                 "consul://HOST:PORT (this host's agent)."),
    host: str = typer.Option(..., "--host", help="This host's name in the mesh (one per host)."),
    trust_domain: str = typer.Option("cluster.local", "--trust-domain", help="SPIFFE trust domain of the mesh."),
    mesh: Optional[str] = typer.Option(None, "--mesh-id", help="The mesh's meshId: its CA lives under meshctl/<meshId>/ca/ in Consul KV (default: the trust domain)."),
    root_cert: Optional[Path] = typer.Option(
        None, "--root-cert", help="Pin the mesh's root (PEM, from the root holder) instead of trusting the first "
        "bundle found in Consul KV."),
    wait: str = typer.Option("0s", "--wait", help="Wait this long for the root holder's approval (0: return)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Make this host's intermediate CA key (it never leaves the state directory) and ask the
    root holder, through Consul KV, to certify it; `meshctl up` then signs with it."""
    import time

    from ..citadel.errors import CitadelError
    from ..citadel.hostca import join as do_join, sync

    sd = _state(state, create=True)
    kv = _kv(registry)
    try:
        entry = do_join(sd, kv, host, mesh=mesh, trust_domain=trust_domain,
                        root_pin=_read(root_cert, "--root-cert"), now=_now())
        res = sync(sd, kv, _now())
        deadline = time.monotonic() + _duration(wait, "--wait").total_seconds()
        while not res.ready and time.monotonic() < deadline:
            time.sleep(0.5)
            res = sync(sd, kv, _now())
    except CitadelError as e:
        fail(str(e))
    if res.ready:
        console.print(res.message, highlight=False)
        return
    console.print(f"CSR of host {entry['name']} (key id {entry['key_id']}) published at "
                  f"{entry['prefix']}csr/{entry['name']}", highlight=False)
    fail(res.message, code=3)


@app.command("approve")
def approve(
    hosts: Optional[list[str]] = typer.Argument(None, help="Hosts whose CSR to sign (none: list the hosts)."),
    root_dir: Path = typer.Option(..., "--root-dir", help="The root holder's directory (citadel init --root-dir)."),
    registry: str = typer.Option(..., "--registry", help="Consul: consul://HOST:PORT."),
    all_: bool = typer.Option(False, "--all", help="Sign every pending host's CSR."),
    mesh: Optional[str] = typer.Option(None, "--mesh-id", help="The meshId whose CA this is in Consul KV (default: the root's)."),
    ttl: str = typer.Option("365d", "--ttl", help="Lifetime of the hosts' intermediate certificates."),
) -> None:
    """List the hosts waiting for an intermediate CA, or sign the named ones (--all: every pending one)."""
    from ..citadel.errors import CitadelError
    from ..citadel.rootca import approve as do_approve, hosts as list_hosts, load_root, prefix_of

    kv = _kv(registry)
    try:
        if not hosts and not all_:
            _, meta = load_root(root_dir)
            rows = list_hosts(kv, prefix_of(meta, mesh))
            if not rows:
                console.print("no host has asked for an intermediate yet (`meshctl citadel join` on each host)")
                return
            table = Table("HOST", "STATE", "KEY", "INTERMEDIATE UNTIL", "SIGNS WITH", box=None)
            for r in rows:
                until = f"{r.intermediate.not_valid_after_utc:%Y-%m-%d}" if r.intermediate is not None else "-"
                signs = r.report.intermediate[:16] if r.report is not None else "-"
                table.add_row(r.host, r.state, r.key_id, until, signs)
            console.print(table)
            return
        if hosts and all_:
            fail("give host names or --all, not both")
        done = do_approve(root_dir, kv, None if all_ else list(hosts or ()), mesh=mesh, now=_now(),
                          ttl=_duration(ttl, "--ttl"))
    except CitadelError as e:
        fail(str(e))
    if not done:
        console.print("no pending host")
    for name, cert in done:
        console.print(f"approved host {name}: intermediate {cert.serial_number:x} until "
                      f"{cert.not_valid_after_utc:%Y-%m-%d}", highlight=False)


@app.command("remove-host")
def remove_host(
    host: str = typer.Argument(..., help="The host to forget."),
    root_dir: Path = typer.Option(..., "--root-dir", help="The root holder's directory (citadel init --root-dir)."),
    registry: str = typer.Option(..., "--registry", help="Consul: consul://HOST:PORT."),
    mesh: Optional[str] = typer.Option(None, "--mesh-id", help="The meshId whose CA this is in Consul KV (default: the root's)."),
) -> None:
    """Forget a host of a multi-host mesh (it gets no new intermediate; a running rotation stops waiting
    for it). Its intermediate stays trusted until the root changes: run `rotate-root` to revoke it."""
    from ..citadel.errors import CitadelError
    from ..citadel.rootca import remove_host as do_remove

    kv = _kv(registry)
    try:
        do_remove(root_dir, kv, host, mesh=mesh)
    except CitadelError as e:
        fail(str(e))
    console.print(f"host {host} removed; its intermediate stays trusted until `meshctl citadel rotate-root "
                  f"--root-dir {root_dir} --registry {registry}` replaces the root", highlight=False)
