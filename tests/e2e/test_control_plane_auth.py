"""Attacks on the control plane's API by another local user (issue 13 item 1).

A real `meshctl pilot serve` and `meshctl mixer serve`, attacked with curl: run as
user ``nobody`` when the tests run as root (as the issue's reviewer did), else as
ourselves without the credential. Every write and every foreign config read is
refused: 401 without a credential, 403 with another proxy's, with a JSON error.
The legitimate callers (the CLI's mesh credential, each proxy's own credential)
still work, and a keep-alive after a DELETE registers the instance again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from meshctl.credentials import mesh_credential, proxy_credential
from meshctl.supervisor.pilotreg import PilotRegistry

from .helpers import free_port, meshctl_popen, meshctl_run, stop, wait_http

pytestmark = pytest.mark.e2e

NODE = {"workload": {"name": "reviews-v2-0", "service": "reviews", "labels": {"app": "reviews", "version": "v2"}},
        "listeners": [{"name": "inbound", "direction": "inbound", "address": "127.0.0.1", "port": 19080,
                       "appAddress": "127.0.0.1", "appPort": 9080}]}
ROGUE_NODE = {"workload": {"name": "reviews-v2-0", "service": "reviews"},
              "listeners": [{"name": "inbound", "direction": "inbound", "address": "0.0.0.0", "port": 19080,
                             "appAddress": "127.0.0.1", "appPort": 6666}]}


def inst(iid: str, service: str, port: int, *, sidecar: bool = True, sa: str | None = None) -> dict:
    meta = {"meshctl.io/service-port": "9080"}
    if sidecar:
        meta["meshctl.io/sidecar"] = "true"
    if sa:
        meta["meshctl.io/service-account"] = sa
    return {"instance": {"id": iid, "service": service, "address": "127.0.0.1", "port": port, "meta": meta}}


def as_attacker() -> list[str]:
    """Run curl as user nobody when we can (root), else as ourselves."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    return []


