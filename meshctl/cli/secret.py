"""`meshctl secret`: TLS credentials for Gateway servers (Istio's credentialName)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import secrets
from .common import StateDirOption, console, fail, state_dir

app = typer.Typer(help="TLS secrets that Gateway servers name with credentialName.", no_args_is_help=True)
create_app = typer.Typer(help="Create a secret.", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    app.add_typer(create_app, name="create")
    root.add_typer(app, name="secret")


@create_app.command("tls")
def create_tls(
    name: str = typer.Argument(..., help="The name Gateways give as tls.credentialName."),
    cert: Path = typer.Option(..., "--cert", help="Certificate chain (PEM), leaf first."),
    key: Path = typer.Option(..., "--key", help="Its private key (PEM, unencrypted)."),
    ca_cert: Optional[Path] = typer.Option(None, "--ca-cert", help="CA that client certificates must chain to (MUTUAL)."),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing secret (running gateways pick it up)."),
    state: Optional[str] = StateDirOption,
) -> None:
    """Store a certificate and key (and a client CA) for Gateway servers; like `kubectl create secret tls`."""
    sd = state_dir(state)
    existed = (secrets.secrets_dir(sd) / name).is_dir()
    try:
        secrets.create_tls(sd, name, cert, key, ca_cert, replace=replace)
    except secrets.SecretError as e:
        fail(str(e))
    console.print(f"secret/{name} {'replaced' if existed else 'created'}", highlight=False)


@app.command("list")
def list_cmd(state: Optional[str] = StateDirOption) -> None:
    """The secrets, with their certificate's subject, DNS names and expiry (never the keys)."""
    sd = state_dir(state)
    found = secrets.list_secrets(sd)
    if not found:
        console.print("no secrets")
        return
    t = Table("NAME", "TYPE", "DATA", "SUBJECT", "DNS NAMES", "EXPIRES", box=None)
    for s in found:
        t.add_row(s.name, "tls", ",".join(s.keys), s.subject, ",".join(s.names),
                  s.not_after.strftime("%Y-%m-%d %H:%M UTC") if s.not_after else "")
    console.print(t)


@app.command("delete")
def delete(name: str = typer.Argument(...), state: Optional[str] = StateDirOption) -> None:
    """Delete a secret (Gateways naming it are refused at the next `route apply`)."""
    sd = state_dir(state)
    try:
        secrets.delete(sd, name)
    except secrets.SecretError as e:
        fail(str(e))
    console.print(f"secret/{name} deleted", highlight=False)
