"""x-request-id values the proxy makes are UUID4s (as Envoy's are), from the injected random source."""

from __future__ import annotations

import random
import uuid

from meshctl.proxy.request import new_request_id


def test_request_ids_are_random_version_4_uuids_in_canonical_form():
    rand = random.Random(7)
    ids = [new_request_id(rand) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for s in ids:
        u = uuid.UUID(s)
        assert str(u) == s  # canonical: lower-case hex, 8-4-4-4-12
        assert u.version == 4 and u.variant == uuid.RFC_4122
    # every non-fixed digit varies (122 random bits, not fewer)
    for pos in (0, 9, 15, 20, 35):
        assert len({s[pos] for s in ids}) == 16
    assert {s[19] for s in ids} == set("89ab")


def test_the_same_seed_gives_the_same_ids():
    assert [new_request_id(random.Random(3)) for _ in range(2)] == [new_request_id(random.Random(3))] * 2


def test_ids_are_the_random_bits_with_version_and_variant_masked_in():
    # the digits are the 128 random bits with the version nibble 4 and the variant bits 10 set,
    # as integer masks would set them
    keep = ((1 << 128) - 1) ^ (0xF000 << 64) ^ (0xC000 << 48)
    put = (0x4000 << 64) | (0x8000 << 48)
    for seed in range(300):
        bits = random.Random(seed).getrandbits(128)
        assert new_request_id(random.Random(seed)) == str(uuid.UUID(int=bits & keep | put))
