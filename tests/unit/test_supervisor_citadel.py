"""supervisor/citadel.py: the environment `up` starts a proxy with names a one-time
0600 bootstrap file holding a fresh one-time token for exactly that proxy's
identity and its own Pilot credential; apps get nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from meshctl.citadel.errors import TokenReused
from meshctl.citadel.store import TokenFile, init_ca
from meshctl.credentials import ENV_BOOTSTRAP, authenticate, take_bootstrap
from meshctl.loader.codec import to_data
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Workload
from meshctl.pilot.compile import Node
from meshctl.supervisor.citadel import identity_of_node, proxy_env


@dataclass
class Proc:
    name: str
    kind: str
    env: dict = field(default_factory=lambda: {"PATH": "/bin"})


class Sup:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.citadel_url = "http://127.0.0.1:15012"
        self.events: list[str] = []

    def event(self, msg: str) -> None:
        self.events.append(msg)


@pytest.fixture
def sup(tmp_path):
    init_ca(tmp_path, "example.org", now=datetime.now(timezone.utc))
    (tmp_path / "nodes").mkdir()
    node = Node(workload=Workload(name="reviews-v2-0", service="reviews", namespace="shop",
                                  labels=FrozenDict(app="reviews"), trust_domain="example.org"))
    (tmp_path / "nodes" / "reviews-v2-0.json").write_text(json.dumps(to_data(node)))
    return Sup(tmp_path)


def test_each_start_gets_a_new_token_for_the_proxys_own_identity(sup):
    p = Proc("reviews-v2-0", "sidecar")
    assert identity_of_node(sup.state_dir / "nodes" / "reviews-v2-0.json") == "spiffe://example.org/ns/shop/sa/reviews"
    env1, env2 = proxy_env(sup, p), proxy_env(sup, p)
    assert env1["PATH"] == "/bin" and "MESHCTL_CITADEL_TOKEN" not in env1  # never in /proc/PID/environ
    path = Path(env1[ENV_BOOTSTRAP])
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    first, second = take_bootstrap(dict(env1)), take_bootstrap(dict(env2))
    assert not path.exists()  # the sidecar deletes it once read
    assert first["MESHCTL_CITADEL_URL"] == "http://127.0.0.1:15012"
    secret = (sup.state_dir / "auth" / "mesh.token").read_text()
    assert authenticate(f"Bearer {first['pilot_credential']}", secret).proxy == "reviews-v2-0"
    assert first["MESHCTL_CITADEL_TOKEN"] != second["MESHCTL_CITADEL_TOKEN"]  # a restart cannot reuse a spent one
    tokens = TokenFile(sup.state_dir)
    now = datetime.now(timezone.utc)
    assert tokens.redeem(first["MESHCTL_CITADEL_TOKEN"], now) == "spiffe://example.org/ns/shop/sa/reviews"
    with pytest.raises(TokenReused):
        tokens.redeem(first["MESHCTL_CITADEL_TOKEN"], now)
    assert "MESHCTL_CITADEL_TOKEN" not in p.env  # the stored environment never keeps a token


def test_apps_and_meshes_without_citadel_get_no_token(sup):
    assert ENV_BOOTSTRAP not in proxy_env(sup, Proc("reviews-v2-0", "app"))
    sup.citadel_url = ""
    boot = take_bootstrap(dict(proxy_env(sup, Proc("reviews-v2-0", "sidecar"))))
    assert "MESHCTL_CITADEL_TOKEN" not in boot and boot["pilot_credential"]


def test_a_proxy_without_a_node_file_starts_without_identity_and_says_so(sup):
    env = take_bootstrap(dict(proxy_env(sup, Proc("ghost-0", "sidecar"))))
    assert "MESHCTL_CITADEL_TOKEN" not in env
    assert any("ghost-0" in e and "no identity" in e for e in sup.events)
