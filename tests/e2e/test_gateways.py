"""Istio's gateway tasks end to end: one mesh (`meshctl up -d`, real processes)
with an httpbin stand-in behind the ingress gateway, Istio's YAML as written in
its docs, and real clients (curl, openssl s_client, raw sockets)."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.tools.rawapp import RawApp

from .helpers import HELLO_APP, free_port, mesh_ports

TCP_ECHO_APP = Path(__file__).with_name("tcp_echo_app.py")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
GW_DATA = ROOT / "tests" / "data" / "istio-gateways"


def meshctl(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("meshctl_state_dir", "http_proxy", "https_proxy")}
    env["COLUMNS"] = "250"
    r = subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def curl(*args: str) -> tuple[str, str]:
    """(status code, body) of a curl run; code '000' when nothing answered."""
    r = subprocess.run(["curl", "-s", "--noproxy", "*", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=15)
    body, _, code = r.stdout.rpartition("\n")
    return code, body


def apply_text(mesh, text: str, *, check: bool = True) -> subprocess.CompletedProcess:
    path = mesh["dir"] / f"rules-{abs(hash(text))}.yaml"
    path.write_text(text)
    return meshctl("route", "apply", "--wait", "-f", path.name, cwd=mesh["dir"], check=check)


def delete(mesh, kind: str, name: str, namespace: str = "default") -> None:
    meshctl("route", "delete", kind, name, "-n", namespace, cwd=mesh["dir"])
    time.sleep(0.5)


MESH = """\
settings:
  portRange: {port_range}
services:
- name: httpbin
  port: 8000
  versions:
  - name: v1
    command: [{python}, {hello}]
- name: productpage
  port: 9080
  versions:
  - name: v1
    command: [{python}, {hello}]
- name: helloworld
  port: 5000
  versions:
  - name: v1
    command: [{python}, {hello}]
- name: tcp-echo
  port: 9000
  protocol: tcp
  versions:
  - name: v1
    command: [{python}, {echo}, one]
  - name: v2
    command: [{python}, {echo}, two]
- name: my-nginx
  port: 443
  protocol: tcp
  versions:
  - name: v1
    address: 127.0.0.1:{nginx}
gateways:
- name: istio-ingressgateway
  labels: {{istio: ingressgateway}}
  ports: {{80: {http}, 443: {https}, 31400: {tcp}, 8080: {p8080}}}
  numTrustedProxies: 1
- name: istio-egressgateway
  labels: {{istio: egressgateway}}
  ports: {{80: {egress}}}
"""


# ---------------------------------------------------------------- certificates, as the tasks make them with openssl


def _name(cn: str, org: str = "example Inc.") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(cn: str = "example.com"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca, cn: str, *, client: bool = False):
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1)))
    if not client:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def write_pair(d: Path, stem: str, cert, key) -> tuple[Path, Path]:
    c, k = d / f"{stem}.crt", d / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(_pem_key(key))
    return c, k


class TLSUpstream(RawApp):
    """my-nginx of Istio's SNI passthrough task: an HTTPS server with its own certificate."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        super().__init__(port)

    def serve(self, c: socket.socket) -> None:
        with self.ctx.wrap_socket(c, server_side=True) as t:
            t.recv(65536)
            body = b"Welcome to nginx!\n"
            t.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

