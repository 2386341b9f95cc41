"""Gateway configuration meshctl would not carry out is refused by name at
`route validate` and `route apply`, and a Gateway port no gateway of mesh.yaml
serves is an error naming the Gateway, the port and the mesh.yaml line."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshctl.cli.main import app

ROOT = Path(__file__).parents[2]
GW = ROOT / "tests" / "data" / "istio-gateways"
ISTIO = ROOT / "tests" / "data" / "istio"

MESH = """\
services:
- name: productpage
  port: 9080
  versions:
  - name: v1
    address: 127.0.0.1:9080
gateways:
- name: istio-ingressgateway
  labels: {istio: ingressgateway}
  ports: {80: 8080}
"""


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".meshctl").mkdir()
    (tmp_path / "mesh.yaml").write_text(MESH)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def test_istio_bookinfo_gateway_on_8080_names_the_mesh_yaml_line_that_would_serve_it(run, tmp_path):
    r = run("route", "apply", "-f", str(GW / "bookinfo-gateway-8080.yaml"))
    assert r.exit_code == 1
    out = " ".join(r.output.split())
    assert f"{GW / 'bookinfo-gateway-8080.yaml'}:12: spec.servers[0].port.number" in out
    assert "Gateway default/bookinfo-gateway port 8080" in out
    assert f"add '8080: HOST_PORT' to its ports: at {tmp_path / 'mesh.yaml'}:10" in out
    assert "nothing applied" in out
    assert "bookinfo-gateway" not in run("route", "get").output
    r = run("route", "validate", "-f", str(GW / "bookinfo-gateway-8080.yaml"))
    assert r.exit_code == 1 and "port 8080" in r.output


def test_a_gateway_port_mesh_yaml_maps_applies(run):
    r = run("route", "apply", "-f", str(ISTIO / "bookinfo-gateway.yaml"))  # port 80, mapped 80 → 8080
    assert r.exit_code == 0, r.output


def test_a_gateway_selecting_no_mesh_gateway_is_a_warning(run):
    text = (ISTIO / "bookinfo-gateway.yaml").read_text().replace("istio: ingressgateway", "istio: ingress")
    Path("gw.yaml").write_text(text)
    r = run("route", "validate", "-f", "gw.yaml")
    assert r.exit_code == 0
    assert "selects no gateway of" in r.output and "configures nothing" in r.output


def test_tcp_echo_task_is_refused_by_name_until_tcp_gateway_servers_exist(run):
    r = run("route", "validate", "-f", str(GW / "tcp-echo-all-v1.yaml"), "--mesh", "mesh.yaml")
    out = " ".join(r.output.split())
    assert r.exit_code == 1
    assert "tcp-echo-all-v1.yaml:26: spec.servers[0].port.protocol: meshctl does not implement Gateway servers with protocol TCP" in out
    assert "tcp-echo-all-v1.yaml:54: spec.tcp[0]: meshctl does not implement tcp routes on gateways" in out


SECURE = """\
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
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
    hosts:
    - httpbin.example.com
    bind: 127.0.0.2
"""


def test_gateway_tls_and_bind_are_refused_never_served_as_plaintext(run):
    Path("gw.yaml").write_text(SECURE)
    for cmd in ("validate", "apply"):
        r = run("route", cmd, "-f", "gw.yaml")
        out = " ".join(r.output.split())
        assert r.exit_code == 1, out
        assert "gw.yaml:13: spec.servers[0].tls: meshctl does not implement TLS on Gateway servers" in out
        assert "gw.yaml:18: spec.servers[0].bind: meshctl does not implement Gateway server bind addresses" in out
    assert "mygateway" not in run("route", "get").output
