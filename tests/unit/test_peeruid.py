"""Who may use a sidecar's outbound listeners (core/peeruid.py), and mesh.yaml's
settings.outboundUsers: validated, unknown user names refused by name with file:line."""

from __future__ import annotations

import os

import pytest

from meshctl.core.peeruid import (
    Admit,
    LookupFailed,
    NoSocket,
    Refuse,
    checks,
    decide,
    entry_problem,
    resolve_users,
)
from meshctl.loader.codec import LoadError
from meshctl.supervisor.plan import load_mesh, proxy_settings
from meshctl.supervisor.reload import settings_change
from meshctl.model.mesh import MeshSettings

USERS = {"alice": 1001, "bob": 1002}


def test_only_outbound_and_binding_listeners_are_checked():
    assert checks("outbound") and checks("binding")
    assert not checks("inbound") and not checks("gateway")


def test_own_uid_and_listed_users_are_allowed_others_refused():
    allowed, problems = resolve_users(("alice", 2000, "3000"), 500, USERS.get)
    assert problems == [] and allowed == frozenset({500, 1001, 2000, 3000})
    assert decide(allowed, 500) == Admit(500)
    assert decide(allowed, 1001) == Admit(1001)
    refused = decide(allowed, 1002)
    assert isinstance(refused, Refuse) and refused.uid == 1002
    assert "uid 1002 may not use" in refused.reason and "outboundUsers" in refused.reason


def test_without_users_only_the_proxys_own_uid_passes():
    allowed, _ = resolve_users((), 1001, USERS.get)
    assert allowed == frozenset({1001})
    assert isinstance(decide(allowed, 0), Refuse)  # root too: it is not the mesh's user


def test_lookup_failures_fail_closed():
    allowed = frozenset({500})
    gone = decide(allowed, NoSocket())
    assert isinstance(gone, Refuse) and gone.uid is None and "not on this host" in gone.reason
    err = decide(allowed, LookupFailed("Operation not permitted"))
    assert isinstance(err, Refuse) and "Operation not permitted" in err.reason and "fails closed" in err.reason


def test_entries_are_validated_and_unknown_names_refused_by_name():
    assert entry_problem("alice") is None and entry_problem(0) is None and entry_problem("65534") is None
    assert "out of range" in (entry_problem(-1) or "")
    assert "out of range" in (entry_problem(4294967295) or "")
    assert "neither" in (entry_problem(True) or "")
    assert "neither" in (entry_problem(1.5) or "")
    assert "not a user name" in (entry_problem("") or "")
    assert "not a user name" in (entry_problem(" alice") or "")
    allowed, problems = resolve_users(("alice", "mallory", -3), 500, USERS.get)
    assert allowed == frozenset({500, 1001})
    assert problems == [(1, "unknown user 'mallory': no such user on this host"), (2, "uid -3 is out of range (0-4294967294)")]


MESH = """\
settings:
  portRange: 30000-30099
{extra}services:
- name: web
  port: 9080
  versions:
  - {{name: v1, address: "127.0.0.1:7000"}}
"""


def _load(tmp_path, extra: str):
    p = tmp_path / "mesh.yaml"
    p.write_text(MESH.format(extra=extra))
    return load_mesh(p)


def test_mesh_yaml_outbound_users_reach_every_proxy(tmp_path):
    assert proxy_settings(_load(tmp_path, "")).outbound_users == ()
    spec = _load(tmp_path, "  outboundUsers: [nobody, 1001, '1002']\n")
    assert proxy_settings(spec).outbound_users == ("nobody", "1001", "1002")


def test_mesh_yaml_unknown_user_is_refused_with_file_line_and_field(tmp_path):
    with pytest.raises(LoadError) as info:
        _load(tmp_path, "  outboundUsers:\n  - nobody\n  - no-such-user-xyz\n")
    text = str(info.value)
    assert "mesh.yaml:5" in text and "settings.outboundUsers[1]" in text and "unknown user 'no-such-user-xyz'" in text
    with pytest.raises(LoadError, match=r"settings.outboundUsers\[0\].*out of range"):
        _load(tmp_path, "  outboundUsers: [-1]\n")
    with pytest.raises(LoadError, match=r"settings.outboundUsers\[0\].*neither a user name nor a uid"):
        _load(tmp_path, "  outboundUsers: [{name: x}]\n")


def test_changing_outbound_users_restarts_the_sidecars():
    ch = settings_change(MeshSettings(), MeshSettings(outbound_users=("nobody",)))
    assert ch.proxies == ("settings.outboundUsers",) and not ch.refused


def test_the_netlink_lookup_finds_a_real_connection_of_ours():
    import socket

    from meshctl.proxy.peercheck import PeerUids

    uids = PeerUids()
    if uids.off_reason is not None:
        pytest.skip(f"no NETLINK_SOCK_DIAG here: {uids.off_reason}")
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            ls = socket.socket(family)
            ls.bind((host, 0))
        except OSError:
            continue  # no IPv6 loopback here
        with ls:
            ls.listen(1)
            with socket.create_connection(ls.getsockname()[:2]) as c:
                s, _ = ls.accept()
                with s:
                    assert uids.lookup(s) == os.geteuid()
    uids.close()


def test_meshctl_status_says_whether_the_outbound_user_check_runs(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from meshctl.cli.main import app
    from meshctl.proxy import peercheck

    (tmp_path / "status.json").write_text(json.dumps({"state": "stopped", "mesh": "m.yaml", "workloads": [], "gateways": []}))
    runner = CliRunner()
    got = json.loads(runner.invoke(app, ["status", "--json", "--state-dir", str(tmp_path)], catch_exceptions=False).stdout)
    assert got["outbound_user_check"] == {"on": True, "reason": None}  # Linux with netlink: on
    text = runner.invoke(app, ["status", "--state-dir", str(tmp_path)], catch_exceptions=False).stdout
    assert "local-user check is OFF" not in text
    # where netlink is missing (not Linux), status says the check is off and why
    monkeypatch.delattr(peercheck.socket, "AF_NETLINK")
    got = json.loads(runner.invoke(app, ["status", "--json", "--state-dir", str(tmp_path)], catch_exceptions=False).stdout)
    assert got["outbound_user_check"] == {"on": False, "reason": "no NETLINK_SOCK_DIAG: this system has no netlink (not Linux)"}
    text = runner.invoke(app, ["status", "--state-dir", str(tmp_path)], catch_exceptions=False).stdout
    assert "local-user check is OFF (no NETLINK_SOCK_DIAG" in " ".join(text.split())