# Istio's docs (tasks/traffic-management/ingress/ingress-control), as written there
HTTPBIN_GATEWAY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: httpbin-gateway
spec:
  # The selector matches the ingress gateway pod labels.
  # If you installed Istio using Helm following the standard documentation, this would be "istio=ingress"
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "httpbin.example.com"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - httpbin-gateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /delay
    - uri:
        prefix: /headers
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    work = tmp_path_factory.mktemp("gateways")
    port_range, spare = mesh_ports()
    lo, hi = (int(x) for x in port_range.split("-"))
    http, https, tcp, nginx, p8080, egress = spare, hi, hi - 1, hi - 2, hi - 3, hi - 4
    certs = work / "certs"
    certs.mkdir()
    ca = make_ca()
    write_pair(certs, "example.com", *ca)
    nginx_cert = write_pair(certs, "nginx.example.com", *make_leaf(ca, "nginx.example.com"))
    upstream = TLSUpstream(nginx, *nginx_cert)
    (work / "mesh.yaml").write_text(MESH.format(port_range=f"{lo}-{hi - 5}", python=sys.executable, hello=HELLO_APP,
                                                echo=TCP_ECHO_APP, http=http, https=https, tcp=tcp, nginx=nginx, p8080=p8080,
                                                egress=egress))
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        m = {"dir": work, "http": http, "https": https, "tcp": tcp, "p8080": p8080, "egress": egress, "certs": certs, "ca": ca}
        apply_text(m, HTTPBIN_GATEWAY)
        yield m
    finally:
        meshctl("down", cwd=work, check=False)
        upstream.close()


def http_url(mesh, path: str) -> list[str]:
    return ["-H", "Host: httpbin.example.com", f"http://127.0.0.1:{mesh['http']}{path}"]


# ---------------------------------------------------------------- authorization on the gateway

DENY_HEADERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-headers
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"""

# Istio's docs (tasks/security/authorization/authz-ingress), as written there
INGRESS_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress-policy
  namespace: istio-system
spec:
  selector:
    matchLabels:
      app: istio-ingressgateway
  action: ALLOW
  rules:
  - from:
    - source:
        remoteIpBlocks: ["1.2.3.4", "5.6.7.0/24"]
"""


def test_authorization_policy_selecting_the_gateway_is_enforced(mesh):
    assert curl(*http_url(mesh, "/headers"))[0] == "200"
    apply_text(mesh, DENY_HEADERS)
    try:
        code, body = curl(*http_url(mesh, "/headers"))
        assert code == "403" and "RBAC: access denied" in body
        assert curl(*http_url(mesh, "/status/200"))[0] == "200"
        # telemetry on the gateway as on sidecars: Istio's metric, with the denial counted
        import json

        admin = json.loads((mesh["dir"] / ".meshctl" / "ports.json").read_text())["istio-ingressgateway/admin"]
        stats = curl(f"http://127.0.0.1:{admin}/stats")[1]
        lines = [l for l in stats.splitlines() if l.startswith("istio_requests_total{") and 'response_code="403"' in l]
        assert lines and 'source_workload="istio-ingressgateway"' in lines[0], stats[:2000]
    finally:
        delete(mesh, "authorizationpolicy", "deny-headers")
    assert curl(*http_url(mesh, "/headers"))[0] == "200"


def test_remote_ip_blocks_use_x_forwarded_for_behind_num_trusted_proxies(mesh):
    apply_text(mesh, INGRESS_POLICY)
    try:
        # one trusted proxy (mesh.yaml numTrustedProxies: 1): the client is the last x-forwarded-for address
        assert curl("-H", "X-Forwarded-For: 5.6.7.8", *http_url(mesh, "/status/200"))[0] == "200"
        assert curl("-H", "X-Forwarded-For: 5.6.7.8, 1.2.3.4", *http_url(mesh, "/status/200"))[0] == "200"
        assert curl("-H", "X-Forwarded-For: 1.2.3.4, 9.9.9.9", *http_url(mesh, "/status/200"))[0] == "403"
        assert curl(*http_url(mesh, "/status/200"))[0] == "403"  # no header: the peer, 127.0.0.1
    finally:
        delete(mesh, "authorizationpolicy", "ingress-policy", "istio-system")
    assert curl(*http_url(mesh, "/status/200"))[0] == "200"


GATEWAY_RATE_LIMIT = """\
apiVersion: meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: ingress-limit}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  local: {tokenBucket: {maxTokens: 3, tokensPerFill: 3, fillInterval: 60s}}
"""


def test_a_rate_limit_selecting_the_gateway_answers_429_at_the_gateway(mesh):
    assert [curl(*http_url(mesh, "/status/200"))[0] for _ in range(5)] == ["200"] * 5
    apply_text(mesh, GATEWAY_RATE_LIMIT)
    try:
        codes = [curl(*http_url(mesh, "/status/200"))[0] for _ in range(5)]
        assert codes == ["200"] * 3 + ["429"] * 2, codes
    finally:
        delete(mesh, "ratelimit", "ingress-limit")
    assert curl(*http_url(mesh, "/status/200"))[0] == "200"