def curl(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    cmd = [*as_attacker(), "curl", "-s", "--noproxy", "*", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]
    if body is not None:
        cmd += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
    if token is not None:
        cmd += ["-H", f"authorization: Bearer {token}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    text, _, code = out.rpartition("\n")
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        data = {"raw": text}
    return int(code), data


@pytest.fixture(scope="module")
def pilot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpauth")
    sd = tmp / ".meshctl"
    port = free_port()
    proc = meshctl_popen("pilot", "serve", "--port", str(port), "--state-dir", str(sd), log=tmp / "pilot.log")
    try:
        wait_http(port, "/healthz")
        url = f"http://127.0.0.1:{port}"
        mesh = mesh_credential(sd, create=False)
        c = httpx.Client(base_url=url, trust_env=False, timeout=10, headers={"authorization": f"Bearer {mesh}"})
        own = proxy_credential(mesh, "reviews-v2-0")
        httpx.put(f"{url}/v1/proxies/reviews-v2-0", json=NODE, trust_env=False,
                  headers={"authorization": f"Bearer {own}"}).raise_for_status()
        c.put("/v1/registry/instances/reviews-v2-0", json=inst("reviews-v2-0", "reviews", 19080) | {"ttl": 600}
              ).raise_for_status()
        yield {"url": url, "sd": sd, "client": c, "mesh": mesh, "tmp": tmp, "own": own,
               "other": proxy_credential(mesh, "ratings-v1-0")}
        c.close()
    finally:
        stop(proc)


ATTACKS = [
    ("PUT", "/v1/proxies/reviews-v2-0", ROGUE_NODE),  # redirect the sidecar's inbound, bind 0.0.0.0
    ("PUT", "/v1/registry/instances/evil-0", inst("evil-0", "reviews", 6666, sidecar=False)),  # rogue endpoint
    ("DELETE", "/v1/registry/instances/reviews-v2-0", None),  # take a healthy instance out
    ("POST", "/v1/registry/instances/reviews-v2-0/drain", None),
    ("GET", "/v1/config/reviews-v2-0", None),  # read another proxy's config
    ("POST", "/v1/ack/reviews-v2-0", {"version": "x", "error": "forged NACK"}),
    ("POST", "/v1/rules/reload", None),
    ("GET", "/v1/status", None),
    ("GET", "/v1/registry", None),
]


@pytest.mark.parametrize("method,path,body", ATTACKS, ids=[f"{m} {p}" for m, p, _ in ATTACKS])
def test_pilot_api_without_a_credential_is_refused_401(pilot, method, path, body):
    code, err = curl(method, pilot["url"] + path, body)
    assert code == 401, err
    assert err["reason"] == "unauthenticated" and "credential" in err["error"]


@pytest.mark.parametrize("method,path,body", ATTACKS, ids=[f"{m} {p}" for m, p, _ in ATTACKS])
def test_pilot_api_with_another_proxys_credential_is_refused_403(pilot, method, path, body):
    code, err = curl(method, pilot["url"] + path, body, token=pilot["other"])
    assert code == 403, err
    assert err["reason"] == "forbidden" and "ratings-v1-0" in err["error"]


def test_a_forged_credential_is_refused_401(pilot):
    forged = pilot["own"][:-4] + "0000"
    code, err = curl("GET", pilot["url"] + "/v1/config/reviews-v2-0?wait=0s", token=forged)
    assert code == 401 and err["reason"] == "unauthenticated"
    code, _ = curl("GET", pilot["url"] + "/v1/config/reviews-v2-0?wait=0s", token="mesh.guess")
    assert code == 401


def test_after_the_attacks_the_mesh_state_is_untouched_and_proxies_get_their_own_config(pilot):
    code, cfg = curl("GET", pilot["url"] + "/v1/config/reviews-v2-0?wait=0s", token=pilot["own"])
    assert code == 200 and cfg["workload"]["name"] == "reviews-v2-0"
    inbound = next(lst for lst in cfg["listeners"] if lst["name"] == "inbound")
    assert inbound["address"] == "127.0.0.1" and inbound.get("appPort", inbound.get("app_port")) == 9080
    reg = pilot["client"].get("/v1/registry").json()
    assert [i["id"] for i in reg["reviews"] if i["healthy"]] == ["reviews-v2-0"]  # not deleted, no evil-0
    assert "evil-0" not in json.dumps(reg)


def test_the_mesh_credential_is_readable_only_by_the_meshs_user(pilot):
    path = pilot["sd"] / "auth" / "mesh.token"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    if not as_attacker():
        pytest.skip("not root: cannot try reading it as another user")
    os.chmod(pilot["tmp"], 0o755)  # even with every directory above it open, the file stays closed
    os.chmod(pilot["sd"], 0o755)
    r = subprocess.run([*as_attacker(), "cat", str(path)], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr and pilot["mesh"] not in r.stdout


def test_a_proxy_credential_may_register_only_its_own_identity(pilot):
    url = pilot["url"] + "/v1/registry/instances/reviews-v2-0"
    # its own sidecar endpoint, claiming its own identity: allowed
    code, err = curl("PUT", url, inst("reviews-v2-0", "reviews", 19080) | {"ttl": 600}, token=pilot["own"])
    assert code == 200, err
    # claiming another service account: refused
    code, err = curl("PUT", url, inst("reviews-v2-0", "reviews", 19080, sa="productpage"), token=pilot["own"])
    assert code == 403 and "claims identity spiffe://cluster.local/ns/default/sa/productpage" in err["error"]
    # an endpoint without a sidecar: refused to a proxy
    code, err = curl("PUT", url, inst("reviews-v2-0", "reviews", 6666, sidecar=False), token=pilot["own"])
    assert code == 403
    code, _ = curl("POST", url + "/heartbeat", token=pilot["own"])
    assert code == 200


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"""


def test_under_strict_mtls_an_endpoint_without_a_sidecar_is_refused_unless_foreign(pilot):
    f = pilot["tmp"] / "strict.yaml"
    f.write_text(STRICT)
    meshctl_run("route", "apply", "-f", str(f), "--state-dir", str(pilot["sd"]))
    try:
        c = pilot["client"]
        r = c.put("/v1/registry/instances/plain-0", json=inst("plain-0", "reviews", 6666, sidecar=False))
        assert r.status_code == 403 and "PeerAuthentication STRICT" in r.json()["error"], r.text
        assert "plain-0" not in json.dumps(c.get("/v1/registry").json())
        r = c.put("/v1/registry/instances/legacy-0", json=inst("legacy-0", "legacy", 7777, sidecar=False) | {"foreign": True})
        assert r.status_code == 200, r.text
        code, _ = curl("PUT", pilot["url"] + "/v1/registry/instances/legacy-1",
                       inst("legacy-1", "legacy", 7777, sidecar=False) | {"foreign": True}, token=pilot["own"])
        assert code == 403
    finally:
        meshctl_run("route", "delete", "-f", str(f), "--state-dir", str(pilot["sd"]))
        pilot["client"].delete("/v1/registry/instances/legacy-0")


SHOP_STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
"""


def test_the_strict_check_and_claimed_identities_follow_the_instances_namespace(pilot):
    # A mesh with settings.namespace: shop registers its instances with meshctl.io/namespace:
    # shop; its sidecars are spiffe://cluster.local/ns/shop/sa/..., and shop's
    # PeerAuthentication is the one that applies to them, not default's.
    f = pilot["tmp"] / "shop-strict.yaml"
    f.write_text(SHOP_STRICT)
    meshctl_run("route", "apply", "-f", str(f), "--state-dir", str(pilot["sd"]))
    c = pilot["client"]
    try:
        shop = {"meshctl.io/namespace": "shop"}
        plain = inst("cart-plain-0", "cart", 6667, sidecar=False)
        plain["instance"]["meta"] |= shop
        r = c.put("/v1/registry/instances/cart-plain-0", json=plain)
        assert r.status_code == 403 and "namespace shop requires mutual TLS" in r.json()["error"], r.text
        # the same plaintext endpoint in default, where nothing is STRICT: accepted
        r = c.put("/v1/registry/instances/plain-default-0", json=inst("plain-default-0", "cart", 6668, sidecar=False))
        assert r.status_code == 200, r.text
        c.delete("/v1/registry/instances/plain-default-0")
        # one of the mesh's gateways (its servers' TLS is the Gateway's, as in Istio): the
        # supervisor registers it with the mesh credential; a proxy may not
        gw = inst("egress-80", "egress.istio-system", 27399, sidecar=False)
        gw["instance"]["meta"] |= shop | {"meshctl.io/gateway": "true"}
        code, err = curl("PUT", pilot["url"] + "/v1/registry/instances/egress-80", gw, token=pilot["own"])
        assert code == 403, err
        r = c.put("/v1/registry/instances/egress-80", json=gw)
        assert r.status_code == 200, r.text
        c.delete("/v1/registry/instances/egress-80")
        # a shop sidecar registers its own endpoint, claiming its own identity (ns/shop)
        own = proxy_credential(pilot["mesh"], "cart-v1-0")
        node = {"workload": {"name": "cart-v1-0", "service": "cart", "namespace": "shop", "labels": {"app": "cart"}},
                "listeners": [{"name": "inbound", "direction": "inbound", "address": "127.0.0.1", "port": 19081,
                               "appAddress": "127.0.0.1", "appPort": 9081}]}
        httpx.put(pilot["url"] + "/v1/proxies/cart-v1-0", json=node, trust_env=False,
                  headers={"authorization": f"Bearer {own}"}).raise_for_status()
        sidecar = inst("cart-v1-0", "cart", 19081)
        sidecar["instance"]["meta"] |= shop
        code, err = curl("PUT", pilot["url"] + "/v1/registry/instances/cart-v1-0", sidecar | {"ttl": 600}, token=own)
        assert code == 200, err
        # and its callers expect that identity of its endpoint
        cfg = c.get("/v1/config/reviews-v2-0").json()
        eps = [e for cl in cfg["clusters"].values() if cl["service"].startswith("cart.") for e in cl["endpoints"]]
        assert [e.get("identity") for e in eps] == ["spiffe://cluster.local/ns/shop/sa/cart"], eps
    finally:
        meshctl_run("route", "delete", "-f", str(f), "--state-dir", str(pilot["sd"]))
        c.delete("/v1/registry/instances/cart-v1-0")


def healthy(c: httpx.Client, service: str, want: list[str]) -> list[str]:
    """The healthy instances Pilot routes to for ``service``, once they are ``want`` (or after 15 s)."""
    deadline = time.monotonic() + 15
    while True:
        got = [i["id"] for i in c.get("/v1/registry").json().get(service, []) if i.get("healthy", True)]
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_a_keepalive_after_a_delete_registers_the_instance_again(pilot):
    c = pilot["client"]

    async def main() -> list[str]:
        reg = PilotRegistry(pilot["url"], ttl=600, credential=pilot["mesh"])
        try:
            from meshctl.registry.base import Instance
            from meshctl.model.base import FrozenDict

            await reg.register(Instance("details-v1-0", "details", "127.0.0.1", 19081,
                                        meta=FrozenDict({"meshctl.io/sidecar": "true"})))
            c.delete("/v1/registry/instances/details-v1-0").raise_for_status()  # behind the supervisor's back
            assert healthy(c, "details", []) == []
            await reg.keep_alive("details-v1-0")  # answered 500 "no instance registered" forever before
            return healthy(c, "details", ["details-v1-0"])
        finally:
            await reg.aclose()

    assert trio.run(main) == ["details-v1-0"]
    r = c.post("/v1/registry/instances/nobody-0/heartbeat")
    assert r.status_code == 404 and r.json()["reason"] == "unknown-instance"


def test_the_cli_uses_the_mesh_credential(pilot):
    r = meshctl_run("pilot", "proxy-status", "-o", "json", "--state-dir", str(pilot["sd"]))
    assert "reviews-v2-0" in r.stdout


@pytest.fixture(scope="module")
def mixer(pilot):
    port = free_port()
    proc = meshctl_popen("mixer", "serve", "--port", str(port), "--state-dir", str(pilot["sd"]),
                         log=pilot["tmp"] / "mixer.log")
    try:
        wait_http(port, "/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_mixer_quota_and_top_are_refused_without_the_right_credential(pilot, mixer):
    ask = {"key": "default/ratings-limit", "proxy": "reviews-v2-0", "tokens": 1000, "limit": 10, "unit_seconds": 60}
    code, err = curl("POST", mixer + "/v1/quota", ask)
    assert code == 401 and err["reason"] == "unauthenticated"
    code, err = curl("POST", mixer + "/v1/quota", ask, token=pilot["other"])  # drain reviews' quota as ratings
    assert code == 403 and err["reason"] == "forbidden"
    for path in ("/v1/top", "/v1/targets"):
        assert curl("GET", mixer + path)[0] == 401
        assert curl("GET", mixer + path, token=pilot["own"])[0] == 403
    code, grant = curl("POST", mixer + "/v1/quota", ask | {"tokens": 1}, token=pilot["own"])
    assert code == 200 and grant["granted"] == 1
    assert curl("GET", mixer + "/v1/top", token=pilot["mesh"])[0] == 200
    assert curl("GET", mixer + "/metrics")[0] == 200  # the monitoring endpoint stays open, as istiod's


def test_a_sidecar_gets_its_credential_by_a_one_time_file_and_follows_pilot(pilot, tmp_path):
    node = tmp_path / "client.node.json"
    out = free_port()
    node.write_text(json.dumps({"workload": {"name": "client-0", "service": "client"},
                                "listeners": [{"name": "outbound", "direction": "outbound", "address": "127.0.0.1",
                                               "port": out}]}))
    admin = free_port()
    p = meshctl_popen("proxy", "run", "--pilot", pilot["url"], "--node", str(node), "--admin-port", str(admin),
                      "--state-dir", str(pilot["sd"]), log=tmp_path / "client.log")
    try:
        wait_http(admin, "/ready")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = pilot["client"].get("/v1/status").json()
            if any(x["proxy"] == "client-0" and x["status"] == "SYNCED" for x in st["proxies"]):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"client-0 never synced: {st}\n{(tmp_path / 'client.log').read_text()}")
        environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        assert b"proxy.client-0." not in environ  # the credential is not in the environment
        assert list((pilot["sd"] / "auth" / "bootstrap").glob("client-0.*")) == []  # the file is gone
        saved = pilot["sd"] / "proxies" / "client-0.config.json"
        assert saved.stat().st_mode & 0o777 == 0o600 and saved.parent.stat().st_mode & 0o777 == 0o700
    finally:
        stop(p)
