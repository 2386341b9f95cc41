"""proxy/tracing.py's exporter when Zipkin is not there: spans dropped and counted, never queued
without bound, never an exception into the proxy."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import trio

from meshctl.proxy import tracing


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed: connection refused


def test_a_missing_collector_drops_the_batch_and_the_buffer_stays_bounded():
    t = tracing.Tracer()
    for i in range(tracing.BUFFER + 50):
        t.add({"id": i})
    assert len(t.spans) == tracing.BUFFER and t.dropped == 50
    rt = SimpleNamespace(snapshot=SimpleNamespace(settings=SimpleNamespace(
        tracing_zipkin=f"zipkin://127.0.0.1:{_closed_port()}", tracing_otlp="")))

    async def main():
        from meshctl.proxy.ctlhttp import control_client

        async with control_client(timeout=2.0) as client:
            await t._flush(rt, client)

    trio.run(main)
    assert t.failures == 1 and t.sent == 0
    assert t.dropped == 50 + tracing.BATCH  # the batch that failed; the rest waits for the next round
    assert len(t.spans) == tracing.BUFFER - tracing.BATCH
