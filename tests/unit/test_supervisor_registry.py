"""The supervisor's side of remote registries, without processes: which registry
`up --registry` picks, how often it renews, what `status` shows of the URL."""

from pathlib import Path

import pytest

from meshctl.registry.consul import ConsulRegistry
from meshctl.registry.eureka import EurekaRegistry
from meshctl.supervisor.pilotreg import PilotRegistry
from meshctl.supervisor.registration import Registrations
from meshctl.supervisor.run import Supervisor, UpError, redact_url


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    f = tmp_path / "mesh.yaml"
    f.write_text(
        "settings: {registry: 'eureka://127.0.0.1:8761/eureka'}\n"
        "services:\n- name: hello\n  port: 9080\n  versions: [{name: v1, address: '127.0.0.1:9'}]\n"
    )
    return f


def test_registry_flag_overrides_mesh_yaml(mesh_file, tmp_path):
    assert Supervisor(mesh_file, tmp_path / "s1").spec.settings.registry == "eureka://127.0.0.1:8761/eureka"
    sup = Supervisor(mesh_file, tmp_path / "s2", registry_url=" consul://127.0.0.1:8500 ")
    assert sup.spec.settings.registry == "consul://127.0.0.1:8500"
    assert sup.status()["registry"]["url"] == "consul://127.0.0.1:8500"


async def test_renewals_follow_the_registry_not_the_health_check(mesh_file, tmp_path):
    sup = Supervisor(mesh_file, tmp_path / "s")

    def period(registry) -> float:
        return Registrations(sup.ctx, sup.control, None, registry).keepalive_period()

    assert period(ConsulRegistry(ttl=9.0)) == pytest.approx(3.0)  # three renewals per TTL
    # the lease renewal interval asked for
    assert period(EurekaRegistry(renewal_interval=7.0, lease_duration=21.0)) == pytest.approx(7.0)
    pilot = PilotRegistry("http://127.0.0.1:1", ttl=15.0)
    try:
        assert period(pilot) == pytest.approx(5.0)
    finally:
        await pilot.aclose()


async def test_malformed_registry_url_is_an_up_error_naming_it(mesh_file, tmp_path):
    sup = Supervisor(mesh_file, tmp_path / "s", registry_url="consul://127.0.0.1:notaport")
    with pytest.raises(UpError, match=r"consul://127\.0\.0\.1:notaport.*port is not a number"):
        await sup.registrations.connect()
    assert sup.registrations.registry is None


def test_tokens_in_registry_urls_are_hidden():
    assert redact_url("consul://127.0.0.1:8500?token=s3cret") == "consul://127.0.0.1:8500?token=***"
    assert redact_url("consul+https://s3cret@consul.example:8501") == "consul+https://***@consul.example:8501"
    assert redact_url("eureka://127.0.0.1:8761/eureka") == "eureka://127.0.0.1:8761/eureka"
    assert redact_url("") == "embedded"
