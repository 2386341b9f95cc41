"""What a sidecar on evloop refuses by name at apply (proxy/runtime.py evloop_refusals)."""

from meshctl.model.base import FrozenDict
from meshctl.model.istio import AuthorizationPolicy
from meshctl.model.proxyconfig import Cluster, ProxyConfig, Settings, Workload
from meshctl.proxy.runtime import evloop_refusals


def _cfg(**kw) -> ProxyConfig:
    return ProxyConfig(version="v1", workload=Workload(name="a-0", service="a"), **kw)


def test_a_plain_config_is_not_refused():
    c = Cluster(name="outbound|80||b.default.svc.cluster.local", service="b.default.svc.cluster.local", port=80)
    assert evloop_refusals(_cfg(clusters=FrozenDict({c.name: c}),
                                authorization=FrozenDict({"ns/allow": AuthorizationPolicy(action="ALLOW")}))) == []


def test_trio_only_clients_are_refused_by_name():
    dns = Cluster(name="outbound|443||api.example.com", service="api.example.com", port=443, dns="DNS")
    out = evloop_refusals(_cfg(clusters=FrozenDict({dns.name: dns}),
                               authorization=FrozenDict({"ns/ext": AuthorizationPolicy(action="CUSTOM")}),
                               settings=Settings(tracing_otlp="http://127.0.0.1:4318")))
    assert len(out) == 3
    assert any(m.startswith("tracing:") for m in out)
    assert any("authorization ns/ext: action CUSTOM" in m for m in out)
    assert any("clusters outbound|443||api.example.com: resolution DNS" in m for m in out)
