"""Pilot's compiler with services that something other than meshctl registered
(a Consul service without meshctl's meta, a Eureka app in upper case)."""

from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload, cluster_name
from meshctl.pilot.compile import Inputs, Node, compile_proxy
from meshctl.registry.base import Instance

FQ = "{}.default.svc.cluster.local"

CLIENT = Node(
    Workload(name="client-v1-0", service="client", labels=FrozenDict(app="client", version="v1")),
    (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=15001),),
)


def mesh_instance(svc: str, port: int) -> Instance:
    return Instance(
        id=f"{svc}-v1-0", service=svc, address="127.0.0.1", port=port,
        labels=FrozenDict(app=svc, version="v1"),
        meta=FrozenDict({"meshctl.io/service-port": "9080", "meshctl.io/sidecar": "true"}),
    )


def outbound_domains(cfg) -> dict[str, tuple[str, ...]]:
    return {vh.name: vh.domains for vh in cfg.route_tables["outbound"].virtual_hosts}


def test_a_foreign_consul_service_is_reached_on_its_own_port_without_sidecar_identity():
    billing = Instance(id="billing-1", service="billing", address="10.0.0.7", port=8123, labels=FrozenDict(team="pay"))
    cfg = compile_proxy(Inputs([], {"billing": (billing,), "reviews": (mesh_instance("reviews", 21003),)}), CLIENT)
    # The client asks for http://billing:8123/: the service port is the instance's own port.
    assert "billing" in outbound_domains(cfg)[f"{FQ.format('billing')}:8123"]
    eps = cfg.clusters[cluster_name(FQ.format("billing"), 8123)].endpoints
    assert [(e.address, e.port, e.identity) for e in eps] == [("10.0.0.7", 8123, None)]
    # meshctl's own instances keep their service port and their SPIFFE identity.
    (rev,) = cfg.clusters[cluster_name(FQ.format("reviews"), 9080)].endpoints
    assert rev.port == 21003 and rev.identity == "spiffe://cluster.local/ns/default/sa/reviews"


def test_service_names_in_upper_case_answer_to_the_lower_case_host():
    a = Instance(id="host-a:PAYMENTS:7001", service="PAYMENTS", address="127.0.0.1", port=7001)
    b = Instance(id="host-b:payments:7001", service="payments", address="127.0.0.2", port=7001)
    cfg = compile_proxy(Inputs([], {"PAYMENTS": (a,), "payments": (b,)}), CLIENT)
    vhosts = outbound_domains(cfg)
    assert list(vhosts) == [f"{FQ.format('payments')}:7001"]
    assert "payments" in vhosts[f"{FQ.format('payments')}:7001"]
    eps = cfg.clusters[cluster_name(FQ.format("payments"), 7001)].endpoints
    assert sorted(e.address for e in eps) == ["127.0.0.1", "127.0.0.2"]


def test_instances_without_a_port_are_not_endpoints():
    no_port = Instance(id="cache-1", service="cache", address="127.0.0.1", port=0)
    good = Instance(id="cache-2", service="cache", address="127.0.0.1", port=6380)
    cfg = compile_proxy(Inputs([], {"cache": (no_port, good)}), CLIENT)
    assert f"{FQ.format('cache')}:0" not in outbound_domains(cfg)
    eps = cfg.clusters[cluster_name(FQ.format("cache"), 6380)].endpoints
    assert [e.instance for e in eps] == ["cache-2"]
