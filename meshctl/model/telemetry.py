"""Telemetry constants shared by the proxies (which fill the histograms) and
Mixer (which merges them): both must bucket alike."""

from __future__ import annotations

__all__ = ["DURATION_BUCKETS_MS", "BYTES_BUCKETS", "GRPC_SERVER_ERRORS", "is_error"]

# Istio's default buckets.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)
BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)

# gRPC statuses that are server errors: those Envoy's grpcToHttpStatus maps to 5xx
# (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
# A gRPC error answer is HTTP 200 with its status in grpc_response_status, so error
# rates look at both labels.
GRPC_SERVER_ERRORS: frozenset[str] = frozenset({"2", "4", "12", "13", "14", "15"})


def is_error(response_code: str, grpc_response_status: str, flags: str) -> bool:
    """Whether a request of istio_requests_total counts as an error (5xx, no response,
    or a server-side gRPC status; a rate-limited request (flag RL) is counted apart)."""
    if response_code.startswith("5") or response_code == "0":
        return True
    return grpc_response_status in GRPC_SERVER_ERRORS and "RL" not in flags.split(",")
