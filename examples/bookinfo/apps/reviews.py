#!/usr/bin/env python3
"""Bookinfo reviews service, in three versions chosen by environment.

    GET /reviews/<id>   {"id": "<id>", "podname": ..., "clustername": ..., "reviews": [...]}
    GET /health         {"status": "Reviews is healthy"}

Environment:
  SERVICE_VERSION  v1 (no ratings), v2 (black stars), v3 (red stars); default v1
  ENABLE_RATINGS   true/false; defaults to true for v2 and v3
  STAR_COLOR       defaults to black for v2, red for v3
  RATINGS_URL      base URL of ratings (default http://ratings:9080, or built
                   from RATINGS_HOSTNAME, SERVICES_DOMAIN, RATINGS_SERVICE_PORT)
  RATINGS_TIMEOUT  seconds; defaults to Istio's hard-coded values: 10 s when
                   the stars are black (v2), 2.5 s otherwise (v3)
  POD_NAME         reported as "podname" (default reviews-<version>-<host>)
  CLUSTER_NAME     reported as "clustername" (default "null")

The call to ratings carries the trace headers, end-user, user-agent, cookie,
authorization and jwt headers of the request being served.
"""

from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    CONTEXT_HEADERS,
    TRACE_HEADERS,
    App,
    Request,
    call,
    env_float,
    forward_headers,
    json_response,
    serve,
    service_url,
)

FORWARDED = TRACE_HEADERS + ("end-user",) + CONTEXT_HEADERS

REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared "
        "to other plays by Shakespeare.",
    ),
)
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"


class Settings:
    def __init__(self, env: dict[str, str] | os._Environ[str]) -> None:
        self.version = env.get("SERVICE_VERSION", "v1")
        if self.version not in ("v1", "v2", "v3"):
            raise SystemExit(f"reviews: SERVICE_VERSION={self.version!r}; expected v1, v2 or v3")
        default_enabled = "false" if self.version == "v1" else "true"
        enabled = env.get("ENABLE_RATINGS", default_enabled).strip().lower()
        if enabled not in ("true", "false"):
            raise SystemExit(f"reviews: ENABLE_RATINGS={enabled!r}; expected true or false")
        self.ratings_enabled = enabled == "true"
        self.star_color = env.get("STAR_COLOR") or ("red" if self.version == "v3" else "black")
        self.ratings_url = service_url("ratings", "RATINGS_URL") + "/ratings"
        self.ratings_timeout = env_float("RATINGS_TIMEOUT", 10.0 if self.star_color == "black" else 2.5)
        self.podname = env.get("POD_NAME") or f"reviews-{self.version}-{socket.gethostname()}"
        self.clustername = env.get("CLUSTER_NAME") or "null"


settings: Settings | None = None
app = App("reviews")


def fetch_ratings(product_id: int, headers: dict[str, str]) -> dict[str, int] | None:
    """Reviewer → stars, or None if ratings could not be had."""
    assert settings is not None
    up = call(f"{settings.ratings_url}/{product_id}", headers, settings.ratings_timeout)
    if up.status != 200:
        sys.stderr.write(f"reviews: ratings unavailable: {up.error or up.status}\n")
        return None
    data = up.json()
    if not isinstance(data, dict) or not isinstance(data.get("ratings"), dict):
        sys.stderr.write("reviews: ratings answered without a 'ratings' object\n")
        return None
    return data["ratings"]


def build_reviews(product_id: int, ratings: dict[str, int] | None) -> dict[str, object]:
    assert settings is not None
    out = []
    for reviewer, text in REVIEWS:
        review: dict[str, object] = {"reviewer": reviewer, "text": text}
        if settings.ratings_enabled:
            stars = (ratings or {}).get(reviewer)
            if isinstance(stars, int) and not isinstance(stars, bool):
                review["rating"] = {"stars": stars, "color": settings.star_color}
            else:
                review["rating"] = {"error": RATINGS_UNAVAILABLE}
        out.append(review)
    return {
        "id": str(product_id),
        "podname": settings.podname,
        "clustername": settings.clustername,
        "reviews": out,
    }


@app.route("GET", r"/health")
def health(req: Request, m):
    return json_response({"status": "Reviews is healthy"})


@app.route("GET", r"/reviews/(?P<id>[^/]*)")
def reviews(req: Request, m):
    assert settings is not None
    try:
        product_id = int(m["id"])
    except ValueError:
        return json_response({"error": "please provide numeric product ID"}, 400)
    ratings = None
    if settings.ratings_enabled:
        ratings = fetch_ratings(product_id, forward_headers(req, FORWARDED))
    return json_response(build_reviews(product_id, ratings))


if __name__ == "__main__":
    settings = Settings(os.environ)
    serve(app)
