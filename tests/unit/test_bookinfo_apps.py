"""The Bookinfo example services, run as real processes on loopback.

Each app is started with PORT=0 and reports the port it bound on stderr.
Services are wired to each other with DETAILS_URL / REVIEWS_URL / RATINGS_URL,
or to small in-test HTTP servers that record what they receive (and can be
slow, failing, or act as an HTTP proxy).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

APPS = Path(__file__).resolve().parents[2] / "examples" / "bookinfo" / "apps"

DETAILS_SORRY = "Sorry, product details are currently unavailable for this book."
REVIEWS_SORRY = "Sorry, product reviews are currently unavailable for this book."
RATINGS_DOWN = "Ratings service is currently unavailable"
REVIEW1 = "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"
REVIEW2 = (
    "Absolutely fun and entertaining. The play lacks thematic depth when compared "
    "to other plays by Shakespeare."
)
RATINGS_JSON = {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}

_SCRUB = re.compile(
    r"(?i)^(https?_proxy|all_proxy|no_proxy|port|(details|reviews|ratings)_(url|timeout|hostname|service_port)"
    r"|services_domain|service_version|enable_ratings|star_color|pod_name|cluster_name|details_timeout)$"
)


# --------------------------------------------------------------------------
# helpers: app processes


class AppProc:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path, port: int) -> None:
        self.name, self.proc, self.log, self.port = name, proc, log, port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., AppProc]]:
    procs: list[AppProc] = []

    def start(name: str, **env: str) -> AppProc:
        full_env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
        full_env.update(PORT="0", **env)
        log = tmp_path / f"{name}-{len(procs)}.log"
        with open(log, "wb") as errf:
            proc = subprocess.Popen(
                [sys.executable, str(APPS / f"{name}.py")],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errf,
            )
        deadline = time.monotonic() + 30  # an app start-up: generous for a loaded machine
        while True:
            m = re.search(rf"{name} listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            if m:
                app = AppProc(name, proc, log, int(m.group(1)))
                procs.append(app)
                return app
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{name} did not start: {log.read_text()}")
            time.sleep(0.02)

    yield start
    for app in procs:
        app.proc.terminate()
    for app in procs:
        try:
            app.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            app.proc.kill()
            app.proc.wait()


_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


_direct_noredirect = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _direct.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    status, body = get(url, headers)
    return status, json.loads(body)


# --------------------------------------------------------------------------
# helpers: in-test HTTP servers that record what they get


class Recorder:
    """A loopback HTTP server recording each request (request line + headers).

    ``respond(handler) -> (status, json_obj)`` decides the answer; it may sleep.
    """

    def __init__(self, respond: Callable[["Recorder", BaseHTTPRequestHandler], tuple[int, object]]) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        rec = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with rec.lock:
                    rec.requests.append((self.requestline, {k.lower(): v for k, v in self.headers.items()}))
                status, obj = respond(rec, self)
                body = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        class S(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.server = S(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(respond: Callable[[Recorder, BaseHTTPRequestHandler], tuple[int, object]]) -> Recorder:
        r = Recorder(respond)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def dead_url() -> str:
    """A loopback URL on which nothing listens."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def reviews_json(version: str) -> dict:
    reviews: list[dict] = [{"reviewer": "Reviewer1", "text": REVIEW1}, {"reviewer": "Reviewer2", "text": REVIEW2}]
    return {"id": "0", "podname": f"fake-{version}", "clustername": "null", "reviews": reviews}


DETAILS_JSON = {
    "id": 0,
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
    "ISBN-10": "1234567890",
    "ISBN-13": "123-1234567890",
}


def count_stars(page: str, color: str) -> tuple[int, int]:
    """(full, empty) star glyphs inside <font color=...> blocks of ``color``."""
    blocks = re.findall(rf'<font color="{color}">(.*?)</font>', page, re.S)
    text = "".join(blocks)
    return text.count("glyphicon-star\""), text.count("glyphicon-star-empty")


# --------------------------------------------------------------------------
# the services on their own


