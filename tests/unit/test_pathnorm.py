"""Path normalization as Istio's mesh pathNormalization option (core/pathnorm.py).

Cases: the attack paths of issue 13 item 3, and the examples of Istio's
"Authorization Policy Normalization" reference page and the pathNormalization
table (/a/../b -> /b, \\da -> /da, /a//b -> /a/b, /a%2fb -> /a/b)."""

import pytest

from meshctl.core.pathnorm import PathRejected, normalize_path

CASES = [
    # (received, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
    ("/admin", "/admin", "/admin", "/admin"),
    ("/%61dmin", "/admin", "/admin", "/admin"),
    ("/%61dmin/x", "/admin/x", "/admin/x", "/admin/x"),
    ("/public/%2e%2e/admin", "/admin", "/admin", "/admin"),
    ("/public/%2E%2E/admin/x", "/admin/x", "/admin/x", "/admin/x"),
    ("/public/../admin", "/admin", "/admin", "/admin"),
    ("/a/./b/../c", "/a/c", "/a/c", "/a/c"),
    ("/a/b/..", "/a/", "/a/", "/a/"),
    ("/../../etc", "/etc", "/etc", "/etc"),
    ("/a/../b", "/b", "/b", "/b"),
    ("\\da", "\\da", "\\da", "\\da"),  # not origin-form: untouched (the codec refuses it)
    ("/x\\da", "/x/da", "/x/da", "/x/da"),
    ("/a//b", "/a//b", "/a/b", "/a/b"),
    # %2F and %5C stay encoded unless DECODE_AND_MERGE_SLASHES (Envoy: KEEP_UNCHANGED)
    ("/a%2fb", "/a%2fb", "/a%2fb", "/a/b"),
    ("/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"),
    ("/a%5Cb", "/a%5Cb", "/a%5Cb", "/a/b"),
    ("/public%2f..%2fadmin", "/public%2f..%2fadmin", "/public%2f..%2fadmin", "/admin"),
    ("/a%2f%2fb", "/a%2f%2fb", "/a%2f%2fb", "/a/b"),
    # decoded once only; reserved and non-ASCII escapes kept
    ("/%252e%252e/admin", "/%252e%252e/admin", "/%252e%252e/admin", "/%252e%252e/admin"),
    ("/a%20b%3Fc", "/a%20b%3Fc", "/a%20b%3Fc", "/a%20b%3Fc"),
    ("/caf%C3%A9", "/caf%C3%A9", "/caf%C3%A9", "/caf%C3%A9"),
    ("/%7euser/%2D%5f", "/~user/-_", "/~user/-_", "/~user/-_"),
    ("/bad%zz/%4", "/bad%zz/%4", "/bad%zz/%4", "/bad%zz/%4"),
    # the query is never touched
    ("/a/../b?x=/../%61&y=//", "/b?x=/../%61&y=//", "/b?x=/../%61&y=//", "/b?x=/../%61&y=//"),
    ("/p//q?z", "/p//q?z", "/p/q?z", "/p/q?z"),
    ("*", "*", "*", "*"),
]


@pytest.mark.parametrize("received,base,merge,decode", CASES)
def test_normalization_table(received, base, merge, decode):
    assert normalize_path(received, "NONE") == received
    assert normalize_path(received, "BASE") == base
    assert normalize_path(received) == base  # BASE is the default, as in Istio
    assert normalize_path(received, "MERGE_SLASHES") == merge
    assert normalize_path(received, "DECODE_AND_MERGE_SLASHES") == decode


@pytest.mark.parametrize("mode", ["BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"])
def test_percent_encoded_nul_is_refused(mode):
    with pytest.raises(PathRejected):
        normalize_path("/a%00b", mode)


def test_normalized_path_is_a_fixed_point():
    for received, *outs in CASES:
        for mode, out in zip(("BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"), outs):
            if mode != "DECODE_AND_MERGE_SLASHES" or "%25" not in received:
                assert normalize_path(out, mode) == out, (received, mode)
