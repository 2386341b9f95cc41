"""Gateway configuration meshctl would not carry out is refused by name at
`route validate` and `route apply`, and a Gateway port no gateway of mesh.yaml
serves is an error naming the Gateway, the port and the mesh.yaml line."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshctl.cli.main import app
from tests.tools.certs import self_signed

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


def test_istio_bookinfo_gateway_on_8080_applies_and_is_served_on_8080_itself(run):
    r = run("route", "apply", "-f", str(GW / "bookinfo-gateway-8080.yaml"))
    assert r.exit_code == 0, r.output


def test_an_unmapped_port_that_is_another_gateway_ports_host_port_names_the_line_to_fix(run, tmp_path):
    assert run("route", "apply", "-f", str(ISTIO / "bookinfo-gateway.yaml")).exit_code == 0  # 80, served on 8080
    text = (GW / "bookinfo-gateway-8080.yaml").read_text().replace("name: bookinfo-gateway", "name: bookinfo-gateway-2", 1)
    Path("gw2.yaml").write_text(text)
    r = run("route", "apply", "-f", "gw2.yaml")
    out = " ".join(r.output.split())
    assert r.exit_code == 1
    assert "gw2.yaml:12: spec.servers[0].port.number: Gateway default/bookinfo-gateway-2 port 8080" in out
    assert "serves Gateway port 80 on host port 8080" in out
    assert f"add '8080: HOST_PORT' to its ports: at {tmp_path / 'mesh.yaml'}:10 (e.g. ports: {{80: 8080, 8080: 8081}})" in out


def test_a_port_below_1024_this_user_cannot_bind_is_an_error_naming_the_mesh_line():
    from meshctl.loader.gateways import MeshGateways, gateway_port_findings
    from meshctl.loader.resources import load_resources
    from meshctl.model.base import FrozenDict
    from meshctl.model.mesh import GatewaySpec

    mesh = MeshGateways("mesh.yaml", (GatewaySpec("istio-ingressgateway", FrozenDict(istio="ingressgateway"), FrozenDict({80: 8080})),), (10,))
    res = load_resources([ISTIO / "bookinfo-gateway.yaml"])
    gw = [r for r in res if r.kind == "Gateway"][0]
    import dataclasses
    server = dataclasses.replace(gw.spec.servers[0], port=dataclasses.replace(gw.spec.servers[0].port, number=443))
    gw = dataclasses.replace(gw, spec=dataclasses.replace(gw.spec, servers=(server,)))
    (f,) = gateway_port_findings([gw], mesh, bind_refused=lambda port: "a port below 1024 needs privileges")
    assert f.level == "error" and f.field == "spec.servers[0].port.number"
    assert "Gateway default/bookinfo-gateway port 443: gateway istio-ingressgateway cannot listen on port 443" in f.message
    assert "add '443: HOST_PORT' to its ports: at mesh.yaml:10 (e.g. ports: {80: 8080, 443: 8443})" in f.message
    assert gateway_port_findings([gw], mesh, bind_refused=lambda port: None) == []


def test_a_gateway_port_mesh_yaml_maps_applies(run):
    r = run("route", "apply", "-f", str(ISTIO / "bookinfo-gateway.yaml"))  # port 80, mapped 80 → 8080
    assert r.exit_code == 0, r.output


def test_a_gateway_selecting_no_mesh_gateway_is_a_warning(run):
    text = (ISTIO / "bookinfo-gateway.yaml").read_text().replace("istio: ingressgateway", "istio: ingress")
    Path("gw.yaml").write_text(text)
    r = run("route", "validate", "-f", "gw.yaml")
    assert r.exit_code == 0
    assert "selects no gateway of" in r.output and "configures nothing" in r.output


def test_tcp_echo_task_validates_with_a_mesh_port_for_31400(run):
    Path("mesh.yaml").write_text(MESH.replace("{80: 8080}", "{80: 8080, 31400: 31400}"))
    r = run("route", "validate", "-f", str(GW / "tcp-echo-all-v1.yaml"))
    assert r.exit_code == 0, r.output


def test_unimplemented_l4_matches_and_sidecar_tls_routes_are_refused_by_name(run):
    Path("vs.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: t\nspec:\n  hosts: [a.example.com]\n"
        "  tls:\n  - match:\n    - sniHosts: [a.example.com]\n      sourceLabels: {app: x}\n"
        "    route:\n    - destination: {host: a}\n"
    )
    r = run("route", "validate", "-f", "vs.yaml")
    out = " ".join(r.output.split())
    assert r.exit_code == 1
    assert "vs.yaml:8: spec.tls[0]: meshctl does not implement tls routes on sidecars" in out
    text = Path("vs.yaml").read_text().replace("  tls:\n", "  gateways: [gw]\n  tls:\n")
    Path("vs.yaml").write_text(text)
    out = " ".join(run("route", "validate", "-f", "vs.yaml").output.split())
    assert "tls routes on sidecars" not in out
    assert "vs.yaml:11: spec.tls[0].match[0].sourceLabels: meshctl does not implement" in out


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


def test_bind_and_a_missing_credential_are_refused_at_validate_and_apply(run):
    Path("gw.yaml").write_text(SECURE)
    for cmd in ("validate", "apply"):
        r = run("route", cmd, "-f", "gw.yaml")
        out = " ".join(r.output.split())
        assert r.exit_code == 1, out
        assert "gw.yaml:18: spec.servers[0].bind: meshctl does not implement bind" in out
        assert ("gw.yaml:15: spec.servers[0].tls.credentialName: Gateway default/mygateway: secret 'httpbin-credential' "
                "not found: create it first with `meshctl secret create tls httpbin-credential") in out
    assert "mygateway" not in run("route", "get").output


def test_auto_passthrough_and_tls_settings_on_plain_http_are_refused(run):
    Path("gw.yaml").write_text(
        SECURE.replace("    bind: 127.0.0.2\n", "").replace("mode: SIMPLE\n      credentialName: httpbin-credential", "mode: AUTO_PASSTHROUGH")
        + "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n    tls: {mode: SIMPLE, credentialName: c}\n"
    )
    out = " ".join(run("route", "validate", "-f", "gw.yaml").output.split())
    assert "gw.yaml:14: spec.servers[0].tls.mode: meshctl does not implement" in out
    assert "spec.servers[1].tls.mode: tls.mode needs protocol HTTPS or TLS, not HTTP" in out


def test_a_credential_name_that_is_a_path_is_refused_not_read(run, tmp_path):
    """credentialName is a Kubernetes Secret name (a DNS-1123 subdomain), not a file path:
    a name with '/' or '..' reaching a certificate outside the secrets directory is refused."""
    c, k = self_signed(tmp_path)
    assert run("secret", "create", "tls", "outside", "--cert", str(c), "--key", str(k)).exit_code == 0
    (tmp_path / ".meshctl" / "secrets" / "outside").rename(tmp_path / "elsewhere")  # a directory outside the store
    base = SECURE.replace("    bind: 127.0.0.2\n", "")
    for bad in ("../../elsewhere", str(tmp_path / "elsewhere"), "a..b", "Upper", "-x"):
        Path("gw.yaml").write_text(base.replace("credentialName: httpbin-credential", f"credentialName: '{bad}'"))
        for cmd in ("validate", "apply"):
            r = run("route", cmd, "-f", "gw.yaml")
            out = " ".join(r.output.split())
            assert r.exit_code == 1, (bad, cmd, out)
            assert "gw.yaml:15: spec.servers[0].tls.credentialName:" in out and "not a valid secret name" in out, out
    assert "mygateway" not in run("route", "get").output
    # a good name still works
    assert run("secret", "create", "tls", "httpbin-credential.v1", "--cert", str(c), "--key", str(k)).exit_code == 0
    Path("gw.yaml").write_text(base.replace("credentialName: httpbin-credential", "credentialName: httpbin-credential.v1"))
    r = run("route", "apply", "-f", "gw.yaml")
    assert r.exit_code == 0, r.output