def test_details_ratings_reviews_answer_istio_json_shapes(start_app) -> None:
    details = start_app("details")
    ratings = start_app("ratings")
    v1 = start_app("reviews", SERVICE_VERSION="v1", RATINGS_URL=ratings.url, POD_NAME="reviews-v1-abc")
    v2 = start_app("reviews", SERVICE_VERSION="v2", RATINGS_URL=ratings.url)

    assert get_json(details.url + "/details/0") == (200, DETAILS_JSON)
    assert get_json(details.url + "/details/7")[1]["id"] == 7
    assert get_json(details.url + "/details/abc")[0] == 400
    assert get_json(ratings.url + "/ratings/0") == (200, RATINGS_JSON)
    assert get_json(ratings.url + "/health") == (200, {"status": "Ratings is healthy"})
    assert get(details.url + "/nothing-here")[0] == 404

    status, body = get_json(v1.url + "/reviews/0")
    assert status == 200
    assert body == {
        "id": "0",
        "podname": "reviews-v1-abc",
        "clustername": "null",
        "reviews": [{"reviewer": "Reviewer1", "text": REVIEW1}, {"reviewer": "Reviewer2", "text": REVIEW2}],
    }
    status, body = get_json(v2.url + "/reviews/0")
    assert [r["rating"] for r in body["reviews"]] == [
        {"stars": 5, "color": "black"},
        {"stars": 4, "color": "black"},
    ]
    assert body["podname"].startswith("reviews-v2-")
    # one log line per request on stderr
    assert '"GET /details/0" 200' in details.log_text()


@pytest.mark.parametrize(
    "version, color",
    [("v1", None), ("v2", "black"), ("v3", "red")],
)
def test_productpage_shows_details_and_the_reviews_version(start_app, version: str, color: str | None) -> None:
    ratings = start_app("ratings")
    details = start_app("details")
    reviews = start_app("reviews", SERVICE_VERSION=version, RATINGS_URL=ratings.url)
    pp = start_app("productpage", DETAILS_URL=details.url, REVIEWS_URL=reviews.url, RATINGS_URL=ratings.url)

    status, page = get(pp.url + "/productpage")
    assert status == 200
    assert "The Comedy of Errors" in page
    for fact in ("paperback", "PublisherA", "English", "1234567890", "123-1234567890"):
        assert fact in page
    assert REVIEW1 in page and REVIEW2 in page
    assert "Reviewer1" in page and "Reviewer2" in page
    assert f"reviews-{version}-" in page  # which version answered
    assert DETAILS_SORRY not in page and REVIEWS_SORRY not in page
    if color is None:
        assert "glyphicon-star" not in page and "<font color" not in page
    else:
        assert count_stars(page, color) == (5 + 4, 0 + 1)
        assert f"5 of 5 stars ({color})" in page and f"4 of 5 stars ({color})" in page
        other = "red" if color == "black" else "black"
        assert f'<font color="{other}">' not in page

    # the JSON API goes to the same backends
    assert get_json(pp.url + "/api/v1/products/0") == (200, DETAILS_JSON)
    assert get_json(pp.url + "/api/v1/products/0/ratings") == (200, RATINGS_JSON)
    status, rv = get_json(pp.url + "/api/v1/products/0/reviews")
    assert status == 200 and rv["podname"].startswith(f"reviews-{version}-")