# ---------------------------------------------------------------- TLS termination (Istio's secure ingress task)

# tasks/traffic-management/ingress/secure-ingress, as written there
SECURE_GATEWAY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential # must be the same as secret
    hosts:
    - httpbin.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /delay
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
"""

# the same task, "Configure a TLS ingress gateway for multiple hosts"
MULTIPLE_HOSTS = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https-httpbin
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
    hosts:
    - httpbin.example.com
  - port:
      number: 443
      name: https-helloworld
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: helloworld-credential
    hosts:
    - helloworld.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: helloworld
spec:
  hosts:
  - helloworld.example.com
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        exact: /hello
    route:
    - destination:
        host: helloworld
        port:
          number: 5000
"""


def https(mesh, host: str, path: str, *extra: str) -> tuple[str, str]:
    return curl("--resolve", f"{host}:{mesh['https']}:127.0.0.1", *extra, f"https://{host}:{mesh['https']}{path}")


def plaintext_answer(port: int) -> bytes:
    """What a TLS port says to a plaintext HTTP request: must be nothing at all."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /status/200 HTTP/1.1\r\nHost: httpbin.example.com\r\n\r\n")
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return got


def served_subject(mesh, sni: str) -> str:
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{mesh['https']}", "-servername", sni],
                       input="", capture_output=True, text=True, timeout=15)
    return next((l for l in r.stdout.splitlines() if l.startswith("subject=")), r.stdout + r.stderr)


@pytest.fixture
def secure(mesh):
    """Secrets and Gateway of the secure ingress task; the HTTP gateway of the module restored after."""
    certs, ca = mesh["certs"], mesh["ca"]
    for host in ("httpbin", "helloworld"):
        c, k = write_pair(certs, f"{host}.example.com", *make_leaf(ca, f"{host}.example.com"))
        meshctl("secret", "create", "tls", f"{host}-credential", "--key", str(k), "--cert", str(c), "--replace", cwd=mesh["dir"])
    yield mesh
    meshctl("route", "delete", "gateway", "mygateway", cwd=mesh["dir"], check=False)
    for name in ("helloworld",):
        meshctl("route", "delete", "virtualservice", name, cwd=mesh["dir"], check=False)
    apply_text(mesh, HTTPBIN_GATEWAY)


def test_secure_ingress_simple_tls_with_curl_and_never_plaintext(secure):
    mesh = secure
    apply_text(mesh, SECURE_GATEWAY)
    cacert = str(mesh["certs"] / "example.com.crt")
    code, body = https(mesh, "httpbin.example.com", "/status/418", "--cacert", cacert)
    assert code == "200" and '"/status/418"' in body
    assert "httpbin.example.com" in served_subject(mesh, "httpbin.example.com")
    # the TLS port answers no plaintext: not a byte, whatever is asked
    assert plaintext_answer(mesh["https"]) == b""
    assert curl(f"http://127.0.0.1:{mesh['https']}/status/200", "-H", "Host: httpbin.example.com")[0] == "000"
    # a wrong CA is refused by the client: the certificate is the secret's
    other = make_ca("other.example")
    write_pair(mesh["certs"], "other", *other)
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", str(mesh["certs"] / "other.crt"))[0] == "000"


def test_several_servers_on_one_port_are_chosen_by_sni(secure):
    mesh = secure
    apply_text(mesh, SECURE_GATEWAY + "---\n" + MULTIPLE_HOSTS)
    cacert = str(mesh["certs"] / "example.com.crt")
    assert "CN=helloworld.example.com" in served_subject(mesh, "helloworld.example.com").replace(" ", "")
    assert "CN=httpbin.example.com" in served_subject(mesh, "httpbin.example.com").replace(" ", "")
    code, body = https(mesh, "helloworld.example.com", "/hello", "--cacert", cacert)
    assert code == "200" and '"/hello"' in body
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert)[0] == "200"
    # an SNI no server has: the handshake is refused
    assert "CN=" not in served_subject(mesh, "nobody.example.com")


SNI_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: sni-policy
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: ALLOW
  rules:
  - when:
    - key: connection.sni
      values: ["httpbin.*"]
"""


