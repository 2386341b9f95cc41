"""`meshctl route ...` as a user types it (typer's runner, no Pilot running:
the store in the state directory is the source of truth)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshctl.cli.main import app
from meshctl.model.base import FrozenDict
from meshctl.registry.base import Instance

ROOT = Path(__file__).parents[2]
RULES = ROOT / "examples" / "bookinfo" / "rules"
BAD = ROOT / "tests" / "data" / "bad"


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".meshctl").mkdir()
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def test_apply_get_delete_history_rollback(run):
    r = run("route", "apply", "-f", str(RULES / "virtual-service-all-v1.yaml"))
    assert r.exit_code == 0, r.output
    assert "virtualservice.networking.istio.io/reviews created" in r.output
    assert "Pilot is not running" in r.output
    r = run("route", "apply", "-f", str(RULES / "virtual-service-all-v1.yaml"))
    assert "reviews unchanged" in r.output
    r = run("route", "apply", "-f", str(RULES / "virtual-service-reviews-v3.yaml"))
    assert "reviews configured" in r.output
    r = run("route", "get", "vs", "reviews", "-o", "yaml")
    assert r.exit_code == 0 and "subset: v3" in r.output
    r = run("route", "history")
    assert "apply VirtualService/reviews" in r.output
    r = run("route", "rollback")
    assert "rollback to revision 1" in r.output
    assert "subset: v1" in run("route", "get", "virtualservice", "reviews", "-o", "yaml").output
    r = run("route", "delete", "virtualservice", "reviews")
    assert "deleted" in r.output
    r = run("route", "get", "virtualservice", "reviews")
    assert r.exit_code == 1 and "not found" in r.output


def test_apply_checks_new_rules_against_the_applied_ones(run):
    # Istio's task order: the DestinationRules first, then a VirtualService using their subsets
    r = run("route", "apply", "-f", str(RULES / "destination-rule-all.yaml"), "-f", str(RULES / "bookinfo-gateway.yaml"))
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    r = run("route", "apply", "-f", str(RULES / "virtual-service-reviews-test-v2.yaml"))
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    # a second VirtualService for a host that one already applied routes: said, and applied
    text = (RULES / "virtual-service-reviews-v3.yaml").read_text().replace("name: reviews", "name: reviews-canary")
    Path("other.yaml").write_text(text)
    r = run("route", "apply", "-f", "other.yaml")
    assert r.exit_code == 0
    assert "other.yaml" in r.output and "conflicting VirtualServices for host 'reviews'" in r.output
    assert "VirtualService default/reviews" in r.output
    # a subset no applied DestinationRule defines is still an error, naming the rule that is there
    Path("bad.yaml").write_text(text.replace("subset: v3", "subset: v4").replace("reviews-canary", "reviews"))
    r = run("route", "apply", "-f", "bad.yaml")
    assert r.exit_code == 1 and "defines v1, v2, v3, not 'v4'" in r.output


def test_validate_names_file_line_and_field_and_exits_nonzero(run):
    r = run("route", "validate", "-f", str(BAD / "bad-duration.yaml"))
    assert r.exit_code == 1
    assert "bad-duration.yaml:8: spec.http[0].timeout" in r.output


def test_apply_of_a_bad_file_applies_nothing(run, tmp_path):
    r = run("route", "apply", "-f", str(RULES / "virtual-service-all-v1.yaml"), "-f", str(BAD / "unknown-field.yaml"))
    assert r.exit_code == 1
    assert "unknown field" in r.output
    assert run("route", "get").output.count("VirtualService") == 0


def test_validate_good_samples_passes(run):
    r = run("route", "validate", "-f", str(RULES))
    assert r.exit_code == 0, r.output
    assert "valid" in r.output


def test_explain_offline_uses_the_stored_rules_and_registry(run, tmp_path):
    import trio

    from meshctl.registry.embedded import EmbeddedRegistry

    async def register():
        reg = EmbeddedRegistry(tmp_path / ".meshctl")
        for v in ("v1", "v2"):
            await reg.register(Instance(id=f"reviews-{v}-0", service="reviews", address="127.0.0.1", port=21000 + int(v[1]),
                                        labels=FrozenDict(app="reviews", version=v), meta=FrozenDict({"meshctl.io/service-port": "9080"})))

    trio.run(register)
    run("route", "apply", "-f", str(RULES / "destination-rule-all.yaml"), "-f", str(RULES / "virtual-service-reviews-test-v2.yaml"))
    r = run("route", "explain", "GET", "http://reviews:9080/reviews/0", "-H", "end-user: jason", "--from", "productpage")
    assert r.exit_code == 0, r.output
    assert "outbound|9080|v2|reviews.default.svc.cluster.local" in r.output
    assert "reviews-v2-0" in r.output and "reviews-v1-0" not in r.output
    r = run("route", "explain", "GET", "http://reviews:9080/reviews/0", "--from", "productpage")
    assert "outbound|9080|v1|reviews.default.svc.cluster.local" in r.output
    # no productpage proxy has registered here: said, not silently explained for a made-up caller
    assert "warning: no proxy of service 'productpage' runs in this mesh" in " ".join(r.output.split())


def test_commands_without_a_state_dir_say_so(tmp_path, monkeypatch):
    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["route", "get"])
    assert r.exit_code == 1
    assert "no mesh state directory" in r.output


def test_commands_find_the_mesh_up_started_last_from_any_directory(tmp_path, monkeypatch):
    from meshctl.state import remember_current

    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    mesh = tmp_path / "examples" / "bookinfo" / ".meshctl"
    mesh.mkdir(parents=True)
    (mesh / "control.json").write_text("{}")
    remember_current(mesh)  # what `meshctl up` does
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    runner = CliRunner()
    r = runner.invoke(app, ["route", "apply", "-f", str(RULES / "virtual-service-all-v1.yaml")])
    assert r.exit_code == 0, r.output
    assert (mesh / "rules" / "current").exists()
    # A .meshctl found upward still wins over the recorded one.
    (elsewhere / ".meshctl").mkdir()
    r = runner.invoke(app, ["route", "get"])
    assert "VirtualService" not in r.output


def test_validate_of_the_example_folder_names_each_redefined_resource_once(run):
    # Istio's samples are alternatives to each other: several files define the same
    # VirtualService on purpose. One warning per resource, not one per extra definition.
    r = run("route", "validate", "-f", str(RULES))
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if " is defined " in line]
    assert sum("VirtualService default/reviews is defined" in line for line in lines) == 1
    assert "VirtualService default/reviews is defined 7 times" in r.output
    assert len(lines) == len({line.split(": ", 3)[-1].split(" is defined ")[0] for line in lines}) <= 7


def test_validate_judges_files_with_the_applied_rules_as_apply_does(run, tmp_path):
    # validate said "valid" (a warning: no DestinationRule for reviews) for a subset the applied
    # DestinationRule lacks, and then apply refused the same file: both now say error, naming it.
    assert run("route", "apply", "-f", str(RULES / "destination-rule-all.yaml")).exit_code == 0
    f = tmp_path / "vs.yaml"
    f.write_text((RULES / "virtual-service-reviews-v3.yaml").read_text().replace("subset: v3", "subset: v9"))
    for cmd in ("validate", "apply"):
        r = run("route", cmd, "-f", str(f))
        assert r.exit_code == 1, (cmd, r.output)
        out = " ".join(r.output.split())
        assert "vs.yaml:12: spec.http[0].route[0].destination.subset: referenced subset not found: DestinationRule " \
               "default/reviews for host 'reviews' defines v1, v2, v3, not 'v9'" in out, (cmd, out)
    # and a subset the applied rule defines is valid without the DestinationRule in the files
    r = run("route", "validate", "-f", str(RULES / "virtual-service-reviews-v3.yaml"))
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert "1 resource(s) valid with the 4 rule(s) applied to the mesh in" in " ".join(r.output.split())


def test_a_weights_error_says_error_like_the_others(run, tmp_path):
    f = tmp_path / "vs.yaml"
    f.write_text("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v2}, weight: 40}
""")
    r = run("route", "validate", "-f", str(f))
    assert r.exit_code == 1
    (line,) = [line for line in r.output.splitlines() if "weights sum" in line]
    assert line.startswith("error: ") and "vs.yaml:" in line, r.output


