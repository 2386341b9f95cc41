#!/usr/bin/env python3
"""Bookinfo productpage: the web front end, calling details and reviews.

    GET  /                               index page listing the test users
    GET  /productpage                    the book page (details + reviews)
    GET  /login, POST /login             sign in (form field "username"; sets cookie "user")
    GET  /logout                         sign out
    GET  /api/v1/products                the product list
    GET  /api/v1/products/<id>           details of one product (from details)
    GET  /api/v1/products/<id>/reviews   its reviews (from reviews)
    GET  /api/v1/products/<id>/ratings   its ratings (from ratings)
    GET  /health

Calls go to http://details:9080, http://reviews:9080 and http://ratings:9080
through whatever HTTP_PROXY says (the mesh sets it to the sidecar). Each base
URL can be replaced with DETAILS_URL / REVIEWS_URL / RATINGS_URL.

Timeouts, as in Istio's sample: details 3 s; reviews 3 s per attempt and two
attempts in all (one retry, on any failure); ratings 3 s. DETAILS_TIMEOUT,
REVIEWS_TIMEOUT and RATINGS_TIMEOUT override them (seconds).

Trace headers, user-agent, cookie, authorization and jwt are copied from the
request being served; the "user" cookie becomes the "end-user" header.
"""

from __future__ import annotations

import html
import os
import sys
import urllib.parse
from http.cookies import SimpleCookie

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    CONTEXT_HEADERS,
    TRACE_HEADERS,
    App,
    Request,
    Response,
    call,
    env_float,
    forward_headers,
    html_response,
    json_response,
    redirect,
    serve,
    service_url,
)

DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Sorry, product ratings are currently unavailable for this book."
REVIEWS_ATTEMPTS = 2

PRODUCTS = [
    {
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": (
            '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
            "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his "
            "shortest and one of his most farcical comedies, with a major part of the humour "
            "coming from slapstick and mistaken identity, in addition to puns and word play."
        ),
    }
]


class Settings:
    def __init__(self) -> None:
        self.details = service_url("details", "DETAILS_URL")
        self.reviews = service_url("reviews", "REVIEWS_URL")
        self.ratings = service_url("ratings", "RATINGS_URL")
        self.details_timeout = env_float("DETAILS_TIMEOUT", 3.0)
        self.reviews_timeout = env_float("REVIEWS_TIMEOUT", 3.0)
        self.ratings_timeout = env_float("RATINGS_TIMEOUT", 3.0)


settings: Settings | None = None
app = App("productpage")


# --------------------------------------------------------------------------
# calls to the other services


def current_user(req: Request) -> str:
    return req.cookies().get("user", "")


def outbound_headers(req: Request) -> dict[str, str]:
    headers = forward_headers(req, TRACE_HEADERS + CONTEXT_HEADERS)
    user = current_user(req)
    if user:
        headers["end-user"] = user
    return headers


def get_details(product_id: int, headers: dict[str, str]) -> tuple[int, dict]:
    assert settings is not None
    up = call(f"{settings.details}/details/{product_id}", headers, settings.details_timeout)
    data = up.json() if up.status == 200 else None
    if isinstance(data, dict):
        return 200, data
    _log_failure("details", up)
    return up.status or 500, {"error": DETAILS_UNAVAILABLE}


def get_reviews(product_id: int, headers: dict[str, str]) -> tuple[int, dict]:
    assert settings is not None
    up = None
    for _ in range(REVIEWS_ATTEMPTS):
        up = call(f"{settings.reviews}/reviews/{product_id}", headers, settings.reviews_timeout)
        data = up.json() if up.status == 200 else None
        if isinstance(data, dict):
            return 200, data
        _log_failure("reviews", up)
    return (up.status if up else None) or 500, {"error": REVIEWS_UNAVAILABLE}


def get_ratings(product_id: int, headers: dict[str, str]) -> tuple[int, dict]:
    assert settings is not None
    up = call(f"{settings.ratings}/ratings/{product_id}", headers, settings.ratings_timeout)
    data = up.json() if up.status == 200 else None
    if isinstance(data, dict):
        return 200, data
    _log_failure("ratings", up)
    return up.status or 500, {"error": RATINGS_UNAVAILABLE}


