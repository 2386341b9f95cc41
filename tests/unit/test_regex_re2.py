"""Rule regexes are RE2 (core/regex.py): what RE2 refuses is refused at
`route validate` with file:line and the field; a ReDoS pattern matches in
linear time."""

import subprocess
import sys
import time

import pytest

from meshctl.core.regex import MAX_PROGRAM_SIZE, RegexError, compile_regex, regex_problem


def test_redos_pattern_matches_in_linear_time():
    rx = compile_regex("/redos/(a+)+")
    t = time.perf_counter()
    assert rx.fullmatch("/redos/" + "a" * 21 + "!") is None  # the 29-character path of issue 13
    assert rx.fullmatch("/redos/" + "a" * 100_000 + "!") is None
    assert rx.fullmatch("/redos/aaa") is not None
    # backtracking would never finish the 100 000-character path; slack for a loaded machine
    assert time.perf_counter() - t < 2.0


@pytest.mark.parametrize("pattern, why", [
    (r"(a)\1", "invalid escape sequence"),  # backreference
    (r"(?P<x>a)(?P=x)", "invalid perl operator"),
    ("/api(?!/internal).*", "invalid perl operator"),  # lookahead
    ("(?<=a)b", "invalid perl operator"),  # lookbehind
    ("a{1001}", "invalid repetition size"),
    ("(", "missing )"),
])
def test_what_re2_refuses_is_refused(pattern, why):
    p = regex_problem(pattern)
    assert p is not None and why in p and "RE2" in p
    with pytest.raises(RegexError):
        compile_regex(pattern)


def test_program_size_is_bounded_as_istio():
    assert MAX_PROGRAM_SIZE == 32768
    assert regex_problem("[a-z]{1000}" * 30) is None  # 30004
    p = regex_problem(r"\pL{100}")  # 119604
    assert p is not None and "program of size" in p and "max_program_size" in p


def test_re2_syntax_python_re_lacks_is_accepted():
    assert regex_problem(r"\pL+\z") is None
    assert compile_regex(r"/v\d+/\pL+").fullmatch("/v2/abc")


def test_route_validate_refuses_a_backreference_with_file_line_and_field(tmp_path):
    f = tmp_path / "vs.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n"
        "  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        x-id:\n          regex: '(a)\\1'\n"
        "    route:\n    - destination: {host: reviews}\n")
    r = subprocess.run([sys.executable, "-m", "meshctl", "route", "validate", "-f", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"{f}:10" in out and "spec.http[0].match[0].headers.x-id.regex" in out and "RE2" in out, out
