"""`meshctl dashboard` in a real headless browser: Debian's chromium driven by
Selenium through chromium-driver (scripts/tools/chromium.sh installs them). Bookinfo
under `meshctl up`, traffic through the gateway, then the page Mixer serves must
show the services and their edges, a fault injected from the CLI, and its screenshot
is kept in test-artifacts/ (MESHCTL_TEST_ARTIFACTS overrides)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.tools.servers import build_tool

from .helpers import bookinfo_workdir
from .test_up_bookinfo import curl, meshctl

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MESHCTL_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def bookinfo(tmp_path_factory, zipkin_server):
    work = tmp_path_factory.mktemp("bookinfo-dash")
    gw_port = bookinfo_workdir(work)
    text = (work / "mesh.yaml").read_text()  # traces to a real Zipkin: the page links to them
    text = text.replace("settings:\n", f"settings:\n  tracing: {{zipkin: '{zipkin_server}', sampling: 100}}\n", 1)
    (work / "mesh.yaml").write_text(text)
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    try:
        meshctl("route", "apply", "--wait", "-f", "rules/bookinfo-gateway.yaml", "-f", "rules/destination-rule-all.yaml",
                "-f", "rules/virtual-service-reviews-v3.yaml", cwd=work)
        yield {"dir": work, "gw": f"http://127.0.0.1:{gw_port}", "zipkin": zipkin_server.http}
    finally:
        meshctl("down", cwd=work, check=False)


@pytest.fixture(scope="module")
def browser():
    driver_path = build_tool("chromium.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
              "--no-proxy-server"):
        opts.add_argument(a)
    for binary in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(binary):
            opts.binary_location = binary
            break
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def wait_until(pred, timeout=30.0, what=""):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_dashboard_shows_the_graph_and_an_injected_fault(bookinfo, browser):
    work, gw = bookinfo["dir"], bookinfo["gw"]
    url = meshctl("dashboard", cwd=work).stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "/dashboard/?token=" in url
    base = url.split("/dashboard/")[0]
    # without the token: no data
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/dashboard/state", timeout=5)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/dashboard/?token=" + "0" * 64, timeout=5)
    assert e.value.code == 403

    wait_until(lambda: curl(gw + "/productpage")[0] == 200, what="productpage through the gateway")
    for _ in range(20):
        assert curl(gw + "/productpage")[0] == 200

    browser.get(url)
    wait_until(lambda: browser.current_url.endswith("/dashboard/"), what="the page past the token")  # the token left the address bar
    # the page redraws every second: read it in one script run, never through stale element handles
    def js(expr):
        return browser.execute_script(f"return {expr};")

    def nodes():
        return set(js('[...document.querySelectorAll("#graph g.node")].map(n => n.dataset.id)'))

    def edges():
        return {tuple(x) for x in js('[...document.querySelectorAll("#graph g.edge")]'
                                     '.map(g => [g.dataset.source, g.dataset.target])')}

    def edge(src, dst):
        return js(f'(g => g && [g.getAttribute("class"), g.textContent])(document.querySelector('
                  f'\'#graph g.edge[data-source="{src}"][data-target="{dst}"]\'))')

    want_nodes = {"istio-ingressgateway", "productpage v1", "details v1", "reviews v3", "ratings v1"}
    wait_until(lambda: want_nodes <= {n.split(" ")[0] if n.startswith("istio-ingressgateway") else n for n in nodes()},
               what=f"graph nodes {want_nodes} (have {nodes()})")
    e = edges()
    for src, dst in (("productpage v1", "details v1"), ("productpage v1", "reviews v3"), ("reviews v3", "ratings v1")):
        assert (src, dst) in e, e
    assert any(s.startswith("istio-ingressgateway") and d == "productpage v1" for s, d in e), e
    cls, label = edge("reviews v3", "ratings v1")
    assert "rps" in label and "p99" in label and "ok" in cls.split(), (cls, label)
    rows = {tuple(r) for r in js('[...document.querySelectorAll("#services tbody tr")]'
                                 '.map(r => [r.dataset.service, r.dataset.version])')}
    assert ("ratings", "v1") in rows and ("reviews", "v3") in rows, rows
    rules = js('document.getElementById("rules").innerText')
    assert "VirtualService" in rules and "bookinfo-gateway" in rules

    # a fault from the CLI shows on the page with its time left, and errors reach the graph
    meshctl("inject-fault", "ratings", "--abort", "500", "--ttl", "5m", cwd=work)
    text = wait_until(lambda: js('[...document.querySelectorAll("#faults tr.fault")]'
                                 '.filter(r => r.dataset.service === "ratings").map(r => r.innerText).join("")'),
                      what="the fault row")
    assert "abort 500" in text and ("min" in text or " s" in text), text
    time.sleep(1.5)
    for _ in range(15):
        curl(gw + "/productpage")
        time.sleep(0.1)
    # aborted at the caller, the requests reach no ratings version: Kiali-style, their edge goes to
    # the service node "ratings", in red
    wait_until(lambda: (edge("reviews v3", "ratings") or [""])[0].split().count("bad") == 1,
               what="a red reviews → ratings edge")
    assert ("ratings", "") in {tuple(x) for x in js('[...document.querySelectorAll("#graph g.node")]'
                                                    '.map(n => [n.dataset.id, n.querySelector(".ver").textContent'
                                                    '.replace("service", "")])')}
    # the trends: per-service charts of the last minutes, drawn by the page's own SVG code;
    # the fault shows as errors in ratings' error-rate chart
    def chart(service, metric):
        return js(f'(s => s && [+s.dataset.points, +s.dataset.max, s.querySelectorAll("polyline, circle").length])'
                  f'(document.querySelector(\'#trends tr[data-service="{service}"] svg.chart[data-metric="{metric}"]\'))')

    wait_until(lambda: (chart("productpage", "rps") or [0])[0] >= 2, what="two points in productpage's rps chart")
    pts, top, drawn = chart("productpage", "rps")
    assert top > 0 and drawn >= 1
    assert (chart("productpage", "p99") or [0])[0] >= 1
    wait_until(lambda: (chart("ratings", "error_rate") or [0, 0])[1] > 0, what="ratings' errors in its error-rate chart")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard-bookinfo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    meshctl("inject-fault", "clear", "ratings", cwd=work)
    wait_until(lambda: js('document.querySelectorAll("#faults tr.fault").length') == 0, what="the fault row to go")
    # the state behind the page, as JSON, with the cookie the browser got
    cookie = browser.get_cookie("meshctl_dashboard")
    assert cookie and cookie["httpOnly"]
    req = urllib.request.Request(base + "/dashboard/state", headers={"cookie": f"meshctl_dashboard={cookie['value']}"})
    st = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert any(e["source"] == "reviews v3" and e["target"] == "ratings v1" for e in st["edges"])

    # links from a service to its recent traces, in the Zipkin the mesh sends spans to
    zipkin = bookinfo["zipkin"]
    href = js('(a => a && a.href)(document.querySelector(\'#trends tr[data-service="productpage"] a.traces\'))')
    assert href and href.startswith(zipkin + "/zipkin/?serviceName=productpage.default"), href
    traces = wait_until(lambda: json.loads(urllib.request.urlopen(
        zipkin + "/api/v2/traces?serviceName=productpage.default&limit=10", timeout=5).read()), what="productpage's traces")
    assert all(any(s["localEndpoint"]["serviceName"] == "productpage.default" for s in t) for t in traces)
    assert any(s["localEndpoint"]["serviceName"] == "reviews.default" for t in traces for s in t)
    browser.get(href)  # Zipkin's own UI, served by the Zipkin server (no CDN either)
    wait_until(lambda: "zipkin" in (browser.title or "").lower(), what="Zipkin's UI")


def test_dashboard_open_keeps_the_token_off_the_browsers_command_line(bookinfo, browser, tmp_path, monkeypatch):
    # A browser's argv is readable by every local user (/proc/PID/cmdline): `--open` hands it a
    # 0600 file of the state directory that moves on to the page, and the page still opens.
    argv = tmp_path / "argv"
    fake = tmp_path / "browser.sh"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("BROWSER", str(fake))
    url = meshctl("dashboard", "--open", cwd=bookinfo["dir"]).stdout.strip()
    token = url.split("?token=")[1]
    wait_until(argv.exists, timeout=10, what="the browser started")
    (opened,) = argv.read_text().split()
    assert token not in opened and opened.startswith("file://") and opened.endswith("/.meshctl/dashboard.html"), opened
    opener = Path(opened[len("file://"):])
    assert opener.stat().st_mode & 0o777 == 0o600
    browser.get(url.split("?token=")[0])  # the cookie (Path=/dashboard) of the test before: gone
    browser.delete_all_cookies()
    browser.get(url.split("?token=")[0])
    assert "needs the dashboard token" in browser.page_source
    browser.get(opened)
    wait_until(lambda: browser.current_url.endswith("/dashboard/"), what="the dashboard from the opener file")
    wait_until(lambda: browser.execute_script('return document.querySelector("#graph") !== null'),
               what="the dashboard page, not the token page (the cookie was sent)")
    assert "needs the dashboard token" not in browser.page_source