def _log_failure(service: str, up) -> None:
    why = up.error or f"HTTP {up.status} with a body that is not a JSON object"
    sys.stderr.write(f"productpage: {service} failed: {why}\n")


# --------------------------------------------------------------------------
# HTML

E = html.escape

STYLE = """
body { font-family: sans-serif; margin: 0; }
nav { background: #222; color: #eee; padding: 8px 16px; display: flex; justify-content: space-between; }
nav a { color: #eee; }
main { padding: 16px; max-width: 960px; margin: auto; }
.error { color: #a00; font-weight: bold; }
.columns { display: flex; gap: 32px; }
.columns > section { flex: 1; }
blockquote { border-left: 4px solid #ccc; margin: 12px 0; padding: 4px 12px; }
.star { font-size: 1.2em; }
"""


def page(title: str, body: str, user: str = "") -> str:
    if user:
        who = f'Signed in as <b class="user">{E(user)}</b> &middot; <a href="/logout">sign out</a>'
    else:
        who = (
            '<form method="post" action="/login" style="display:inline">'
            '<input name="username" placeholder="User Name"> '
            '<input name="passwd" type="password" placeholder="Password"> '
            '<button type="submit">Sign in</button></form>'
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{E(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f'<nav><a href="/productpage">BookInfo Sample</a><span>{who}</span></nav>\n'
        f"<main>\n{body}\n</main>\n</body></html>\n"
    )


def stars_html(rating: dict) -> str:
    if "error" in rating:
        return f'<p class="rating-error"><i>{E(str(rating["error"]))}</i></p>'
    try:
        stars = max(0, min(5, int(rating.get("stars", 0))))
    except (TypeError, ValueError):
        return ""
    color = str(rating.get("color", "black"))
    full = '<span class="star glyphicon glyphicon-star">&#9733;</span>' * stars
    empty = '<span class="star glyphicon glyphicon-star-empty">&#9734;</span>' * (5 - stars)
    return (
        f'<p class="rating" data-stars="{stars}" data-color="{E(color)}">'
        f'<font color="{E(color)}">{full}{empty}</font> '
        f"<small>{stars} of 5 stars ({E(color)})</small></p>"
    )


def details_html(status: int, details: dict) -> str:
    if "error" in details:
        return f'<h4>Error fetching product details!</h4><p class="error">{E(str(details["error"]))}</p>'
    rows = [
        ("Type", details.get("type")),
        ("Pages", details.get("pages")),
        ("Publisher", details.get("publisher")),
        ("Language", details.get("language")),
        ("ISBN-10", details.get("ISBN-10")),
        ("ISBN-13", details.get("ISBN-13")),
    ]
    items = "".join(f"<dt>{E(k)}:</dt><dd>{E(str(v))}</dd>" for k, v in rows if v is not None)
    author = details.get("author")
    year = details.get("year")
    by = f"<p>by {E(str(author))}{', ' + E(str(year)) if year else ''}</p>" if author else ""
    return f'<h4>Book Details</h4>{by}<dl class="details">{items}</dl>'


def reviews_html(status: int, reviews: dict) -> str:
    if "error" in reviews:
        return f'<h4>Error fetching product reviews!</h4><p class="error">{E(str(reviews["error"]))}</p>'
    parts = ["<h4>Book Reviews</h4>"]
    for r in reviews.get("reviews") or []:
        if not isinstance(r, dict):
            continue
        rating = r.get("rating")
        parts.append(
            '<blockquote class="review">'
            f'<p>{E(str(r.get("text", "")))}</p>'
            f'<small>{E(str(r.get("reviewer", "")))}</small>'
            f"{stars_html(rating) if isinstance(rating, dict) else ''}"
            "</blockquote>"
        )
    pod = reviews.get("podname")
    cluster = reviews.get("clustername")
    if pod:
        served = f'Reviews served by: <u class="podname">{E(str(pod))}</u>'
        if cluster and cluster != "null":
            served += f' on cluster <u class="clustername">{E(str(cluster))}</u>'
        parts.append(f"<dl><dt>{served}</dt></dl>")
    return "".join(parts)


# --------------------------------------------------------------------------
# routes


@app.route("GET", r"/")
def index(req: Request, m):
    body = (
        "<h2>Hello! This is a simple bookstore application consisting of three services "
        "as shown below</h2>\n"
        "<pre>productpage &rarr; details\n            &rarr; reviews &rarr; ratings</pre>\n"
        '<p>Click on one of the links below to auto generate a request to the backend '
        "as a real user or a tester</p>\n"
        '<ul class="users">'
        '<li><a href="/productpage?u=normal">Normal user</a></li>'
        '<li><a href="/productpage?u=test">Test user</a></li>'
        "</ul>\n"
        "<p>Sign in (any password) as <b>jason</b> to be the test user of Istio's "
        "request-routing and fault-injection tasks.</p>"
    )
    return html_response(page("Simple Bookstore App", body, current_user(req)))


@app.route("GET", r"/health")
def health(req: Request, m):
    return json_response({"status": "Productpage is healthy"})


@app.route("GET", r"/login")
def login_form(req: Request, m):
    body = '<h3>Sign in</h3><p>Use the form at the top of the page; any password is accepted.</p>'
    return html_response(page("Sign in", body, current_user(req)))


def _user_cookie(value: str, clear: bool = False) -> tuple[str, str]:
    jar = SimpleCookie()
    jar["user"] = value
    jar["user"]["path"] = "/"
    if clear:
        jar["user"]["max-age"] = 0
    return ("Set-Cookie", jar["user"].OutputString())


@app.route("POST", r"/login")
def login(req: Request, m):
    form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"))
    user = (form.get("username") or [""])[0].strip()
    if not user:
        return html_response(page("Sign in", '<p class="error">Please enter a user name.</p>'), 400)
    return redirect("/productpage", [_user_cookie(user)])


@app.route("GET", r"/logout")
def logout(req: Request, m):
    return redirect("/productpage", [_user_cookie("", clear=True)])


@app.route("GET", r"/productpage")
def productpage(req: Request, m):
    product_id = 0
    headers = outbound_headers(req)
    product = PRODUCTS[0]
    d_status, details = get_details(product_id, headers)
    r_status, reviews = get_reviews(product_id, headers)
    body = (
        f'<h3 class="title">{E(product["title"])}</h3>\n'
        f'<p class="summary">{product["descriptionHtml"]}</p>\n'
        '<div class="columns">'
        f'<section id="details">{details_html(d_status, details)}</section>'
        f'<section id="reviews">{reviews_html(r_status, reviews)}</section>'
        "</div>"
    )
    return html_response(page("Simple Bookstore App", body, current_user(req)))


@app.route("GET", r"/api/v1/products")
def products(req: Request, m):
    return json_response(PRODUCTS)


def _product_id(m) -> int | None:
    try:
        return int(m["id"])
    except ValueError:
        return None


def _bad_id() -> Response:
    return json_response({"error": "please provide numeric product ID"}, 400)


@app.route("GET", r"/api/v1/products/(?P<id>[^/]+)")
def product(req: Request, m):
    pid = _product_id(m)
    if pid is None:
        return _bad_id()
    status, data = get_details(pid, outbound_headers(req))
    return json_response(data, status)


@app.route("GET", r"/api/v1/products/(?P<id>[^/]+)/reviews")
def product_reviews(req: Request, m):
    pid = _product_id(m)
    if pid is None:
        return _bad_id()
    status, data = get_reviews(pid, outbound_headers(req))
    return json_response(data, status)


@app.route("GET", r"/api/v1/products/(?P<id>[^/]+)/ratings")
def product_ratings(req: Request, m):
    pid = _product_id(m)
    if pid is None:
        return _bad_id()
    status, data = get_ratings(pid, outbound_headers(req))
    return json_response(data, status)


if __name__ == "__main__":
    settings = Settings()
    serve(app)
