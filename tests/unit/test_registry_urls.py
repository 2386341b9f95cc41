"""open_registry / parse_registry_url: what each URL means, and errors that name the URL."""

from __future__ import annotations

import pytest

from meshctl.registry import keep_alive_loop, open_registry, parse_registry_url
from meshctl.registry.base import RegistryError
from meshctl.registry.consul import ConsulRegistry
from meshctl.registry.embedded import EmbeddedRegistry
from meshctl.registry.eureka import EurekaRegistry


def test_consul_url_with_default_port_and_token_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    reg = open_registry("consul://10.0.0.5", tmp_path)
    assert isinstance(reg, ConsulRegistry)
    assert (reg.host, reg.port, reg.scheme) == ("10.0.0.5", 8500, "http")
    assert reg._token == "env-token"
    assert reg.url == "consul://10.0.0.5"


def test_consul_token_parameter_beats_url_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    assert open_registry("consul://h:8600?token=url-token", tmp_path)._token == "url-token"
    assert open_registry("consul://h:8600?token=url-token", tmp_path, token="param")._token == "param"
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    assert open_registry("consul://h:8600", tmp_path)._token is None


def test_consul_https(tmp_path):
    reg = open_registry("consul+https://consul.example:8501", tmp_path)
    assert (reg.host, reg.port, reg.scheme) == ("consul.example", 8501, "https")


def test_eureka_urls(tmp_path):
    reg = open_registry("eureka://127.0.0.1:8761/eureka", tmp_path)
    assert isinstance(reg, EurekaRegistry)
    assert reg.base_url == "http://127.0.0.1:8761/eureka"
    assert open_registry("eureka://registry.local", tmp_path).base_url == "http://registry.local:8761/eureka"
    assert open_registry("eureka+https://r:9443/eureka/v2/", tmp_path).base_url == "https://r:9443/eureka/v2"
    assert parse_registry_url("eureka://[::1]:8761/eureka")["host"] == "::1"
    assert open_registry("eureka://[::1]:8761/eureka", tmp_path).base_url == "http://[::1]:8761/eureka"


def test_embedded(tmp_path):
    assert isinstance(open_registry("embedded", tmp_path), EmbeddedRegistry)
    assert parse_registry_url("") == {"kind": "embedded"}


@pytest.mark.parametrize(
    "url, problem",
    [
        ("zookeeper://127.0.0.1:2181", "unknown scheme 'zookeeper'"),
        ("127.0.0.1:8500", "unknown scheme '127.0.0.1'"),
        ("consul", "no scheme"),
        ("consul://", "no host"),
        ("consul://:8500", "no host"),
        ("consul://127.0.0.1:85x0", "the port is not a number"),
        ("consul://127.0.0.1:99999", "the port is not a number"),
        ("consul://127.0.0.1:0", "port 0"),
        ("consul://127.0.0.1:8500/v1/agent", "a Consul URL has no path"),
        ("consul://127.0.0.1:8500?tokn=x", "unknown query parameter(s) tokn"),
        ("consul://bad host:8500", "bad host"),
        ("eureka://127.0.0.1:8761/eureka#x", "fragment"),
    ],
)
def test_malformed_urls_name_the_url_and_the_problem(tmp_path, url, problem):
    with pytest.raises(RegistryError) as info:
        open_registry(url, tmp_path)
    message = str(info.value)
    assert repr(url) in message
    assert problem in message
    assert "expected 'embedded', 'consul://HOST:PORT' or 'eureka://HOST:PORT/eureka'" in message


async def test_keep_alive_loop_survives_failures(tmp_path, autojump_clock):
    class Flaky:
        keepalive_interval = 2.0

        def __init__(self):
            self.calls = 0

        async def keep_alive(self, instance_id):
            self.calls += 1
            if self.calls % 2:
                raise RegistryError("consul://x: down")

    import trio

    reg = Flaky()
    with trio.move_on_after(9):
        await keep_alive_loop(reg, "a-0")
    assert reg.calls == 5  # t = 0, 2, 4, 6, 8: failures did not stop it


@pytest.fixture
def autojump_clock():
    import trio.testing

    return trio.testing.MockClock(autojump_threshold=0)
