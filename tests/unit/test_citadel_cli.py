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
