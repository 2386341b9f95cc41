"""Root conftest: only registers the real-server fixtures (consul_agent, eureka_server).

Other shared fixtures belong in tests/integration/conftest.py.
"""

pytest_plugins = ["tests.tools.servers"]
