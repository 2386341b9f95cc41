"""YAML/JSON ⇄ model: the only code that knows file shapes; errors carry file:line:field.

- ``codec``: reflective ``from_data`` / ``to_data`` for any model dataclass.
- ``resources``: Istio resource files → ``Resource`` objects, and back.
- ``validate``: offline checks like ``istioctl analyze``.
- ``proxyconfig``: ProxyConfig files (``meshctl proxy run --config``).
"""

from .codec import LoadError, LoadErrors, from_data, parse_duration, to_data
from .resources import dump_resources, load_resources, load_resources_text, resource_to_data, source_of
from .validate import Finding, has_errors, validate

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
    "validate",
    "has_errors",
]
