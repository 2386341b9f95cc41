from __future__ import annotations

import pytest

from meshctl.protocol.detect import PREFACE, PREFACE_LEN, detect


def test_preface_length():
    assert len(PREFACE) == PREFACE_LEN == 24


@pytest.mark.parametrize(
    "prefix,expected",
    [
        (b"", None),
        (PREFACE, "h2"),
        (PREFACE + b"\x00\x00\x12\x04", "h2"),
        (PREFACE[:10], None),  # could still be the preface
        (b"PRI * HTTP/1.1\r\n", "http1"),  # diverged from the preface: a method PRI
        (b"\x16", None),
        (b"\x16\x03\x01\x02\x00\x01", "tls"),
        (b"\x16\x01", "tcp"),
        (b"GET / HTTP/1.1\r\n", "http1"),
        (b"POST ", "http1"),
        (b"M-SEARCH * HTTP/1.1", "http1"),
        (b"GE", None),
        (b"DELETE", None),
        (b"\x00\x00\x00\x0c", "tcp"),  # e.g. a database protocol
        (b"SSH-2.0-x\r\n", "tcp"),
        (b"A" * 21, "tcp"),
        (b"GET\r\n", "tcp"),
    ],
)
def test_detect(prefix, expected):
    assert detect(prefix) == expected


def test_every_prefix_of_a_request_is_undecided_or_http1():
    line = b"OPTIONS * HTTP/1.1\r\n"
    assert all(detect(line[:i]) is None for i in range(1, 8))
    assert detect(line[:8]) == "http1"
