"""AuthorizationPolicy attributes that come from the connection, through a real inbound listener."""

from __future__ import annotations

from dataclasses import replace

from meshctl.loader.resources import load_resources_text
from meshctl.model.proxyconfig import Listener

from proxy_testkit import config, curl, free_port, running_proxy

ONLY_FROM_LOOPBACK_DESTINATION = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dest
spec:
  action: ALLOW
  rules:
  - when:
    - key: destination.ip
      values: ["{block}"]
"""


async def _code(port: int) -> bytes:
    r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/x")
    return r.stdout


async def test_destination_ip_is_the_address_the_request_arrived_at(upstream):
    for bind in ("127.0.0.1", "0.0.0.0"):  # the listener's own address, or the socket's when wildcard
        for block, want in (("127.0.0.0/8", b"200"), ("10.0.0.0/8", b"403")):
            lp = free_port()
            inbound = Listener(name="inbound", direction="inbound", address=bind, port=lp,
                               app_address="127.0.0.1", app_port=upstream.port)
            (pol,) = load_resources_text(ONLY_FROM_LOOPBACK_DESTINATION.format(block=block))
            cfg = replace(config(listeners=[inbound]), authorization=(pol.spec,))
            async with running_proxy(cfg):
                assert await _code(lp) == want, (bind, block)
