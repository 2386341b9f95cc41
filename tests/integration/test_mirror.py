"""Traffic mirroring through a real proxy, with the rules of Istio's mirroring task
(istio.io/latest/docs/tasks/traffic-management/mirroring/, used unchanged): every
request to httpbin is answered by v1 and a copy reaches v2 with Envoy's "-shadow"
Host; a slow or dead mirror never delays or fails the primary; shadows are capped."""

from __future__ import annotations

import json
from pathlib import Path
import time

import trio

from meshctl.loader.resources import load_resources_text
from meshctl.loader.validate import has_errors, validate
from meshctl.model.base import FrozenDict
from meshctl.model.proxyconfig import Listener, Workload
from meshctl.pilot.compile import META_SERVICE_PORT, Inputs, Node, compile_proxy
from meshctl.proxy.mirror import MAX_IN_FLIGHT
from meshctl.registry.base import Instance

from proxy_testkit import curl, free_port, running_proxy

MIRRORING = Path(__file__).resolve().parents[1] / "data" / "istio-mirroring"

# Istio's mirroring task: first all traffic to v1 ...
ALL_V1 = (MIRRORING / "httpbin-all-v1.yaml").read_text()

# ... then the same route mirrored to v2.
MIRROR_V2 = (MIRRORING / "httpbin-mirror-v2.yaml").read_text()


def _config(rules: str, v1_port: int, v2_port: int, listen: int):
    resources = load_resources_text(rules, "task.yaml")
    assert not has_errors(validate(resources)), [str(f) for f in validate(resources)]
    snapshot = {"httpbin": tuple(
        Instance(id=f"httpbin-{v}-0", service="httpbin", address="127.0.0.1", port=port,
                 labels=FrozenDict(app="httpbin", version=v), meta=FrozenDict({META_SERVICE_PORT: "8000"}))
        for v, port in (("v1", v1_port), ("v2", v2_port))
    )}
    node = Node(workload=Workload(name="sleep-0", service="sleep"),
                listeners=(Listener(name="outbound", direction="outbound", address="127.0.0.1", port=listen),))
    return compile_proxy(Inputs(resources, snapshot), node)


async def _wait(cond, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


async def test_istios_mirroring_task_v2_receives_a_copy_of_each_request(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    rules_v1 = ALL_V1
    rules_mirror = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    async with running_proxy(_config(rules_v1, v1.port, v2.port, lp)):
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "http://httpbin:8000/headers")
        assert json.loads(r.stdout)["upstream"] == "v1"
        await trio.sleep(0.2)
        assert v2.requests == []  # before the mirror rule: v2 gets nothing
    lp = free_port()
    async with running_proxy(_config(rules_mirror, v1.port, v2.port, lp)) as rt:
        for i in range(5):
            r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", f"http://httpbin:8000/headers?n={i}")
            assert json.loads(r.stdout)["upstream"] == "v1"
        await _wait(lambda: len(v2.requests) == 5)
        stats = rt.mirrors
        await _wait(lambda: stats.sent == 5)
    assert [p for _, p, _ in v1.requests[1:]] == [f"/headers?n={i}" for i in range(5)]
    assert sorted(p for _, p, _ in v2.requests) == [f"/headers?n={i}" for i in range(5)]
    for _, _, headers in v2.requests:
        assert dict(headers)["host"] == "httpbin-shadow:8000"


async def test_a_posted_body_is_mirrored_too(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    async with running_proxy(_config(MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1], v1.port, v2.port, lp)):
        r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", "--data-binary", "payload-123", "http://httpbin:8000/post")
        assert json.loads(r.stdout)["body"] == "payload-123"
        await _wait(lambda: len(v2.requests) == 1)
    method, path, headers = v2.requests[0]
    assert (method, path) == ("POST", "/post") and dict(headers)["content-length"] == "11"


async def test_a_slow_or_dead_mirror_never_delays_or_fails_the_primary(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    lp = free_port()
    # v2 takes 10 s to answer every shadow: the primary answers at once all the same
    async with running_proxy(_config(rules, v1.port, v2.port, lp)):
        started = time.monotonic()
        for _ in range(5):
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                           "http://httpbin:8000/slow?ms=10000&only=v2")
            assert r.stdout == b"200"
        # five primaries well inside one shadow's 10 s (slack for a loaded machine's curl start-ups)
        assert time.monotonic() - started < 5
    # v2 is gone (nothing listens): every primary still succeeds, the shadows count as failed
    dead = free_port()
    lp = free_port()
    async with running_proxy(_config(rules, v1.port, dead, lp)) as rt:
        for _ in range(5):
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                           "http://httpbin:8000/get")
            assert r.stdout == b"200"
        await _wait(lambda: rt.mirrors.failed == 5)
        assert rt.mirrors.sent == 0


