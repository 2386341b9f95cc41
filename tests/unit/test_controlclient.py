"""controlclient: the CLI's one way to the control plane, and what it says when it cannot."""

from __future__ import annotations

import pytest

from meshctl.controlclient import ControlClient, ControlPlaneError, NotRunning
from meshctl.credentials import mesh_credential
from meshctl.state import write_control
from tests.tools.servers import free_port


def test_no_pilot_running_means_no_poke_and_a_clear_error_for_status(tmp_path):
    c = ControlClient(tmp_path)
    assert c.reload_rules() is None and c.reload_faults() is None
    with pytest.raises(NotRunning, match="Pilot is not running .*`meshctl up`"):
        c.status()
    with pytest.raises(NotRunning, match="Mixer is not running"):
        c.top("10s")


def test_a_stale_pilot_address_without_a_credential_is_unreachable_not_a_crash(tmp_path):
    write_control(tmp_path, pilot=f"http://127.0.0.1:{free_port()}")  # nothing listens, no auth/mesh.token
    c = ControlClient(tmp_path)
    assert c.credential() == ""
    assert c.reload_rules() is None  # as before: Pilot picks the store up when it starts
    with pytest.raises(ControlPlaneError, match="not answering"):
        c.status()


def test_an_unreadable_credential_is_an_error_naming_the_file(tmp_path):
    mesh_credential(tmp_path)
    path = tmp_path / "auth" / "mesh.token"
    path.unlink()
    path.mkdir()  # unreadable as a file, whoever we are (root reads any mode)
    write_control(tmp_path, pilot=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ControlPlaneError, match="mesh.token"):
        ControlClient(tmp_path).status()