def test_connection_sni_is_the_server_name_the_client_sent(secure):
    mesh = secure
    apply_text(mesh, SECURE_GATEWAY + "---\n" + MULTIPLE_HOSTS)
    cacert = str(mesh["certs"] / "example.com.crt")
    assert https(mesh, "helloworld.example.com", "/hello", "--cacert", cacert)[0] == "200"
    apply_text(mesh, SNI_POLICY)
    try:
        assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert)[0] == "200"
        code, body = https(mesh, "helloworld.example.com", "/hello", "--cacert", cacert)
        assert code == "403" and "RBAC: access denied" in body
        # the TLS server name decides, not the Host header: SNI httpbin, Host helloworld is let through
        code, body = https(mesh, "httpbin.example.com", "/hello", "--cacert", cacert, "-H", "Host: helloworld.example.com")
        assert code == "200" and '"/hello"' in body
        # and HTTP/2 over the same TLS (the SNI rides on the connection, to each stream)
        assert https(mesh, "helloworld.example.com", "/hello", "--cacert", cacert, "--http2")[0] == "403"
        assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert, "--http2")[0] == "200"
    finally:
        delete(mesh, "authorizationpolicy", "sni-policy", "istio-system")
    assert https(mesh, "helloworld.example.com", "/hello", "--cacert", cacert)[0] == "200"


def test_a_replaced_secret_serves_new_connections_and_keeps_open_ones(secure):
    mesh = secure
    apply_text(mesh, SECURE_GATEWAY)
    ca1 = mesh["certs"] / "example.com.crt"
    ctx = ssl.create_default_context(cafile=str(ca1))
    raw = socket.create_connection(("127.0.0.1", mesh["https"]), timeout=10)
    conn = ctx.wrap_socket(raw, server_hostname="httpbin.example.com")

    def ask() -> bytes:
        conn.sendall(b"GET /status/200 HTTP/1.1\r\nHost: httpbin.example.com\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    assert ask().startswith(b"HTTP/1.1 200")
    ca2 = make_ca("example2.com")
    ca2_file, _ = write_pair(mesh["certs"], "example2.com", *ca2)
    c, k = write_pair(mesh["certs"], "httpbin2", *make_leaf(ca2, "httpbin.example.com"))
    meshctl("secret", "create", "tls", "httpbin-credential", "--key", str(k), "--cert", str(c), "--replace", cwd=mesh["dir"])
    deadline = time.monotonic() + 30  # waited for: generous for a loaded machine
    while https(mesh, "httpbin.example.com", "/status/200", "--cacert", str(ca2_file))[0] != "200":
        assert time.monotonic() < deadline, "the replaced secret was not picked up"
        time.sleep(0.3)
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", str(ca1))[0] == "000"
    assert ask().startswith(b"HTTP/1.1 200"), "the connection opened before the change was dropped"
    conn.close()
    listed = meshctl("secret", "list", cwd=mesh["dir"]).stdout
    assert "httpbin-credential" in listed and "BEGIN" not in listed
    key = mesh["dir"] / ".meshctl" / "secrets" / "httpbin-credential" / "tls.key"
    assert key.stat().st_mode & 0o777 == 0o600


MUTUAL = SECURE_GATEWAY.replace("mode: SIMPLE", "mode: MUTUAL")


def test_mutual_tls_requires_a_client_certificate_from_the_ca(secure):
    mesh = secure
    certs, ca = mesh["certs"], mesh["ca"]
    c, k = certs / "httpbin.example.com.crt", certs / "httpbin.example.com.key"
    # Istio's task: without the CA in the secret, MUTUAL cannot check clients: refused at apply
    r = apply_text(mesh, MUTUAL, check=False)
    assert r.returncode == 1 and "no CA certificate" in r.stderr + r.stdout
    meshctl("secret", "create", "tls", "httpbin-credential", "--key", str(k), "--cert", str(c),
            "--ca-cert", str(certs / "example.com.crt"), "--replace", cwd=mesh["dir"])
    apply_text(mesh, MUTUAL)
    client = write_pair(certs, "client.example.com", *make_leaf(ca, "client.example.com", client=True))
    cacert = str(certs / "example.com.crt")
    assert https(mesh, "httpbin.example.com", "/status/418", "--cacert", cacert)[0] == "000"  # no client certificate
    code, body = https(mesh, "httpbin.example.com", "/status/418", "--cacert", cacert,
                       "--cert", str(client[0]), "--key", str(client[1]))
    assert code == "200" and "/status/418" in body
    stranger = write_pair(certs, "stranger", *make_leaf(make_ca("evil"), "client.example.com", client=True))
    assert https(mesh, "httpbin.example.com", "/status/418", "--cacert", cacert,
                 "--cert", str(stranger[0]), "--key", str(stranger[1]))[0] == "000"
    assert plaintext_answer(mesh["https"]) == b""
    # openssl s_client with the client certificate: the handshake completes
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{mesh['https']}", "-servername", "httpbin.example.com",
                        "-CAfile", cacert, "-cert", str(client[0]), "-key", str(client[1]), "-ign_eof"],
                       input="GET /status/200 HTTP/1.1\r\nHost: httpbin.example.com\r\nConnection: close\r\n\r\n",
                       capture_output=True, text=True, timeout=15)
    assert "Verify return code: 0 (ok)" in r.stdout and "HTTP/1.1 200" in r.stdout
    # OPTIONAL_MUTUAL: no client certificate is fine, one from another CA is not
    apply_text(mesh, SECURE_GATEWAY.replace("mode: SIMPLE", "mode: OPTIONAL_MUTUAL"))
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert)[0] == "200"
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert,
                 "--cert", str(client[0]), "--key", str(client[1]))[0] == "200"
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert,
                 "--cert", str(stranger[0]), "--key", str(stranger[1]))[0] == "000"


