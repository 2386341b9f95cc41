"""Telemetry constants shared by the proxies (which fill the histograms) and
Mixer (which merges them): both must bucket alike."""

from __future__ import annotations

__all__ = ["DURATION_BUCKETS_MS", "BYTES_BUCKETS"]

# Istio's default buckets.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)
BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)
