#!/usr/bin/env python3
"""Bookinfo details service: facts about a book.

    GET /details/<id>   {"id": <id>, "author": ..., "ISBN-10": ..., ...}
    GET /health         {"status": "Details is healthy"}

Run: ``PORT=9080 python3 examples/bookinfo/apps/details.py`` (or ``--port``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import App, Request, json_response, serve  # noqa: E402

app = App("details")


def book_details(book_id: int) -> dict[str, object]:
    return {
        "id": book_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


@app.route("GET", r"/health")
def health(req: Request, m):
    return json_response({"status": "Details is healthy"})


@app.route("GET", r"/details/(?P<id>[^/]*)")
def details(req: Request, m):
    try:
        book_id = int(m["id"])
    except ValueError:
        return json_response({"error": "please provide numeric product ID"}, 400)
    return json_response(book_details(book_id))


if __name__ == "__main__":
    serve(app)
