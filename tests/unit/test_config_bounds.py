"""Config input is bounded (issue 13 item 7): an alias bomb, a huge field and a
huge file are refused fast with an error naming the file (and the field), and
the rule history does not grow without end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.loader.codec import LoadErrors
from meshctl.loader.resources import load_resources, load_resources_text
from meshctl.loader.source import MAX_FILE_BYTES, MAX_SCALAR_BYTES
from meshctl.pilot.store import RuleStore, StoreError

# The classic "billion laughs" in YAML: 9 levels of 9 aliases, 9^9 strings once expanded.
BOMB = "\n".join(
    [f'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
) + "\n"

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - name: {name}
    route:
    - destination: {{host: reviews}}
"""


def meshctl(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "meshctl_state_dir")}
    return subprocess.run([sys.executable, "-m", "meshctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_bomb_is_a_few_hundred_bytes():
    assert len(BOMB.encode()) < 700


def test_a_billion_laughs_file_is_refused_fast_naming_the_file(tmp_path):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(BOMB)
    started = time.monotonic()
    r = meshctl("route", "apply", "-f", str(bomb), "--state-dir", str(tmp_path / ".meshctl"), cwd=tmp_path, timeout=60)
    took = time.monotonic() - started
    assert r.returncode == 1, r
    err = " ".join(r.stderr.split())
    assert "laughs.yaml" in err and "alias" in err and "refused" in err, err
    assert took < 25, took  # 42 s and a MemoryError before (a CLI start-up on a loaded machine is seconds)
    assert "MemoryError" not in r.stderr


def test_an_alias_bomb_in_memory_is_refused_by_the_loader():
    started = time.monotonic()
    with pytest.raises(LoadErrors, match="alias bomb"):
        load_resources_text(BOMB, "bomb.yaml")
    assert time.monotonic() - started < 10  # expanding it never finishes; slack for a loaded machine


def test_ordinary_aliases_still_load():
    text = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - &v1 {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
    (r,) = load_resources_text(text, "dr.yaml")
    assert [s.name for s in r.spec.subsets] == ["v1", "v2"]


def test_a_huge_route_name_is_refused_naming_the_field(tmp_path):
    f = tmp_path / "vs.yaml"
    f.write_text(VS.format(name="x" * (MAX_SCALAR_BYTES + 1)))
    with pytest.raises(LoadErrors) as info:
        load_resources([f])
    e = info.value.errors[0]
    assert e.file == str(f) and e.line == 7 and e.field == "spec.http[0].name" and "over the limit" in e.message


def test_a_60_mb_file_is_refused_before_it_is_read(tmp_path):
    f = tmp_path / "huge.yaml"
    f.write_text(VS.format(name="x" * (60 * 1024 * 1024)))
    started = time.monotonic()
    r = meshctl("route", "apply", "-f", str(f), "--state-dir", str(tmp_path / ".meshctl"), cwd=tmp_path)
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "huge.yaml" in err and f"over the limit of {MAX_FILE_BYTES} bytes" in err, err
    assert time.monotonic() - started < 30  # parsing 60 MB of YAML takes minutes; a CLI start-up on a loaded machine seconds
    assert not (tmp_path / ".meshctl" / "rules" / "revisions").exists() or \
        not list((tmp_path / ".meshctl" / "rules" / "revisions").iterdir())


def test_rule_history_is_capped(tmp_path):
    store = RuleStore(tmp_path, keep=5)
    for i in range(12):
        (r,) = load_resources_text(VS.format(name=f"route-{i}"), "vs.yaml")
        store.apply([r])
    files = sorted(p.name for p in (tmp_path / "rules" / "revisions").glob("*.json"))
    assert files == [f"{n:06d}.json" for n in range(8, 13)]
    assert store.current_number() == 12 and store.current().resources[0].spec.http[0].name == "route-11"
    assert [rev.number for rev in store.history()] == [8, 9, 10, 11, 12]
    with pytest.raises(StoreError, match="revision 3 was pruned: the history keeps the last 5"):
        store.rollback(3)
    assert store.rollback(9).number == 13
    assert len(list((tmp_path / "rules" / "revisions").glob("*.json"))) == 5
