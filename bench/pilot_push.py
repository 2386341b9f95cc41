"""How fast does a rule change reach every proxy?

Starts a real `meshctl pilot serve`, registers N lightweight subscribers (one
trio task each, speaking the proxies' protocol: PUT node, long-poll, ACK),
then runs `meshctl route apply` as a user would and measures the time from
the command returning to every subscriber having ACKed the new version.

    .venv/bin/python bench/pilot_push.py [--proxies 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshctl.loader.codec import to_data  # noqa: E402
from meshctl.model.base import FrozenDict  # noqa: E402
from meshctl.model.proxyconfig import Listener, Workload  # noqa: E402
from meshctl.pilot.compile import Node  # noqa: E402
from meshctl.protocol.events import Data, EndOfMessage, RequestHead, ResponseHead  # noqa: E402
from meshctl.protocol.http1 import H1Client  # noqa: E402

SERVICES = ["productpage", "details", "reviews", "ratings"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rules(w1: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {100 - w1}}}
"""


class Subscriber:
    def __init__(self, url: str, i: int, credential: str = "") -> None:
        svc = SERVICES[i % len(SERVICES)]
        self.credential = credential  # the mesh's: Pilot serves config only to a caller with a credential
        self.name = f"{svc}-bench-{i}"
        self.node = Node(
            Workload(name=self.name, service=svc, labels=FrozenDict(app=svc)),
            (Listener(name="outbound", direction="outbound", address="127.0.0.1", port=0),),
        )
        self.url = url
        self.version = ""

    async def run(self, client: httpx.AsyncClient) -> None:
        await client.put(f"{self.url}/v1/proxies/{self.name}", json=to_data(self.node))
        # The long-poll itself over a raw keep-alive connection with meshctl's own
        # HTTP/1.1 codec: subscribers must cost less than what they measure.
        host, port = self.url.rsplit("/", 1)[-1].split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        codec = H1Client()
        while True:
            head = RequestHead(method="GET", target="", headers=[("authorization", f"Bearer {self.credential}")],
                               authority=f"{host}:{port}",
                               path=f"/v1/config/{self.name}?version={self.version}&wait=60s")
            await stream.send_all(codec.request_head(head, end_stream=True))
            status, body = 0, bytearray()
            done = False
            while not done:
                data = await stream.receive_some(65536)
                if not data:
                    raise ConnectionError("Pilot closed the connection")
                for ev in codec.feed(data):
                    if isinstance(ev, ResponseHead):
                        status = ev.status
                    elif isinstance(ev, Data):
                        body += ev.data
                    elif isinstance(ev, EndOfMessage):
                        done = True
            if status == 304:
                continue
            # ACK, as the proxies do it: the next long-poll names the version now running.
            self.version = json.loads(body)["version"]


async def main(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="meshctl-pilot-bench."))
    state = tmp / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    from meshctl.credentials import mesh_credential

    credential = mesh_credential(state)
    pilot = subprocess.Popen([sys.executable, "-m", "meshctl", "pilot", "serve", "--port", str(port), "--state-dir", str(state)],
                             stdout=open(tmp / "pilot.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), trust_env=False,
                                     headers={"authorization": f"Bearer {credential}"},
                                     limits=httpx.Limits(max_connections=args.proxies * 2 + 10)) as client:
            for _ in range(200):
                try:
                    await client.get(f"{url}/v1/status")
                    break
                except httpx.HTTPError:
                    await trio.sleep(0.05)
            # Some endpoints, so configs have clusters with endpoints in them.
            for svc in SERVICES:
                for v in ("v1", "v2"):
                    iid = f"{svc}-{v}"
                    await client.put(f"{url}/v1/registry/instances/{iid}", json={"instance": {
                        "id": iid, "service": svc, "address": "127.0.0.1", "port": 20000, "labels": {"app": svc, "version": v},
                        "meta": {"meshctl.io/service-port": "9080"}}})
            subs = [Subscriber(url, i, credential) for i in range(args.proxies)]
            times, whole = [], []
            async with trio.open_nursery() as n:
                for s in subs:
                    n.start_soon(s.run, client)
                while sum(1 for s in subs if s.version) < len(subs):
                    await trio.sleep(0.01)
                rule_file = tmp / "rules.yaml"
                for r in range(args.rounds):
                    rule_file.write_text(rules(10 * (r % 10)))
                    started = time.monotonic()
                    await trio.to_thread.run_sync(lambda: subprocess.run(
                        [sys.executable, "-m", "meshctl", "route", "apply", "-f", str(rule_file), "--state-dir", str(state)],
                        check=True, capture_output=True, env=env))
                    returned = time.monotonic()
                    # Pilot's own view, as `pilot proxy-status` shows it: every proxy SYNCED.
                    while True:
                        st = (await client.get(f"{url}/v1/status")).json()
                        if st["revision"] > r and all(p["status"] == "SYNCED" for p in st["proxies"]):
                            break
                        await trio.sleep(0.02)
                    now = time.monotonic()
                    times.append(now - returned)
                    whole.append(now - started)
                n.cancel_scope.cancel()
        times_ms = sorted(t * 1000 for t in times)
        print(f"{args.proxies} subscribers, {args.rounds} rule changes: apply returned → all ACKed")
        print(f"  median {statistics.median(times_ms):.0f} ms, max {max(times_ms):.0f} ms (all: {', '.join(f'{t:.0f}' for t in times_ms)})")
        whole_ms = sorted(t * 1000 for t in whole)
        print(f"  from starting the command (a CLI process start, load, validate, store, poke): median {statistics.median(whole_ms):.0f} ms, max {max(whole_ms):.0f} ms")
        print(json.dumps({"proxies": args.proxies, "median_ms": statistics.median(times_ms), "max_ms": max(times_ms),
                          "from_start_median_ms": statistics.median(whole_ms)}))
    finally:
        pilot.terminate()
        pilot.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--proxies", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10)
    trio.run(main, p.parse_args())
