"""One ProxyConfig validator (issue 14): a config file (loader) and a config the
running proxy is asked to apply (runtime, e.g. from Pilot) are accepted and
refused by the same rules, and core's compile errors are the only exceptions
the runtime turns into a rejected config."""

from __future__ import annotations

import pytest

from meshctl.core.errors import CoreConfigError
from meshctl.core.balance import BalanceConfigError
from meshctl.core.ratelimit import RateLimitConfigError
from meshctl.core.retry import RetryConfigError
from meshctl.core.route import RouteConfigError
from meshctl.loader.codec import LoadError
from meshctl.loader.proxyconfig import check_proxy_config, dump_proxy_config, load_proxy_config_text
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Cluster, Listener, ProxyConfig, RouteTable, Workload, cluster_name
from meshctl.proxy.runtime import ConfigRejected, ProxyRuntime

SERVICE = "reviews.default.svc.cluster.local"


def _cfg(*listeners: Listener) -> ProxyConfig:
    name = cluster_name(SERVICE, 9080)
    return ProxyConfig(
        version="v1",
        workload=Workload(name="productpage-0", service="productpage"),
        listeners=tuple(listeners),
        route_tables=FrozenDict(outbound=RouteTable(name="outbound")),
        clusters=FrozenDict({name: Cluster(name=name, service=SERVICE, port=9080)}),
    )


def _as_file(cfg: ProxyConfig) -> str:
    import json

    return json.dumps(dump_proxy_config(cfg))


def test_http_binding_without_a_route_table_is_refused_by_the_loader_and_the_runtime():
    binding = Listener(name="bind-reviews", direction="binding", address="127.0.0.1", port=0,
                       service=SERVICE, service_port=9080)  # protocol http, no route_table
    cfg = _cfg(binding)
    with pytest.raises(LoadError, match=r"listeners\[0\]: an http binding listener needs routeTable"):
        load_proxy_config_text(_as_file(cfg), "p.json")
    with pytest.raises(ConfigRejected, match="an http binding listener needs routeTable"):
        ProxyRuntime().apply(cfg)


def test_two_listeners_on_one_port_are_refused_by_both():
    a = Listener(name="a", direction="outbound", address="127.0.0.1", port=15001, route_table="outbound")
    b = Listener(name="b", direction="outbound", address="127.0.0.1", port=15001, route_table="outbound")
    cfg = _cfg(a, b)
    with pytest.raises(LoadError, match=r"listeners\[1\]\.port: 127\.0\.0\.1:15001 is used by another listener"):
        load_proxy_config_text(_as_file(cfg), "p.json")
    with pytest.raises(ConfigRejected, match="127.0.0.1:15001 is used by another listener"):
        ProxyRuntime().apply(cfg)


def test_an_inbound_listener_without_app_address_goes_to_loopback_for_both():
    inbound = Listener(name="inbound", direction="inbound", address="127.0.0.1", port=0, app_port=9080)
    cfg = _cfg(inbound)
    assert check_proxy_config(cfg) == []
    assert load_proxy_config_text(_as_file(cfg), "p.json") == cfg


def test_core_config_errors_share_one_base():
    for cls in (RetryConfigError, RouteConfigError, BalanceConfigError, RateLimitConfigError):
        assert issubclass(cls, CoreConfigError), cls