def test_apply_says_when_an_injected_fault_overrides_the_routes_just_applied(run):
    assert run("route", "apply", "-f", str(RULES / "destination-rule-all.yaml"),
               "-f", str(RULES / "virtual-service-all-v1.yaml")).exit_code == 0
    r = run("inject-fault", "ratings", "--delay", "7s", "--match", "header:end-user=jason", "--ttl", "5m")
    assert r.exit_code == 0, r.output
    fault_id = r.output.split()[1]
    r = run("route", "apply", "-f", str(RULES / "virtual-service-ratings-test-abort.yaml"))
    assert r.exit_code == 0, r.output
    assert f"injected fault {fault_id} (delay 7s" in r.output and "overrides the routes of ratings" in r.output
    assert "meshctl inject-fault clear ratings" in r.output
    # Rules for another service say nothing of it; once cleared, neither do ratings' rules.
    assert "injected fault" not in run("route", "apply", "-f", str(RULES / "virtual-service-reviews-v3.yaml")).output
    assert run("inject-fault", "clear", "ratings").exit_code == 0
    assert "injected fault" not in run("route", "apply", "-f", str(RULES / "virtual-service-ratings-test-delay.yaml")).output


MIRROR_VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - route:
    - destination: {host: echo}
    mirror:
      host: %s
    mirrorPercentage: {value: 100.0}
  - route:
    - destination: {host: echo}
    mirrors:
    - destination: {host: %s}
"""


def test_a_mirror_to_an_http2_or_grpc_service_is_valid_and_applied(run, tmp_path):
    # shadows to a service declared grpc/http2 go over HTTP/2 (proxy/mirror.py,
    # tests/integration/test_mirror_h2.py): no longer refused
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("""services:
- name: echo
  port: 9090
  protocol: grpc
  versions: [{name: v1, address: "127.0.0.1:9"}]
- name: echo-h2
  port: 9091
  protocol: http2
  versions: [{name: v1, address: "127.0.0.1:9"}]
""")
    f = tmp_path / "vs.yaml"
    f.write_text(MIRROR_VS % ("echo", "echo-h2.default.svc.cluster.local"))
    for cmd in ("validate", "apply"):
        r = run("route", cmd, "-f", str(f), "--mesh", str(mesh))
        assert r.exit_code == 0 and "error" not in r.output, (cmd, r.output)
    assert "VirtualService" in run("route", "get").output
