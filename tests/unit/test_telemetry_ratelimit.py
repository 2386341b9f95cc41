"""RateLimit resources: validated by the loader, selected per workload by Pilot, carried in ProxyConfig."""

from __future__ import annotations

from meshctl.loader.codec import from_data
from meshctl.loader.proxyconfig import dump_proxy_config
from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, ProxyConfig, Workload
from meshctl.model.ratelimit import RateLimit
from meshctl.pilot.compile import Inputs, Node, compile_proxy

RL = """
apiVersion: meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: ratings-limit}
spec:
  selector: {matchLabels: {app: ratings}}
  local:
    tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}
  global: {requestsPerUnit: 100, unit: MINUTE, failureModeDeny: true}
---
apiVersion: meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: everyone, namespace: default}
spec:
  local: {tokenBucket: {maxTokens: 1000, fillInterval: 1s}}
---
apiVersion: meshctl.io/v1alpha1
kind: RateLimit
metadata: {name: elsewhere, namespace: prod}
spec:
  local: {tokenBucket: {maxTokens: 5, fillInterval: 1s}}
"""


def node(app: str) -> Node:
    return Node(Workload(name=f"{app}-v1-0", service=app, labels=FrozenDict(app=app, version="v1")),
                (Listener(name="inbound", direction="inbound", address="127.0.0.1", port=15006,
                          app_address="127.0.0.1", app_port=9080),))


def test_pilot_gives_each_workload_the_rate_limits_that_select_it():
    resources = load_resources_text(RL, "rl.yaml")
    assert [f for f in validate(resources) if f.level == "error"] == []
    ratings = compile_proxy(Inputs(resources, {}), node("ratings"))
    pp = compile_proxy(Inputs(resources, {}), node("productpage"))
    assert sorted(ratings.rate_limits) == ["default/everyone", "default/ratings-limit"]
    assert sorted(pp.rate_limits) == ["default/everyone"]
    spec = ratings.rate_limits["default/ratings-limit"]
    assert isinstance(spec, RateLimit) and spec.global_.failure_mode_deny and spec.global_.unit == "MINUTE"
    # the config round-trips through the JSON a proxy fetches
    again = from_data(ProxyConfig, dump_proxy_config(ratings), path="", file="t")
    assert again.rate_limits == ratings.rate_limits
    assert ratings.version != pp.version


def test_bad_rate_limits_are_rejected_naming_file_line_and_field():
    bad = RL.replace("maxTokens: 10,", "maxTokens: 0,").replace("unit: MINUTE", "unit: WEEK")
    errors = [str(f) for f in validate(load_resources_text(bad, "rl.yaml")) if f.level == "error"]
    assert any("rl.yaml:" in e and "spec.local.tokenBucket.maxTokens" in e and "at least 1" in e for e in errors)
    assert any("spec.global.unit" in e and "WEEK" in e for e in errors)
