"""YAML/JSON ⇄ model: the only code that knows file shapes; errors carry file:line:field.

- ``codec``: reflective ``from_data`` / ``to_data`` for any model dataclass.
- ``resources``: Istio resource files → ``Resource`` objects, and back.
- ``validate``: offline checks like ``istioctl analyze`` (``loader.validate.validate``: the
  package name ``validate`` is that submodule, loaded on first use like the others).
- ``proxyconfig``: ProxyConfig files (``meshctl proxy run --config``).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Loaded on first use: a sidecar reads its ProxyConfig with .codec and
# .proxyconfig only, and .resources/.validate (YAML resources, RE2, Istio's
# models) would cost it ~6 MB of RSS for nothing.
_HOME = {
    "LoadError": "codec", "LoadErrors": "codec", "from_data": "codec", "to_data": "codec",
    "parse_duration": "codec", "load_resources": "resources", "load_resources_text": "resources",
    "dump_resources": "resources", "resource_to_data": "resources", "source_of": "resources",
    "Finding": "validate", "has_errors": "validate",
}

if TYPE_CHECKING:
    from .codec import LoadError, LoadErrors, from_data, parse_duration, to_data
    from .resources import dump_resources, load_resources, load_resources_text, resource_to_data, source_of
    from .validate import Finding, has_errors


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "LoadError",
    "LoadErrors",
    "from_data",
    "to_data",
    "parse_duration",
    "load_resources",
    "load_resources_text",
    "dump_resources",
    "resource_to_data",
    "source_of",
    "Finding",
    "has_errors",
]
