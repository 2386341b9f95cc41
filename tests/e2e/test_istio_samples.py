"""Istio's own sample files, unchanged, against a running Bookinfo mesh: each one is
either carried out (checked with curl through the ingress gateway) or refused by name
at `route apply` (file:line, the field, "meshctl does not implement"), never accepted
and ignored. The files: tests/data/istio-more (the rest of Istio's
samples/bookinfo/networking) and tests/data/istio-refused (their READMEs credit them)."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from .helpers import bookinfo_workdir
from .test_istio_tasks import RATINGS_UNAVAILABLE, meshctl, page, stars

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parents[1] / "data"


def apply(mesh, *files: str, check: bool = True) -> subprocess.CompletedProcess:
    args = []
    for f in files:
        args += ["-f", f]
    return meshctl("route", "apply", "--wait", *args, cwd=mesh["dir"], check=check)


def get(mesh, path: str) -> tuple[int, dict[str, str], str]:
    r = subprocess.run(["curl", "-s", "--noproxy", "*", "-m", "20", "-D", "-", mesh["gw"] + path],
                       capture_output=True, text=True, timeout=25)
    head, _, body = r.stdout.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    work = tmp_path_factory.mktemp("istio-samples")
    gw_port = bookinfo_workdir(work)
    shutil.copytree(DATA / "istio-more", work / "more")
    shutil.copytree(DATA / "istio-refused", work / "refused")
    meshctl("up", "-d", "-f", "mesh.yaml", cwd=work)
    m = {"dir": work, "gw": f"http://127.0.0.1:{gw_port}"}
    try:
        apply(m, "rules/bookinfo-gateway.yaml", "rules/destination-rule-all.yaml")
        yield m
    finally:
        meshctl("down", cwd=work, check=False)


def test_certmanager_gateway_beside_bookinfos_routes_the_acme_path(mesh):
    apply(mesh, "more/certmanager-gateway.yaml")
    try:
        code, headers, body = get(mesh, "/.well-known/acme-challenge/token")
        # routed to cert-manager-resolver, which this mesh does not run: 503 as in Istio,
        # not 404 "no route" (the VirtualService accepted and ignored)
        assert code == 503, (code, headers, body)
        assert "no route" not in body
        assert page(mesh)[1]  # Bookinfo's own routes on the same port and host still answer
    finally:
        meshctl("route", "delete", "gateway", "cert-manager-gateway", "-n", "istio-system", cwd=mesh["dir"], check=False)
        meshctl("route", "delete", "virtualservice", "cert-manager", "-n", "istio-system", cwd=mesh["dir"], check=False)


def test_reviews_90_10_with_the_random_balancer(mesh):
    apply(mesh, "more/destination-rule-reviews.yaml", "more/virtual-service-reviews-90-10.yaml")
    try:
        seen = Counter(stars(page(mesh)[1]) for _ in range(100))
        assert seen["v3"] == 0 and seen["v2"] >= 1 and seen["v1"] >= 75, seen
    finally:
        meshctl("route", "delete", "virtualservice", "reviews", cwd=mesh["dir"], check=False)


def test_details_v2_which_bookinfo_does_not_run_fails_details_as_in_istio(mesh):
    assert "Error fetching product details" not in page(mesh)[1]
    apply(mesh, "more/virtual-service-details-v2.yaml")
    try:
        assert "Error fetching product details" in page(mesh)[1]
    finally:
        meshctl("route", "delete", "virtualservice", "details", cwd=mesh["dir"], check=False)
    assert "Error fetching product details" not in page(mesh)[1]


@pytest.mark.parametrize("sample", ["virtual-service-ratings-db.yaml", "virtual-service-ratings-mysql.yaml",
                                    "virtual-service-ratings-mysql-vm.yaml"])
def test_ratings_database_samples_send_reviews_to_v3_and_ratings_to_its_missing_subset(mesh, sample):
    apply(mesh, f"more/{sample}")
    try:
        for _ in range(5):
            body = page(mesh)[1]
            assert "reviews-v3-0" in body and RATINGS_UNAVAILABLE in body
    finally:
        meshctl("route", "delete", "virtualservice", "reviews", cwd=mesh["dir"], check=False)
        meshctl("route", "delete", "virtualservice", "ratings", cwd=mesh["dir"], check=False)


def test_a_gateway_for_a_second_ingress_this_mesh_lacks_is_applied_with_a_warning(mesh):
    r = apply(mesh, "more/bookinfo-gateway2.yaml")
    try:
        assert "more/bookinfo-gateway2.yaml:6: spec.selector: Gateway default/bookinfo-gateway2 selects no gateway" in r.stderr
        assert "configures nothing" in r.stderr
    finally:
        meshctl("route", "delete", "virtualservice", "bookinfo2", cwd=mesh["dir"], check=False)
        meshctl("route", "delete", "gateway", "bookinfo-gateway2", cwd=mesh["dir"], check=False)


@pytest.mark.parametrize("sample, where, what", [
    ("mixer-rule-deny-label.yaml", ":2: kind:", "meshctl does not implement handler yet"),
    ("productpage_envoy_ratelimit.yaml", ":2: kind:", "meshctl does not implement EnvoyFilter yet"),
    ("authz-dry-run-deny-path-headers.yaml", ':6: metadata.annotations["istio.io/dry-run"]:',
     "meshctl does not implement the annotation istio.io/dry-run yet"),
    ("httpbin.yaml", ":19: kind:", "ServiceAccount (v1) is a Kubernetes object, not an Istio rule"),
])
def test_what_meshctl_does_not_implement_is_refused_by_name_at_apply(mesh, sample, where, what):
    before = meshctl("route", "get", "-o", "yaml", cwd=mesh["dir"]).stdout
    r = apply(mesh, f"refused/{sample}", check=False)
    assert r.returncode != 0
    assert f"refused/{sample}{where} {what}" in r.stderr, r.stderr
    assert meshctl("route", "get", "-o", "yaml", cwd=mesh["dir"]).stdout == before
