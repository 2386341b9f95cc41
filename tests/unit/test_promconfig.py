"""mixer/promconfig.py: the scrape configuration `meshctl prometheus-config` prints."""

import yaml

from meshctl.mixer.promconfig import scrape_config

STATUS = {
    "workloads": [
        {"name": "reviews-v2-0", "service": "reviews", "version": "v2", "admin_address": "127.0.0.1:21005"},
        {"name": "ratings-v1-0", "service": "ratings", "version": "v1", "admin_address": "127.0.0.1:21009"},
    ],
    "gateways": [{"name": "istio-ingressgateway", "address": "127.0.0.1:8080"}],
}


def test_every_sidecar_and_gateway_is_a_target_with_its_labels():
    doc = yaml.safe_load(scrape_config(STATUS, {"istio-ingressgateway/admin": 21050}, "1s"))
    assert doc["global"]["scrape_interval"] == "1s"
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    side = jobs["meshctl-sidecars"]
    assert side["metrics_path"] == "/metrics"
    assert [c["targets"] for c in side["static_configs"]] == [["127.0.0.1:21005"], ["127.0.0.1:21009"]]
    assert side["static_configs"][0]["labels"] == {"meshctl_instance": "reviews-v2-0", "app": "reviews",
                                                   "version": "v2"}
    gw = jobs["meshctl-gateways"]["static_configs"]
    assert gw == [{"targets": ["127.0.0.1:21050"], "labels": {"meshctl_instance": "istio-ingressgateway",
                                                              "app": "istio-ingressgateway"}}]


def test_no_mesh_gives_empty_jobs_not_an_error():
    doc = yaml.safe_load(scrape_config({}, {}))
    assert all(j["static_configs"] == [] for j in doc["scrape_configs"])