async def test_shadows_in_flight_are_capped_and_the_excess_dropped(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
        n = MAX_IN_FLIGHT + 16
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(curl, "-s", "-o", "/dev/null", "-x", f"http://127.0.0.1:{lp}",
                                   "http://httpbin:8000/slow?ms=20000&only=v2")  # held well past the curls' start-up
        assert rt.mirrors.in_flight <= MAX_IN_FLIGHT
        assert rt.mirrors.dropped >= 16 - 1 and rt.mirrors.in_flight + rt.mirrors.sent + rt.mirrors.dropped == n
        assert len(v1.requests) == n


async def test_the_mirrors_answers_are_compared_with_the_primarys(upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
        for i in range(3):  # same answers
            await curl("-s", "-o", "/dev/null", "-x", f"http://127.0.0.1:{lp}", f"http://httpbin:8000/say?text=same&n={i}")
        for i in range(2):  # v2 fails where v1 answers 200
            await curl("-s", "-o", "/dev/null", "-x", f"http://127.0.0.1:{lp}",
                       f"http://httpbin:8000/flaky?fail=9&only=v2&key=k{i}")
        await _wait(lambda: rt.mirrors.sent == 5)
        rep = rt.mirrors.report()
    t = rep["targets"]["outbound|8000|v2|httpbin.default.svc.cluster.local"]
    assert (t["compared"], t["status_differs"], t["content_type_differs"], t["failed"]) == (5, 2, 0, 0)
    assert t["primary_ms"]["p50"] is not None and t["shadow_ms"]["p50"] is not None
    ex = rep["examples"]
    assert [(e["primary_status"], e["shadow_status"]) for e in ex] == [(200, 503), (200, 503)]
    assert ex[0]["path"].startswith("/flaky") and len(ex[0]["shadow_body_sha256"]) == 64
    assert (ex[0]["primary_content_type"], ex[0]["shadow_content_type"]) == ("application/json", "text/plain")


async def test_mirror_diff_compares_bodies_and_chosen_headers_where_v2_answers_another_body(upstreams):
    import hashlib

    from meshctl.cli.mirror import summarize

    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
        for i in range(3):  # v1 and v2 answer the same body
            r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", f"http://httpbin:8000/say?text=hello&n={i}")
            assert r.stdout == b"hello"
        for i in range(2):  # v2 answers another body, same status and content type
            r = await curl("-s", "-x", f"http://127.0.0.1:{lp}", f"http://httpbin:8000/say?text=hello&v2=bonjour&n={i}")
            assert r.stdout == b"hello"  # the client gets v1's answer, always
        await _wait(lambda: rt.mirrors.sent == 5)
        rep = json.loads(json.dumps(rt.mirrors.report()))  # as the admin port serves it
    t = rep["targets"]["outbound|8000|v2|httpbin.default.svc.cluster.local"]
    assert (t["compared"], t["status_differs"], t["content_type_differs"], t["body_differs"], t["failed"]) == (5, 0, 0, 2, 0)
    ex = rep["examples"]
    assert [e["path"] for e in ex] == [f"/say?text=hello&v2=bonjour&n={i}" for i in range(2)]
    assert ex[0]["differs"] == ["body"]
    assert ex[0]["primary_body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert ex[0]["shadow_body_sha256"] == hashlib.sha256(b"bonjour").hexdigest()
    # chosen headers: the upstreams name themselves in x-upstream (v1 / v2); content-type is the same
    totals, examples = summarize([("sleep-0", rep)], "httpbin", ("content-type", "x-upstream"))
    a = totals["outbound|8000|v2|httpbin.default.svc.cluster.local"]
    assert a["header_differs"] == {"content-type": 0, "x-upstream": 5} and a["headers_compared"] == 5
    assert a["body_differs"] == 2 and len(examples) == 5
    assert examples[-1]["differs"] == ["body", "header x-upstream"]
    assert (examples[-1]["primary_headers"]["x-upstream"], examples[-1]["shadow_headers"]["x-upstream"]) == ("v1", "v2")
    # by default only content-type is compared: the two body differences are the examples
    totals, examples = summarize([("sleep-0", rep)], "httpbin")
    assert [e["differs"] for e in examples] == [["body"], ["body"]]
    # over a window: the comparisons of the last seconds only
    totals, _ = summarize([("sleep-0", rep)], "httpbin", window=60.0)
    assert totals["outbound|8000|v2|httpbin.default.svc.cluster.local"]["compared"] == 5
    totals, _ = summarize([("sleep-0", rep)], "httpbin", window=60.0, now=time.time() + 3600)
    assert totals == {}


async def test_bodies_past_the_kept_limit_are_not_compared_and_not_held(upstreams):
    from meshctl.proxy.request import KEPT_BODY_LIMIT, KeptResponse

    kept = KeptResponse()
    kept.add(b"x" * (KEPT_BODY_LIMIT - 1))
    assert kept.whole and kept.size == KEPT_BODY_LIMIT - 1
    kept.add(b"yy")
    assert not kept.whole and kept.chunks == []  # let go at once
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
        r = await curl("-s", "-o", "/dev/null", "-w", "%{size_download}", "-x", f"http://127.0.0.1:{lp}",
                       f"http://httpbin:8000/download?n={KEPT_BODY_LIMIT + 10}")
        assert int(r.stdout) == KEPT_BODY_LIMIT + 10
        await _wait(lambda: rt.mirrors.sent + rt.mirrors.failed == 1)
        rep = rt.mirrors.report()
    (t,) = rep["targets"].values()
    assert t["body_differs"] == 0  # not compared: neither side kept whole
    assert rep["recent"][0]["primary_body_sha256"] == ""


class _ClosesAfterAnswering:
    """A mirror that answers 401 (with a body and its length) and then closes the
    connection without saying so, as many servers do after an error answer."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(401)
                self.send_header("www-authenticate", 'Basic realm="v2"')
                self.send_header("content-length", "6")
                self.end_headers()
                self.wfile.write(b"denied")
                self.close_connection = True

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


async def test_a_mirrors_401_is_an_answer_and_no_answer_says_why(upstreams):
    from meshctl.cli.common import console
    from meshctl.cli.mirror import _render, summarize

    v1 = upstreams("v1")
    v2 = _ClosesAfterAnswering()
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    cluster = "outbound|8000|v2|httpbin.default.svc.cluster.local"
    try:
        lp = free_port()
        async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
            for i in range(4):  # one after the other: each shadow after the first finds the closed pooled connection
                r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                               f"http://httpbin:8000/get?n={i}")
                assert r.stdout == b"200"
                await _wait(lambda: rt.mirrors.sent + rt.mirrors.failed == i + 1)
            rep = json.loads(json.dumps(rt.mirrors.report()))
    finally:
        v2.close()
    assert (rep["sent"], rep["failed"]) == (4, 0)
    t = rep["targets"][cluster]
    assert (t["compared"], t["status_differs"], t["failed"]) == (4, 4, 0)
    assert [(e["primary_status"], e["shadow_status"], e["differs"]) for e in rep["examples"]] == [(200, 401, ["status"])] * 4
    totals, examples = summarize([("sleep-0", rep)], "httpbin")
    assert totals[cluster]["statuses"] == {"200 -> 401": 4}
    with console.capture() as cap:
        _render("httpbin", totals, examples, ("content-type",), 1, None)
    out = cap.get()
    assert "status, primary -> mirror (of 4 latest compared): 200 -> 401: 4" in out
    assert "/get?n=3  [status, header content-type]  primary 200" in out and "mirror 401 " in out and "no answer" not in out.split("\n", 2)[2]

    # a mirror that really does not answer: nothing listens there
    dead = free_port()
    lp = free_port()
    async with running_proxy(_config(rules, v1.port, dead, lp)) as rt:
        r = await curl("-s", "-o", "/dev/null", "-x", f"http://127.0.0.1:{lp}", "http://httpbin:8000/get?n=dead")
        await _wait(lambda: rt.mirrors.failed == 1)
        rep = json.loads(json.dumps(rt.mirrors.report()))
    totals, examples = summarize([("sleep-0", rep)], "httpbin")
    (pair,) = totals[cluster]["statuses"]
    assert pair.startswith("200 -> no answer (connect to 127.0.0.1:") and "refused" in pair, pair
    assert examples[0]["differs"] == ["no answer"] and totals[cluster]["failed"] == 1


async def test_a_client_that_leaves_before_its_answer_is_mirrored_all_the_same(upstreams):
    # Envoy shadows a request whatever becomes of the downstream (and so does meshctl's HTTP/2
    # path): a client that sends its request and leaves while the primary is still answering
    # must not take the shadow with it.
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    rules = MIRROR_V2 + "---\n" + ALL_V1.split("---\n", 1)[1]
    async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
        for i in range(3):
            s = await trio.open_tcp_stream("127.0.0.1", lp)
            await s.send_all(f"GET http://httpbin:8000/slow?ms=300&only=v1&n={i} HTTP/1.1\r\n"
                             f"Host: httpbin:8000\r\n\r\n".encode())
            await trio.sleep(0.05)  # the request is on its way to v1
            await s.aclose()  # ... and the client is gone before v1 answers
        await _wait(lambda: len(v2.requests) == 3)
        await _wait(lambda: rt.mirrors.sent == 3)
    assert sorted(p for _, p, _ in v2.requests) == [f"/slow?ms=300&only=v1&n={i}" for i in range(3)]


async def test_shadows_go_through_the_mirror_subsets_connection_pool_limits(upstreams):
    # A connectionPool on the mirror's subset protects it from mirrored load, as in Envoy
    # (shadows pass the cluster's circuit breakers): one connection and one pending request
    # to v2, which takes 1.5 s per shadow; of five shadows, two reach v2 and three are dropped
    # and counted as v2's overflow. The primaries (v1) are not touched.
    v1, v2 = upstreams("v1"), upstreams("v2")
    lp = free_port()
    limited_v2 = ALL_V1.replace(
        "      version: v2\n",
        "      version: v2\n"
        "    trafficPolicy:\n"
        "      connectionPool:\n"
        "        tcp: {maxConnections: 1}\n"
        "        http: {http1MaxPendingRequests: 1}\n")
    assert limited_v2 != ALL_V1
    rules = MIRROR_V2 + "---\n" + limited_v2.split("---\n", 1)[1]
    async with running_proxy(_config(rules, v1.port, v2.port, lp)) as rt:
        for i in range(5):
            r = await curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{lp}",
                           f"http://httpbin:8000/slow?ms=1500&only=v2&n={i}")
            assert r.stdout == b"200"
        await _wait(lambda: rt.mirrors.dropped == 3)
        await _wait(lambda: rt.mirrors.sent == 2, timeout=10.0)
        v2_cluster = "outbound|8000|v2|httpbin.default.svc.cluster.local"
        assert rt.stats.cluster(v2_cluster).rq_pending_overflow == 3
    assert sorted(p for _, p, _ in v2.requests) == ["/slow?ms=1500&only=v2&n=0", "/slow?ms=1500&only=v2&n=1"]
    assert len(v1.requests) == 5
