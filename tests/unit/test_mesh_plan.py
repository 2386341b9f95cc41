"""mesh.yaml: loading with file:line errors, and the plan `up` runs."""


import pytest

from meshctl.loader.codec import LoadError
from meshctl.supervisor.plan import load_mesh, make_plan, workload_node

MESH = """\
settings:
  portRange: 30000-30099
services:
- name: productpage
  port: 9080
  healthCheck: {http: /health}
  versions:
  - name: v1
    command: [python3, app.py]
- name: reviews
  port: 9080
  upstreams: {ratings: 9091}
  versions:
  - {name: v1, command: [python3, app.py], replicas: 2}
- name: ratings
  port: 9080
  versions:
  - {name: v1, address: "127.0.0.1:7000"}
gateways:
- name: ingress
  labels: {istio: ingressgateway}
  ports: {80: 8080}
"""


def write(tmp_path, text):
    p = tmp_path / "mesh.yaml"
    p.write_text(text)
    return p


def test_plan_gives_every_instance_its_own_ports_and_env(tmp_path):
    spec = load_mesh(write(tmp_path, MESH))
    plan = make_plan(spec, tmp_path, lambda p: True)
    names = [w.name for w in plan.workloads]
    assert names == ["productpage-v1-0", "reviews-v1-0", "reviews-v1-1", "ratings-v1-0"]
    ports = [p for w in plan.workloads for p in (w.inbound_port, w.outbound_port, w.admin_port)]
    assert len(ports) == len(set(ports)) and all(30000 <= p <= 30099 for p in ports)
    r0, r1 = plan.workloads[1], plan.workloads[2]
    # Replicas share the host: the declared binding port goes to one, the other gets its own.
    assert r0.bindings["ratings"] == 9091 and r1.bindings["ratings"] != 9091
    assert r0.env["RATINGS_ADDR"] == "127.0.0.1:9091"
    assert r0.env["HTTP_PROXY"] == f"http://127.0.0.1:{r0.outbound_port}"
    assert "127.0.0.1" in r0.env["NO_PROXY"]
    assert r0.labels == {"app": "reviews", "version": "v1"}
    ratings = plan.workloads[3]
    assert (ratings.app_host, ratings.app_port, ratings.command) == ("127.0.0.1", 7000, ())


def test_plan_keeps_earlier_allocations_and_skips_busy_ports(tmp_path):
    spec = load_mesh(write(tmp_path, MESH))
    first = make_plan(spec, tmp_path, lambda p: True)
    again = make_plan(spec, tmp_path, lambda p: False, first.allocations)  # nothing else free: all reused
    assert again.workloads == first.workloads
    busy = {30000, 30001}
    plan = make_plan(spec, tmp_path, lambda p: p not in busy)
    assert not busy & set(plan.allocations.values())


def test_control_plane_ports_come_from_the_range_and_stay_across_plans(tmp_path):
    spec = load_mesh(write(tmp_path, MESH))
    plan = make_plan(spec, tmp_path, lambda p: True)
    control = {plan.pilot_port, plan.mixer_port, plan.citadel_port}
    assert len(control) == 3 and all(30000 <= p <= 30099 for p in control)
    workload_ports = {p for w in plan.workloads for p in (w.app_port, w.inbound_port, w.outbound_port, w.admin_port)}
    assert not control & workload_ports
    again = make_plan(spec, tmp_path, lambda p: False, plan.allocations)  # all busy (ours): kept
    assert (again.mixer_port, again.citadel_port) == (plan.mixer_port, plan.citadel_port)


def test_node_declares_inbound_outbound_and_binding_listeners(tmp_path):
    spec = load_mesh(write(tmp_path, MESH))
    w = make_plan(spec, tmp_path, lambda p: True).workloads[1]
    node = workload_node(w, spec)
    kinds = {l.name: (l.direction, l.port) for l in node.listeners}
    assert kinds["inbound"] == ("inbound", w.inbound_port)
    assert kinds["binding-ratings"] == ("binding", 9091)
    assert next(l for l in node.listeners if l.name == "inbound").app_port == w.app_port