def test_productpage_index_login_logout_and_health(start_app) -> None:
    pp = start_app("productpage", DETAILS_URL=dead_url(), REVIEWS_URL=dead_url(), RATINGS_URL=dead_url())
    status, index = get(pp.url + "/")
    assert status == 200 and "/productpage?u=normal" in index and "/productpage?u=test" in index
    assert get_json(pp.url + "/health") == (200, {"status": "Productpage is healthy"})
    status, products = get_json(pp.url + "/api/v1/products")
    assert status == 200 and products[0]["id"] == 0 and products[0]["title"] == "The Comedy of Errors"

    req = urllib.request.Request(pp.url + "/login", data=b"username=jason&passwd=x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        _direct_noredirect.open(req, timeout=10)
    assert exc.value.code == 302
    assert exc.value.headers["Location"] == "/productpage"
    assert exc.value.headers["Set-Cookie"].startswith("user=jason")

    status, page = get(pp.url + "/productpage", {"Cookie": "user=jason"})
    assert "Signed in as <b class=\"user\">jason</b>" in page

    with pytest.raises(urllib.error.HTTPError) as exc:
        _direct_noredirect.open(pp.url + "/logout", timeout=10)
    assert exc.value.code == 302
    cookie = exc.value.headers["Set-Cookie"]
    assert cookie.startswith("user=") and "Max-Age=0" in cookie


# --------------------------------------------------------------------------
# headers travel down the call chain


def test_end_user_and_trace_headers_reach_details_reviews_and_ratings(start_app, recorder) -> None:
    fake_ratings = recorder(lambda r, h: (200, RATINGS_JSON))
    fake_details = recorder(lambda r, h: (200, DETAILS_JSON))
    reviews = start_app("reviews", SERVICE_VERSION="v2", RATINGS_URL=fake_ratings.url)
    pp = start_app("productpage", DETAILS_URL=fake_details.url, REVIEWS_URL=reviews.url)

    trace = {
        "x-request-id": "req-42",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
        "x-b3-spanid": "e457b5a2e4d86bd1",
        "x-b3-sampled": "1",
        "User-Agent": "bookinfo-test/1",
    }
    status, page = get(pp.url + "/productpage", {**trace, "Cookie": "user=jason"})
    assert status == 200 and "5 of 5 stars (black)" in page

    (_, got_details), = fake_details.requests
    (line, got_ratings), = fake_ratings.requests
    assert line.startswith("GET /ratings/0 ")
    for got in (got_details, got_ratings):
        assert got["end-user"] == "jason"
        assert got["cookie"] == "user=jason"
        for name, value in trace.items():
            assert got[name.lower()] == value

    # without the cookie there is no end-user
    get(pp.url + "/productpage", {"x-request-id": "req-43", "end-user": "mallory"})
    _, got_ratings = fake_ratings.requests[-1]
    assert "end-user" not in got_ratings
    assert got_ratings["x-request-id"] == "req-43"


# --------------------------------------------------------------------------
# timeouts, retries and failures


def test_slow_reviews_times_out_after_two_attempts(start_app, recorder) -> None:
    def slow(rec: Recorder, h: BaseHTTPRequestHandler) -> tuple[int, object]:
        time.sleep(6)
        return 200, reviews_json("slow")

    slow_reviews = recorder(slow)
    details = start_app("details")
    pp = start_app("productpage", DETAILS_URL=details.url, REVIEWS_URL=slow_reviews.url, REVIEWS_TIMEOUT="0.3")

    t0 = time.monotonic()
    status, page = get(pp.url + "/productpage")
    elapsed = time.monotonic() - t0
    assert status == 200
    assert REVIEWS_SORRY in page
    assert "PublisherA" in page  # details still shown
    assert slow_reviews.count() == 2
    assert 0.6 <= elapsed < 3.5  # two 0.3 s attempts, not the server's 6 s (slack for a loaded machine)
    status, body = get_json(pp.url + "/api/v1/products/0/reviews")
    assert status == 500 and body == {"error": REVIEWS_SORRY}


def test_failed_reviews_is_retried_once(start_app, recorder) -> None:
    def flaky(rec: Recorder, h: BaseHTTPRequestHandler) -> tuple[int, object]:
        # fails on odd-numbered requests (1st, 3rd, ...), succeeds on even ones
        return (503, {"error": "busy"}) if rec.count() % 2 == 1 else (200, reviews_json("flaky"))

    flaky_reviews = recorder(flaky)
    pp = start_app("productpage", DETAILS_URL=dead_url(), REVIEWS_URL=flaky_reviews.url)
    status, page = get(pp.url + "/productpage")
    assert status == 200 and REVIEW1 in page and "fake-flaky" in page
    assert flaky_reviews.count() == 2
    assert DETAILS_SORRY in page

    always = recorder(lambda r, h: (503, {"error": "busy"}))
    pp2 = start_app("productpage", DETAILS_URL=dead_url(), REVIEWS_URL=always.url)
    status, page = get(pp2.url + "/productpage")
    assert REVIEWS_SORRY in page and always.count() == 2
    assert "productpage: reviews failed: HTTP 503" in pp2.log_text()


def test_dead_ratings_gives_ratings_unavailable(start_app) -> None:
    details = start_app("details")
    reviews = start_app("reviews", SERVICE_VERSION="v2", RATINGS_URL=dead_url())
    pp = start_app("productpage", DETAILS_URL=details.url, REVIEWS_URL=reviews.url)

    status, body = get_json(reviews.url + "/reviews/0")
    assert status == 200
    assert [r["rating"] for r in body["reviews"]] == [{"error": RATINGS_DOWN}] * 2
    assert [r["text"] for r in body["reviews"]] == [REVIEW1, REVIEW2]
    status, page = get(pp.url + "/productpage")
    assert page.count(RATINGS_DOWN) == 2 and REVIEW1 in page
    assert "glyphicon-star" not in page


def test_slow_ratings_hits_the_reviews_timeout(start_app, recorder) -> None:
    def slow(rec: Recorder, h: BaseHTTPRequestHandler) -> tuple[int, object]:
        time.sleep(6)
        return 200, RATINGS_JSON

    slow_ratings = recorder(slow)
    reviews = start_app("reviews", SERVICE_VERSION="v3", RATINGS_URL=slow_ratings.url, RATINGS_TIMEOUT="0.3")
    t0 = time.monotonic()
    status, body = get_json(reviews.url + "/reviews/0")
    assert time.monotonic() - t0 < 3.5  # the 0.3 s timeout, not the server's 6 s (slack for a loaded machine)
    assert [r["rating"] for r in body["reviews"]] == [{"error": RATINGS_DOWN}] * 2


def test_bad_settings_stop_the_app_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
    for name, extra, needle in [
        ("reviews", {"SERVICE_VERSION": "v9"}, "SERVICE_VERSION='v9'"),
        ("productpage", {"REVIEWS_TIMEOUT": "soon"}, "REVIEWS_TIMEOUT='soon'"),
        ("details", {"PORT": "http"}, "PORT='http'"),
    ]:
        proc = subprocess.run(
            [sys.executable, str(APPS / f"{name}.py")],
            env={**env, "PORT": "0", **extra},
            capture_output=True,
            text=True,
            timeout=60,  # a process start-up: generous for a loaded machine
        )
        assert proc.returncode != 0
        assert needle in proc.stderr


# --------------------------------------------------------------------------
# the standard proxy environment (how the mesh gets in between)


def _proxy_answer(rec: Recorder, h: BaseHTTPRequestHandler) -> tuple[int, object]:
    if h.path.startswith("http://details:9080/details/"):
        return 200, {**DETAILS_JSON, "publisher": "ViaTheProxy"}
    if h.path.startswith("http://reviews:9080/reviews/"):
        return 200, reviews_json("proxied")
    return 404, {"error": f"unexpected {h.path}"}


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy"])
def test_productpage_calls_services_by_name_through_http_proxy(start_app, recorder, var: str) -> None:
    proxy = recorder(_proxy_answer)
    pp = start_app("productpage", **{var: proxy.url})
    status, page = get(pp.url + "/productpage", {"Cookie": "user=jason"})
    assert status == 200
    lines = [line for line, _ in proxy.requests]
    assert "GET http://details:9080/details/0 HTTP/1.1" in lines
    assert "GET http://reviews:9080/reviews/0 HTTP/1.1" in lines
    assert "ViaTheProxy" in page and "fake-proxied" in page
    hdrs = dict(proxy.requests[0][1])
    assert hdrs["host"] in ("details:9080", "reviews:9080")
    assert hdrs["end-user"] == "jason"


def test_no_proxy_sends_listed_hosts_direct(start_app, recorder) -> None:
    proxy = recorder(_proxy_answer)
    direct_details = recorder(lambda r, h: (200, {**DETAILS_JSON, "publisher": "Direct"}))
    pp = start_app(
        "productpage",
        HTTP_PROXY=proxy.url,
        NO_PROXY="127.0.0.1,localhost",
        DETAILS_URL=direct_details.url,
    )
    status, page = get(pp.url + "/productpage")
    assert "Direct" in page and "fake-proxied" in page
    assert [line for line, _ in direct_details.requests] == ["GET /details/0 HTTP/1.1"]
    assert [line for line, _ in proxy.requests] == ["GET http://reviews:9080/reviews/0 HTTP/1.1"]


def test_reviews_calls_ratings_by_name_through_http_proxy(start_app, recorder) -> None:
    proxy = recorder(lambda r, h: (200, RATINGS_JSON) if h.path.startswith("http://ratings:9080/") else (404, {}))
    reviews = start_app("reviews", SERVICE_VERSION="v2", HTTP_PROXY=proxy.url)
    status, body = get_json(reviews.url + "/reviews/0", {"end-user": "jason"})
    assert body["reviews"][0]["rating"] == {"stars": 5, "color": "black"}
    (line, hdrs), = proxy.requests
    assert line == "GET http://ratings:9080/ratings/0 HTTP/1.1"
    assert hdrs["end-user"] == "jason"
