"""Root conftest: only registers the real-server fixtures (consul_agent, eureka_server).

Other shared fixtures belong in tests/integration/conftest.py.
"""

pytest_plugins = ["tests.tools.servers"]


import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_config_home(tmp_path_factory):
    """`meshctl up` records the mesh it started in $XDG_CONFIG_HOME/meshctl/current;
    keep the suite's meshes out of the real one."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