def test_service_account_names_the_workload_identity_and_defaults_to_the_service(tmp_path):
    spec = load_mesh(write(tmp_path, MESH.replace("- name: reviews\n", "- name: reviews\n  serviceAccount: bookinfo-reviews\n")))
    plan = make_plan(spec, tmp_path, lambda p: True)
    ids = {w.name: workload_node(w, spec).workload.spiffe_id for w in plan.workloads}
    assert ids["reviews-v1-1"] == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    assert ids["productpage-v1-0"] == "spiffe://cluster.local/ns/default/sa/productpage"


@pytest.mark.parametrize(
    "bad, message",
    [
        (MESH.replace("portRange: 30000-30099", "portRange: 30000-"), "mesh.yaml:2: settings.portRange: '30000-' is not a port range"),
        (MESH.replace("name: reviews", "name: Reviews"), "mesh.yaml:10: services[1].name: 'Reviews' is not a DNS label"),
        (MESH.replace("{name: v1, address: \"127.0.0.1:7000\"}", "{name: v1}"), "mesh.yaml:18: services[2].versions[0]: give exactly one of command"),
        (MESH.replace("healthCheck: {http: /health}", "healthCheck: {htp: /health}"), "mesh.yaml:6: services[0].healthCheck.htp: unknown field (did you mean http?)"),
        (MESH.replace("port: 9080\n  upstreams", "port: many\n  upstreams"), "mesh.yaml:11: services[1].port:"),
        (MESH + "- name: second\n  ports: {81: 8080}\n", "gateways[1].ports.81: host port 8080 is already used by ingress"),
        (MESH.replace("- name: reviews\n", "- name: reviews\n  serviceAccount: bookinfo/reviews\n"),
         "mesh.yaml:11: services[1].serviceAccount: 'bookinfo/reviews' cannot be part of a SPIFFE ID"),
    ],
)
def test_bad_mesh_files_name_file_line_and_field(tmp_path, bad, message):
    with pytest.raises(LoadError) as e:
        load_mesh(write(tmp_path, bad))
    assert message in str(e.value).replace(str(tmp_path) + "/", "")


def test_gateways_register_in_the_hosts_locality_as_workloads_do(tmp_path):
    # the host's locality (settings.locality; `up --locality` replaces it the same way) is
    # in the registry metadata of the gateway's instances too, so Pilot gives their
    # endpoints a locality and callers' locality load balancing sees them where they run
    from dataclasses import replace

    from meshctl.loader.resources import load_resources_text
    from meshctl.pilot.compile import META_LOCALITY, Inputs, compile_proxy
    from meshctl.supervisor.registration import gateway_instances, workload_instance

    spec = load_mesh(write(tmp_path, MESH.replace("  portRange: 30000-30099\n",
                                                  "  portRange: 30000-30099\n  locality: region1/zone1\n")))
    for locality in ("region1/zone1", "region2/zone3/sub"):
        spec = replace(spec, settings=replace(spec.settings, locality=locality))
        plan = make_plan(spec, tmp_path, lambda p: True)
        gw = gateway_instances(plan.gateways[0])
        assert [i.meta[META_LOCALITY] for i in gw] == [locality]
        assert workload_instance(plan.workloads[0]).meta[META_LOCALITY] == locality
        snap = {"ingress.istio-system": tuple(gw)}
        cfg = compile_proxy(Inputs(load_resources_text("", "r.yaml"), snap), workload_node(plan.workloads[0], spec))
        eps = [e for c in cfg.clusters.values() if c.service.startswith("ingress.istio-system") for e in c.endpoints]
        assert eps and {e.locality for e in eps} == {locality}
    # in a registry every host shares (Consul, Eureka) the ids name the host: where each is registered
    w = plan.workloads[0]
    assert workload_instance(w).id == w.name  # the embedded registry: one host
    assert workload_instance(w, shared=True).id == f"{w.name}@{w.address}:{w.inbound_port}"
    shared = gateway_instances(plan.gateways[0], "10.0.0.11", shared=True)
    assert [i.id for i in shared] == [f"{plan.gateways[0].name}-{p}@{i.address}:{i.port}"
                                      for p, i in zip(sorted(plan.gateways[0].ports), shared)]
    # without a host locality, none is claimed
    spec = replace(spec, settings=replace(spec.settings, locality=""))
    assert META_LOCALITY not in gateway_instances(make_plan(spec, tmp_path, lambda p: True).gateways[0])[0].meta
