#!/usr/bin/env python3
"""Bookinfo ratings service: star ratings given by the two reviewers.

    GET /ratings/<id>   {"id": <id>, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    GET /health         {"status": "Ratings is healthy"}

``SERVICE_VERSION`` may be ``v1`` (the default and the only data source
here: Istio's v2 reads the same numbers from MongoDB or MySQL).

Run: ``PORT=9080 python3 examples/bookinfo/apps/ratings.py`` (or ``--port``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import App, Request, json_response, serve  # noqa: E402

app = App("ratings")

RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


@app.route("GET", r"/health")
def health(req: Request, m):
    return json_response({"status": "Ratings is healthy"})


@app.route("GET", r"/ratings/(?P<id>[^/]*)")
def ratings(req: Request, m):
    try:
        product_id = int(m["id"])
    except ValueError:
        return json_response({"error": "please provide numeric product ID"}, 400)
    return json_response({"id": product_id, "ratings": dict(RATINGS)})


if __name__ == "__main__":
    version = os.environ.get("SERVICE_VERSION", "v1")
    if version != "v1":
        raise SystemExit(f"ratings: SERVICE_VERSION={version!r} is not supported (only v1)")
    serve(app)
