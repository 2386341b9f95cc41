"""mesh.yaml settings.tracing: checked at load (file:line, field) and handed to every proxy."""

import pytest

from meshctl.loader.codec import LoadError
from meshctl.supervisor.plan import load_mesh, proxy_settings

MESH = """settings:
  portRange: 21000-21999
  tracing: {extra}
services:
- name: hello
  port: 9080
  versions:
  - {{name: v1, command: [python3, hello.py]}}
"""


@pytest.mark.parametrize("extra, field, words", [
    ("{zipkin: 'http://127.0.0.1:9411'}", "settings.tracing.zipkin", "is not zipkin://HOST:PORT"),
    ("{zipkin: 'otlp://127.0.0.1:4318'}", "settings.tracing.zipkin", "tracing.otlp"),
    ("{otlp: 'grpc://127.0.0.1:4317'}", "settings.tracing.otlp", "is not an OTLP/HTTP endpoint"),
    ("{otlp: 'http://127.0.0.1:99999'}", "settings.tracing.otlp", "is not an OTLP/HTTP endpoint"),
    ("{zipkin: 'zipkin://127.0.0.1:9411', sampling: 101}", "settings.tracing.sampling", "between 0 and 100"),
    ("{zipkin: 'zipkin://127.0.0.1:9411', randomSamplingPercentage: 5}", "randomSamplingPercentage", ""),
])
def test_bad_tracing_settings_are_refused_by_name(tmp_path, extra, field, words):
    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(extra=extra))
    with pytest.raises(LoadError) as e:
        load_mesh(f)
    msg = str(e.value)
    assert f"{f}:3" in msg and field in msg and words in msg, msg


def test_tracing_reaches_the_proxy_settings_with_istios_default_rate(tmp_path):
    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(extra="{zipkin: 'zipkin://127.0.0.1:9411'}"))
    s = proxy_settings(load_mesh(f))
    assert s.tracing_zipkin == "zipkin://127.0.0.1:9411" and s.tracing_sampling == 1.0
    f.write_text(MESH.format(extra="{zipkin: 'zipkin://[::1]:9411', sampling: 100}"))
    s = proxy_settings(load_mesh(f))
    assert s.tracing_sampling == 100.0


@pytest.mark.parametrize("given, url", [
    ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),  # OTEL_EXPORTER_OTLP_ENDPOINT's form
    ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
    ("otlp://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
    ("https://otel.example:443/custom/v1/traces", "https://otel.example:443/custom/v1/traces"),
    ("http://[::1]:4318", "http://[::1]:4318/v1/traces"),
])
def test_otlp_endpoint_forms(tmp_path, given, url):
    from meshctl.model.proxyconfig import _otlp_url

    f = tmp_path / "mesh.yaml"
    f.write_text(MESH.format(extra=f"{{otlp: '{given}', sampling: 50}}"))
    s = proxy_settings(load_mesh(f))
    assert s.tracing_otlp == given and s.tracing_zipkin == "" and s.tracing_sampling == 50.0
    assert _otlp_url(s.tracing_otlp) == url
