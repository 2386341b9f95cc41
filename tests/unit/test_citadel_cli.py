"""`meshctl citadel` init / token / status / rotate-root, as a user runs them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from meshctl.citadel.ca import cert_to_pem, create_root, key_to_pem
from meshctl.citadel.store import TokenFile
from meshctl.cli.citadel import app

runner = CliRunner()


class Out:
    def __init__(self, r):
        self.exit_code = r.exit_code
        self.raw = r.output
        self.output = " ".join(r.output.split())  # undo rich's line wrapping


def run(*args, sd):
    return Out(runner.invoke(app, [*args, "--state-dir", str(sd)]))


def test_init_token_status_rotate(tmp_path):
    sd = tmp_path / ".meshctl"
    r = run("init", "--trust-domain", "example.org", sd=sd)
    assert r.exit_code == 0, r.output
    assert "new root CA for trust domain example.org" in r.output
    r = run("token", "default/reviews", "--ttl", "10m", sd=sd)
    assert r.exit_code == 0, r.output
    tok = r.raw.strip()
    assert TokenFile(sd).redeem(tok, __import__("time").time()) == "spiffe://example.org/ns/default/sa/reviews"
    r = run("status", "--json", sd=sd)
    data = json.loads(r.raw)
    assert data["ca"]["trust_domain"] == "example.org" and data["outstanding_tokens"] == 0
    r = run("rotate-root", "--overlap", "2h", sd=sd)
    assert r.exit_code == 0 and "old root stays trusted for 2h" in r.output
    assert len(json.loads(run("status", "--json", sd=sd).raw)["ca"]["old_roots"]) == 1


def test_errors_are_one_clear_line(tmp_path):
    sd = tmp_path / ".meshctl"
    assert run("init", sd=sd).exit_code == 0
    r = run("init", sd=sd)
    assert r.exit_code == 1 and "already exists" in r.output
    r = run("token", "reviews", sd=sd)
    assert r.exit_code == 1 and "NAMESPACE/SERVICE_ACCOUNT" in r.output
    r = run("rotate-root", "--overlap", "soon", sd=sd)
    assert r.exit_code == 1 and "cannot read duration" in r.output


def test_plug_in_your_own_ca(tmp_path):
    from datetime import datetime, timezone

    root = create_root("corp.example", datetime.now(timezone.utc))
    (tmp_path / "ca.pem").write_bytes(cert_to_pem(root.cert))
    (tmp_path / "ca.key").write_bytes(key_to_pem(root.key))
    sd = tmp_path / ".meshctl"
    r = run("init", "--cert", str(tmp_path / "ca.pem"), "--key", str(tmp_path / "ca.key"), sd=sd)
    assert r.exit_code == 0 and "plugged-in CA for trust domain corp.example" in r.output, r.output
    r = run("rotate-root", sd=sd)
    assert r.exit_code == 1 and "plugged-in CA" in r.output
    r = run("init", "--cert", str(tmp_path / "missing.pem"), "--key", str(tmp_path / "ca.key"), sd=tmp_path / "x")
    assert r.exit_code == 1 and "cannot read --ca-cert" in r.output


def test_init_in_a_new_directory_never_writes_into_the_mesh_up_started_last(tmp_path, monkeypatch):
    # `up` records its mesh in $XDG_CONFIG_HOME/meshctl/current, and commands that read a
    # mesh fall back to it; `citadel init` (like join) makes a CA, and belongs to the
    # directory it runs in: a second CA in another running mesh broke that mesh.
    other = tmp_path / "running" / ".meshctl"
    other.mkdir(parents=True)
    (other / "control.json").write_text("{}")
    xdg = tmp_path / "xdg"
    (xdg / "meshctl").mkdir(parents=True)
    (xdg / "meshctl" / "current").write_text(str(other))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    here = tmp_path / "new-host"
    here.mkdir()
    monkeypatch.chdir(here)
    r = Out(runner.invoke(app, ["init", "--trust-domain", "example.org"]))
    assert r.exit_code == 0, r.output
    assert (here / ".meshctl" / "ca").is_dir()
    assert not (other / "ca").exists()
