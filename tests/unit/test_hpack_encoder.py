"""The codec's own HPACK encoder (protocol/http2.py, RFC 7541) against two decoders
that are not ours: jh2's native one and the pure-Python hpack package."""

from __future__ import annotations

import random

from hpack import Decoder as PureDecoder
from hpack import NeverIndexedHeaderTuple
from jh2._hazmat import Decoder as NativeDecoder

from meshctl.protocol.http2 import _HpackEncoder


def _decoders():
    return NativeDecoder(), PureDecoder()


def _check(enc, decs, fields):
    block = enc.encode(fields)
    native, pure = decs
    got = [(n, v) for n, v, *_ in native.decode(block, raw=True)]
    want = [(n, v) for n, v, _ in fields]
    assert got == want
    plain = pure.decode(block, raw=True)
    assert [(bytes(n), bytes(v)) for n, v in plain] == want
    assert [isinstance(f, NeverIndexedHeaderTuple) for f in plain] == [never for _, _, never in fields]
    return block


def test_many_blocks_with_evictions_decode_as_sent_on_both_decoders():
    rnd = random.Random(7)
    names = [b"content-type", b"x-app", b"user-agent", b":path", b"x-" + b"n" * 40, b"grpc-status", b"cookie"]
    values = [b"", b"0", b"application/grpc", b"v" * 200, b"caf\xe9"] + [b"id-%d" % i for i in range(50)]
    enc, decs = _HpackEncoder(), _decoders()
    for _ in range(400):
        fields = [(rnd.choice(names), rnd.choice(values), rnd.random() < 0.1) for _ in range(rnd.randint(0, 12))]
        _check(enc, decs, fields)
    assert 0 < enc._size <= 4096  # evictions happened and kept the table within its size


def test_repeated_fields_are_sent_as_one_byte_indexes():
    enc, decs = _HpackEncoder(), _decoders()
    fields = [(b":method", b"POST", False), (b":path", b"/pkg.Svc/Call", False),
              (b"content-type", b"application/grpc", False), (b"x-meshctl-source-app", b"client", False)]
    first = _check(enc, decs, fields)
    again = _check(enc, decs, fields)
    assert len(again) == 4 < len(first)
    # a never-indexed field stays out of the table: sent in full every time
    secret = [(b"authorization", b"Bearer abc", True)]
    assert _check(enc, decs, secret) == _check(enc, decs, secret)


def test_table_size_changes_are_announced_smallest_first_and_obeyed():
    enc, decs = _HpackEncoder(), _decoders()
    fields = [(b"x-app", b"v1", False), (b"x-long", b"z" * 300, False)]
    _check(enc, decs, fields)
    enc.header_table_size = 0  # the peer's SETTINGS_HEADER_TABLE_SIZE
    enc.header_table_size = 100
    block = _check(enc, decs, fields)
    assert block[:2] == bytes([0x20, 0x3F]) and block[2] == 100 - 31  # size update 0, then 100
    assert enc._size <= 100 and len(enc._entries) == 1  # x-app only: x-long is larger than the table
    enc.header_table_size = 0
    _check(enc, decs, fields)
    assert _check(enc, decs, fields)[:1] != b"\x20" and enc._size == 0 and not enc._entries
    enc.header_table_size = 1 << 20  # more than we keep: the table stays at 4096
    _check(enc, decs, fields)
    assert enc.header_table_size == 4096


def test_long_names_values_and_large_indexes():
    enc, decs = _HpackEncoder(), _decoders()
    for i in range(70):  # enough entries for indexes past 127 (a multi-byte integer)
        _check(enc, decs, [(b"x-k%d" % i, b"%d" % i, False)])
    _check(enc, decs, [(b"x-k%d" % i, b"%d" % i, i % 3 == 0) for i in range(70)])
    _check(enc, decs, [(b"x-" + b"a" * 5000, b"b" * 20000, False)])
