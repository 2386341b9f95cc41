"""`meshctl citadel init --root-dir`: the root holder's directory of a multi-host mesh,
with a new root or the organisation's own (made here with openssl, as Istio's
tools/certs Makefile does)."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from typer.testing import CliRunner

from meshctl.citadel.ca import CA, cert_to_pem, generate_key, make_csr
from meshctl.citadel.multihost import make_host_csr, sign_host_intermediate
from meshctl.citadel.rootca import load_root
from meshctl.cli.citadel import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, " ".join(r.output.split())


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def org_pki(d: Path) -> None:
    """root-cert.pem + root-key.pem, and an intermediate with pathlen:0 (ca-cert.pem, ca-key.pem)."""
    d.mkdir()
    (d / "root.conf").write_text(
        "[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=ext\n[dn]\nO=Example Org\nCN=Org Root CA\n"
        "[ext]\nbasicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n")
    (d / "ca.conf").write_text(
        "[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nO=Example Org\nCN=Intermediate CA\n"
        "[ext]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root-key.pem", "-out", "root-cert.pem",
            "-days", "3650", "-config", "root.conf", cwd=d)
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.csr",
            "-config", "ca.conf", cwd=d)
    openssl("x509", "-req", "-in", "ca.csr", "-CA", "root-cert.pem", "-CAkey", "root-key.pem", "-CAcreateserial",
            "-out", "ca-cert.pem", "-days", "730", "-extfile", "ca.conf", "-extensions", "ext", cwd=d)
    (d / "cert-chain.pem").write_bytes((d / "ca-cert.pem").read_bytes() + (d / "root-cert.pem").read_bytes())


def test_a_new_root_is_made_once_and_cannot_be_made_again(tmp_path):
    code, out = run("init", "--root-dir", str(tmp_path / "root"), "--trust-domain", "example.org")
    assert code == 0 and "new root CA of the multi-host mesh (trust domain example.org)" in out, out
    ca, meta = load_root(tmp_path / "root")
    assert meta["mesh"] == "example.org" and ca.chain == ()
    assert oct((tmp_path / "root" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    code, out = run("init", "--root-dir", str(tmp_path / "root"))
    assert code == 1 and "a CA already exists in" in out, out


def test_the_organisations_root_can_issue_the_hosts_intermediates(tmp_path):
    pki = tmp_path / "pki"
    org_pki(pki)
    code, out = run("init", "--root-dir", str(tmp_path / "root"), "--ca-cert", str(pki / "root-cert.pem"),
                    "--ca-key", str(pki / "root-key.pem"), "--trust-domain", "cluster.local")
    assert code == 0 and "plugged-in CA of the multi-host mesh" in out, out
    ca, _ = load_root(tmp_path / "root")
    key = generate_key()
    inter = sign_host_intermediate(ca, make_host_csr(key, "vm1", "cluster.local"), "vm1", datetime.now(timezone.utc))
    leaf = CA(inter, key, (ca.cert,), "cluster.local").sign_csr(
        make_csr(generate_key()), "spiffe://cluster.local/ns/default/sa/x", 3600, datetime.now(timezone.utc))
    (tmp_path / "inter.pem").write_bytes(cert_to_pem(inter))
    (tmp_path / "leaf.pem").write_bytes(leaf)
    v = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "root-cert.pem"), "-untrusted",
                        str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    assert x509.load_pem_x509_certificate(leaf).issuer == inter.subject


def test_an_issuer_with_pathlen_0_is_refused_by_name(tmp_path):
    pki = tmp_path / "pki"
    org_pki(pki)
    code, out = run("init", "--root-dir", str(tmp_path / "root"), "--cacerts", str(pki))
    assert code == 1 and "has pathlen:0, so it cannot issue the hosts' intermediate CAs" in out, out
    assert not (tmp_path / "root" / "ca-key.pem").exists()


def test_a_multi_host_rotation_needs_the_root_dir_and_the_registry(tmp_path):
    code, out = run("rotate-root", "--root-dir", str(tmp_path / "root"))
    assert code == 1 and "needs both --root-dir and --registry" in out, out
    code, out = run("init", "--mesh-id", "x", "--state-dir", str(tmp_path / "s"))
    assert code == 1 and "--mesh-id goes with --root-dir" in out, out
    code, out = run("approve", "--root-dir", str(tmp_path), "--registry", "eureka://127.0.0.1:8761/eureka")
    assert code == 1 and "Consul" in out, out