def test_a_credential_whose_key_does_not_match_is_refused(secure):
    mesh = secure
    certs = mesh["certs"]
    c, _ = certs / "httpbin.example.com.crt", None
    _, other_key = write_pair(certs, "mismatch", *make_leaf(mesh["ca"], "x.example.com"))
    r = meshctl("secret", "create", "tls", "bad-credential", "--key", str(other_key), "--cert", str(c), cwd=mesh["dir"], check=False)
    assert r.returncode == 1 and "does not match" in r.stderr + r.stdout
    text = SECURE_GATEWAY.replace("credentialName: httpbin-credential # must be the same as secret",
                                  f"serverCertificate: {c}\n      privateKey: {other_key}")
    r = apply_text(mesh, text, check=False)
    assert r.returncode == 1 and "the private key does not match the certificate" in r.stderr + r.stdout


HTTPS_REDIRECT = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - httpbin.example.com
    tls:
      httpsRedirect: true
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
      minProtocolVersion: TLSV1_3
    hosts:
    - httpbin.example.com
"""


def test_https_redirect_and_min_protocol_version(secure):
    mesh = secure
    meshctl("route", "delete", "gateway", "httpbin-gateway", cwd=mesh["dir"])
    apply_text(mesh, HTTPS_REDIRECT + "---\n" + SECURE_GATEWAY.split("---\n", 1)[1])
    r = subprocess.run(["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                        "-H", "Host: httpbin.example.com", f"http://127.0.0.1:{mesh['http']}/status/200"],
                       capture_output=True, text=True, timeout=15)
    assert r.stdout == "301 https://httpbin.example.com/status/200"
    cacert = str(mesh["certs"] / "example.com.crt")
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert, "--tls-max", "1.2")[0] == "000"
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert, "--tlsv1.3")[0] == "200"
    # cipherSuites (TLS 1.2): only the listed suite is offered
    text = SECURE_GATEWAY.replace("credentialName: httpbin-credential # must be the same as secret",
                                  "credentialName: httpbin-credential\n      maxProtocolVersion: TLSV1_2\n"
                                  "      cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256]")
    apply_text(mesh, text)
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert, "--tlsv1.3")[0] == "000"
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert,
                 "--ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384")[0] == "000"
    assert https(mesh, "httpbin.example.com", "/status/200", "--cacert", cacert,
                 "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256")[0] == "200"
    apply_text(mesh, HTTPBIN_GATEWAY)


# ---------------------------------------------------------------- SNI passthrough (Istio's ingress-sni-passthrough task)

PASSTHROUGH = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: PASSTHROUGH
    hosts:
    - nginx.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: nginx
spec:
  hosts:
  - nginx.example.com
  gateways:
  - mygateway
  tls:
  - match:
    - port: 443
      sniHosts:
      - nginx.example.com
    route:
    - destination:
        host: my-nginx
        port:
          number: 443
"""


