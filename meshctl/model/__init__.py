"""Config data: Istio resources, meshctl's own kinds, ProxyConfig."""

# meshctl's own kinds register themselves in istio.SPEC_TYPES when imported.
from . import ratelimit as _ratelimit  # noqa: F401  (meshctl.io/v1alpha1 RateLimit)
from . import telemetry_api as _telemetry_api  # noqa: F401  (telemetry.istio.io Telemetry)
