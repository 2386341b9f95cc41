"""Istio's "Plug in CA certificates" task on Bookinfo: the organisation's root and an
intermediate made with openssl (as Istio's tools/certs Makefile does), given to
`meshctl citadel init` as Istio's cacerts files; every sidecar's certificate then
chains to that root (checked with openssl s_client and openssl verify), sidecars
trust it (Bookinfo works over mTLS), and `citadel status` shows the chain."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .helpers import bookinfo_workdir
from .test_istio_tasks import meshctl

pytestmark = pytest.mark.e2e


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_cacerts(d: Path) -> None:
    """root-cert.pem, then an intermediate for the cluster: ca-cert.pem, ca-key.pem, cert-chain.pem."""
    d.mkdir()
    (d / "root.conf").write_text(
        "[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=ext\n[dn]\nO=Istio\nCN=Root CA\n"
        "[ext]\nbasicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
    )
    (d / "ca.conf").write_text(
        "[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nO=Istio\nCN=Intermediate CA\nL=cluster1\n"
        "[ext]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,digitalSignature,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        "subjectAltName=critical,URI:spiffe://cluster.local/ns/istio-system/sa/citadel\n"
    )
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root-key.pem", "-out", "root-cert.pem",
            "-days", "3650", "-config", "root.conf", cwd=d)
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.csr",
            "-config", "ca.conf", cwd=d)
    openssl("x509", "-req", "-in", "ca.csr", "-CA", "root-cert.pem", "-CAkey", "root-key.pem", "-CAcreateserial",
            "-out", "ca-cert.pem", "-days", "730", "-extfile", "ca.conf", "-extensions", "ext", cwd=d)
    (d / "cert-chain.pem").write_bytes((d / "ca-cert.pem").read_bytes() + (d / "root-cert.pem").read_bytes())
    (d / "root-key.pem").unlink()  # the organisation's root key never reaches the mesh


def test_plugged_in_intermediate_chains_every_workload_to_the_organisation_root(tmp_path):
    work = tmp_path / "mesh"
    work.mkdir()
    gw_port = bookinfo_workdir(work)
    cacerts = tmp_path / "cacerts"
    make_cacerts(cacerts)
    out = meshctl("citadel", "init", "--ca-cert", str(cacerts / "ca-cert.pem"), "--ca-key", str(cacerts / "ca-key.pem"),
                  "--root-cert", str(cacerts / "root-cert.pem"), "--cert-chain", str(cacerts / "cert-chain.pem"),
                  "--state-dir", str(work / ".meshctl"), cwd=work).stdout
    assert "plugged-in CA for trust domain cluster.local" in out and "CN=Root CA,O=Istio" in out, out

    # a chain from another PKI is refused, naming both ends
    other = tmp_path / "other"
    make_cacerts(other)
    r = meshctl("citadel", "init", "--cacerts", str(cacerts), "--root-cert", str(other / "root-cert.pem"),
                "--state-dir", str(tmp_path / "x"), cwd=work, check=False)
    assert r.returncode == 1 and "not at the root certificate given" in r.stderr + r.stdout

    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        status = meshctl("citadel", "status", cwd=work).stdout
        assert "CN=Intermediate CA" in status and "signs workload certificates" in status, status
        assert "CN=Root CA,O=Istio (until" in status and "root, trusted by sidecars" in status, status

        meshctl("route", "apply", "--wait", "-f", "rules/bookinfo-gateway.yaml", cwd=work)
        # sidecars trust the root: productpage → reviews → ratings over mTLS
        page = subprocess.run(["curl", "-s", "--noproxy", "*", "-m", "20", f"http://127.0.0.1:{gw_port}/productpage"],
                              capture_output=True, text=True, timeout=25).stdout
        assert "Reviewer1" in page and "Book Details" in page, page[-500:]

        # the reviews sidecar's certificate, as a client sees it, verifies against root-cert.pem alone
        st = json.loads(meshctl("status", "--json", cwd=work).stdout)
        reviews = next(w for w in st["workloads"] if w["name"].startswith("reviews"))
        addr = reviews["inbound_address"]
        shown = subprocess.run(["openssl", "s_client", "-connect", addr, "-showcerts"], input="", capture_output=True,
                               text=True, timeout=20).stdout
        pems = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", shown, re.S)
        assert len(pems) >= 2, shown[-1500:]  # the leaf and the intermediate
        (tmp_path / "leaf.pem").write_text(pems[0])
        (tmp_path / "rest.pem").write_text("".join(pems[1:]))
        v = subprocess.run(["openssl", "verify", "-CAfile", str(cacerts / "root-cert.pem"), "-untrusted",
                            str(tmp_path / "rest.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
        assert v.returncode == 0 and ": OK" in v.stdout, v.stdout + v.stderr
        leaf = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True).stdout
        assert "URI:spiffe://cluster.local/ns/default/sa/" in leaf and "Intermediate CA" in leaf
    finally:
        meshctl("down", cwd=work, check=False)