def test_sni_passthrough_reaches_the_upstreams_own_tls(mesh):
    apply_text(mesh, PASSTHROUGH)
    try:
        cacert = str(mesh["certs"] / "example.com.crt")
        code, body = https(mesh, "nginx.example.com", "/", "--cacert", cacert)
        assert code == "200" and "Welcome to nginx!" in body
        assert "CN=nginx.example.com" in served_subject(mesh, "nginx.example.com").replace(" ", "")
        assert plaintext_answer(mesh["https"]) == b""
        assert "CN=" not in served_subject(mesh, "other.example.com")  # no tls route for that SNI: closed
    finally:
        meshctl("route", "delete", "gateway", "mygateway", cwd=mesh["dir"], check=False)
        meshctl("route", "delete", "virtualservice", "nginx", cwd=mesh["dir"], check=False)


# ---------------------------------------------------------------- TCP (Istio's tcp traffic shifting task, unchanged files)


def echo_once(port: int, text: str = "world") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(text.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def test_tcp_echo_traffic_shifting_through_the_gateway(mesh):
    meshctl("route", "apply", "--wait", "-f", str(GW_DATA / "tcp-echo-all-v1.yaml"), cwd=mesh["dir"])
    try:
        assert {echo_once(mesh["tcp"]) for _ in range(10)} == {"one world"}
        meshctl("route", "apply", "--wait", "-f", str(GW_DATA / "tcp-echo-20-v2.yaml"), cwd=mesh["dir"])
        answers = [echo_once(mesh["tcp"]) for _ in range(100)]
        assert set(answers) == {"one world", "two world"}
        assert 5 <= answers.count("two world") <= 40, answers.count("two world")
    finally:
        for kind, name in (("gateway", "tcp-echo-gateway"), ("virtualservice", "tcp-echo"), ("destinationrule", "tcp-echo-destination")):
            meshctl("route", "delete", kind, name, cwd=mesh["dir"], check=False)


# ---------------------------------------------------------------- ports follow the Gateways


def _ingress_ports_in_status(mesh, want_port: int, present: bool) -> tuple[dict, str]:
    """`meshctl status` (JSON and table) once the ingress gateway's ports show ``want_port`` (or not)."""
    import json

    deadline = time.monotonic() + 15
    while True:
        st = json.loads(meshctl("status", "--json", cwd=mesh["dir"]).stdout)
        gw = next(g for g in st["gateways"] if g["name"] == "istio-ingressgateway")
        if (str(want_port) in gw["ports"]) == present or time.monotonic() > deadline:
            return gw, meshctl("status", cwd=mesh["dir"]).stdout
        time.sleep(0.3)


def test_a_gateway_applied_at_run_time_opens_its_port_and_deleting_it_closes_it(mesh):
    port = free_port()
    text = HTTPBIN_GATEWAY.replace("number: 80\n", f"number: {port}\n").replace("name: httpbin-gateway", "name: live-gateway")
    text = text.replace("name: httpbin\n", "name: httpbin-live\n").replace("- httpbin-gateway", "- live-gateway")
    apply_text(mesh, text)
    assert curl("-H", "Host: httpbin.example.com", f"http://127.0.0.1:{port}/status/200")[0] == "200"
    # `meshctl status` lists the live port beside mesh.yaml's mapped ones
    gw, table = _ingress_ports_in_status(mesh, port, True)
    assert gw["ports"][str(port)] == port and gw["ports"]["80"] == mesh["http"], gw
    assert f"127.0.0.1:{port}" in gw["address"] and f"{port}→127.0.0.1:{port}" in table, table
    meshctl("route", "delete", "gateway", "live-gateway", cwd=mesh["dir"])
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, f"port {port} still open after its Gateway was deleted"
        time.sleep(0.2)
    gw, table = _ingress_ports_in_status(mesh, port, False)
    assert str(port) not in gw["ports"] and f"{port}→" not in table, gw
    meshctl("route", "delete", "virtualservice", "httpbin-live", cwd=mesh["dir"], check=False)
    assert curl(*http_url(mesh, "/status/200"))[0] == "200"  # the other Gateway's port is untouched


def test_istios_current_bookinfo_gateway_on_8080_is_served_where_mesh_yaml_maps_8080(mesh):
    # samples/bookinfo/networking/bookinfo-gateway.yaml, unchanged (Gateway port 8080)
    meshctl("route", "apply", "--wait", "-f", str(GW_DATA / "bookinfo-gateway-8080.yaml"), cwd=mesh["dir"])
    try:
        code, body = curl(f"http://127.0.0.1:{mesh['p8080']}/productpage")
        assert code == "200" and '"/productpage"' in body
        assert curl(f"http://127.0.0.1:{mesh['p8080']}/nothing-routes-this")[0] == "404"
    finally:
        meshctl("route", "delete", "gateway", "bookinfo-gateway", cwd=mesh["dir"], check=False)
        meshctl("route", "delete", "virtualservice", "bookinfo", cwd=mesh["dir"], check=False)


# ---------------------------------------------------------------- egress gateway (Istio's egress-gateway tasks)

# tasks/traffic-management/egress/egress-gateway ("Egress gateway for HTTP traffic"), as written
# there, with the external host edition.cnn.com played by a local server: host localhost, its port.
EGRESS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: cnn
spec:
  hosts:
  - localhost
  ports:
  - number: {ext}
    name: http-port
    protocol: HTTP
  - number: {exts}
    name: https
    protocol: HTTPS
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: istio-egressgateway
spec:
  selector:
    istio: egressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - localhost
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: egressgateway-for-cnn
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: cnn
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: direct-cnn-through-egress-gateway
spec:
  hosts:
  - localhost
  gateways:
  - istio-egressgateway
  - mesh
  http:
  - match:
    - gateways:
      - mesh
      port: {ext}
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port:
          number: 80
      weight: 100
  - match:
    - gateways:
      - istio-egressgateway
      port: 80
    route:
    - destination:
        host: localhost
        port:
          number: {upstream}
      weight: 100
"""

# tasks/traffic-management/egress/egress-gateway-tls-origination: the gateway originates TLS
# (caCertificates added: the stand-in's CA is not in the system's trust store)
ORIGINATE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: originate-tls-for-edition-cnn-com
spec:
  host: localhost
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    portLevelSettings:
    - port:
        number: {exts}
      tls:
        mode: SIMPLE # initiates HTTPS for connections to edition.cnn.com
        caCertificates: {ca}
"""


class External:
    """The external host: HTTP, or HTTPS with its own certificate; records what it was sent."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                body = b"external " + self.path.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.srv.socket = ctx.wrap_socket(self.srv.socket, server_side=True)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def via_sidecar(outbound: int, url: str) -> tuple[str, str]:
    """curl through an app's sidecar, as the app's HTTP_PROXY sends it."""
    r = subprocess.run(["curl", "-s", "-m", "10", "-x", f"http://127.0.0.1:{outbound}", "-o", "-", "-w", "\n%{http_code}", url],
                       capture_output=True, text=True, timeout=15, env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    body, _, code = r.stdout.rpartition("\n")
    return code, body


def outbound_port(mesh, workload: str = "httpbin-v1-0") -> int:
    import json

    st = json.loads(meshctl("status", "--json", cwd=mesh["dir"]).stdout)
    w = next(w for w in st["workloads"] if w["name"] == workload)
    return int(w["outbound_address"].rsplit(":", 1)[1])


def test_egress_gateway_and_tls_origination(mesh):
    plain = External()
    secure = External(write_pair(mesh["certs"], "localhost", *make_leaf(mesh["ca"], "localhost")))
    out = outbound_port(mesh)
    applied = EGRESS.format(ext=plain.port, exts=secure.port, upstream=plain.port)
    try:
        apply_text(mesh, applied)
        # the app's request for the external host goes sidecar -> egress gateway -> external host
        code, body = via_sidecar(out, f"http://localhost:{plain.port}/politics")
        assert code == "200" and body == "external /politics"
        # without the egress gateway's Gateway, its port closes: the route through it fails (so it went through it)
        meshctl("route", "delete", "gateway", "istio-egressgateway", cwd=mesh["dir"])
        deadline = time.monotonic() + 15  # open connections drain first (the drain timeout, 5s)
        while via_sidecar(out, f"http://localhost:{plain.port}/politics")[0] == "200":
            assert time.monotonic() < deadline, "the egress gateway's port still serves after its Gateway was deleted"
            time.sleep(0.5)
        # TLS origination at the egress gateway: the app speaks HTTP, the external host gets HTTPS
        apply_text(mesh, EGRESS.format(ext=plain.port, exts=secure.port, upstream=secure.port)
                   + "---\n" + ORIGINATE.format(exts=secure.port, ca=mesh["certs"] / "example.com.crt"))
        code, body = via_sidecar(out, f"http://localhost:{plain.port}/politics")
        assert code == "200" and body == "external /politics"
        assert secure.seen and secure.seen[-1]["path"] == "/politics"
    finally:
        for kind, name in (("gateway", "istio-egressgateway"), ("virtualservice", "direct-cnn-through-egress-gateway"),
                           ("destinationrule", "egressgateway-for-cnn"), ("destinationrule", "originate-tls-for-edition-cnn-com"),
                           ("serviceentry", "cnn")):
            meshctl("route", "delete", kind, name, cwd=mesh["dir"], check=False)
        plain.close()
        secure.close()


ISTIO_MUTUAL = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: ISTIO_MUTUAL
    hosts:
    - httpbin.example.com
"""


def test_istio_mutual_admits_mesh_workload_certificates_only(secure):
    """ISTIO_MUTUAL: the gateway presents its mesh identity and requires a client
    certificate from the mesh CA with a SPIFFE ID (signed here with the mesh CA's key,
    as Citadel signs a workload's)."""
    mesh = secure
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca_dir = mesh["dir"] / ".meshctl" / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    ca_key = load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/sleep")]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    c, k = write_pair(mesh["certs"], "sleep-spiffe", leaf, key)
    chain = mesh["certs"] / "sleep-chain.pem"
    chain.write_bytes(c.read_bytes() + (ca_dir / "cert-chain.pem").read_bytes())
    apply_text(mesh, ISTIO_MUTUAL + "---\n" + SECURE_GATEWAY.split("---\n", 1)[1])
    # the gateway's certificate carries a SPIFFE ID, not the host name: -k for the name, the client cert is the point
    assert https(mesh, "httpbin.example.com", "/status/200", "-k")[0] == "000"  # no client certificate
    code, body = https(mesh, "httpbin.example.com", "/status/200", "-k", "--cert", str(chain), "--key", str(k))
    assert code == "200" and "/status/200" in body
    stranger = write_pair(mesh["certs"], "stranger2", *make_leaf(mesh["ca"], "client.example.com", client=True))
    assert https(mesh, "httpbin.example.com", "/status/200", "-k", "--cert", str(stranger[0]), "--key", str(stranger[1]))[0] == "000"
    assert plaintext_answer(mesh["https"]) == b""
