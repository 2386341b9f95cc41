"""Per-sidecar access log: one JSON object per line, Envoy's field names.

The data path only appends a dict to a list (``write``); a background task
(``run``) turns the list into lines and writes them ``flush_interval``
seconds after the first of them came (an idle sidecar sets no timer), or sooner
when ``max_buffered`` lines are waiting (256: a few
thousand pending record dicts cost a busy sidecar ~3 MB of RSS that
fragmentation keeps), in a worker thread so a slow disk never stalls the
event loop. The lines are made on the event loop, ENCODE_CHUNK records at a
time with a checkpoint between chunks: encoding is ~10 µs a record, and 256
in one go held every connection of a sidecar at 1,000 rps for 2.5-7 ms four
times a second, the largest stalls in its latency tail (bench/tail_probe.sh). Files are rotated by
size like logrotate: when the next write would take ``FILE`` past
``max_bytes`` it becomes ``FILE.1`` (``FILE.1`` → ``FILE.2`` …) and the
oldest beyond ``backups`` is removed. Lines past ``max_pending`` (the disk
cannot keep up) are dropped and counted, never allowed to grow memory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import meshctl.proxy.aio as aio

log = logging.getLogger("meshctl.proxy.accesslog")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3
ENCODE_CHUNK = 16  # records encoded between checkpoints: ~0.15-0.3 ms of the event loop at a time
_encode_one = json.JSONEncoder(separators=(",", ":")).encode  # made once: json.dumps(sep=...) builds one a call


class AccessLogError(Exception):
    """The access log file cannot be opened or written; the message names it."""


def _open_private(path: Path):
    """Append to ``path``, a 0600 file: an access log names users' paths and peers."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


class RotatingFile:
    """Append-only file rotated by size (synchronous; run it off the event loop)."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        if max_bytes < 1:
            raise AccessLogError(f"access log {path}: max size must be positive, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._f = _open_private(self.path)
        except OSError as exc:
            raise AccessLogError(f"cannot open access log {self.path}: {exc.strerror or exc}") from None
        self.size = self._f.tell()

    def write(self, data: bytes) -> None:
        """Write whole lines; rotates before a write that would pass the limit
        (a file holds at least one line, so a huge line still gets written)."""
        if self.size and self.size + len(data) > self.max_bytes:
            # split at line boundaries so each file stays under the limit when it can
            room = self.max_bytes - self.size
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut:
                self._f.write(data[:cut])
                self.size += cut
                data = data[cut:]
            self.rotate()
        while len(data) > self.max_bytes:
            cut = data.rfind(b"\n", 0, self.max_bytes) + 1 or len(data)
            self._f.write(data[:cut])
            self.size += cut
            data = data[cut:]
            if data:
                self.rotate()
        if data:
            self._f.write(data)
            self.size += len(data)
        self._f.flush()

    def rotate(self) -> None:
        self._f.close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._f = _open_private(self.path)
        self.size = 0

    def close(self) -> None:
        self._f.close()


class AccessLog:
    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 flush_interval: float = 1.0, max_buffered: int = 256, max_pending: int = 100_000) -> None:
        self.file = RotatingFile(path, max_bytes, backups)
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self.max_pending = max_pending
        self.pending: list[dict] = []
        self.dropped = 0
        self.written = 0
        self._wake = aio.Event()

    @property
    def path(self) -> Path:
        return self.file.path

    def write(self, record: dict) -> None:
        """Queue one record (cheap; called on the data path)."""
        pending = self.pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            return
        pending.append(record)
        if len(pending) == 1 or len(pending) == self.max_buffered:
            self._wake.set()  # the first record starts the flush interval; a full buffer goes at once

    def _encode(self, records: list[dict]) -> bytes:
        enc = _encode_one
        return "".join([enc(r) + "\n" for r in records]).encode()

    async def flush(self) -> None:
        if not self.pending:
            return
        records, self.pending = self.pending, []
        parts = []
        try:
            for i in range(0, len(records), ENCODE_CHUNK):
                if i:
                    await aio.checkpoint()  # the connections run between chunks
                parts.append(self._encode(records[i:i + ENCODE_CHUNK]))
        except BaseException:  # cancelled mid-way: nothing written yet, the records wait for the last flush
            self.pending[:0] = records
            raise
        data = b"".join(parts)
        try:
            await aio.run_sync_in_thread(self.file.write, data)
        except OSError as exc:
            self.dropped += len(records)
            log.warning("access log %s: write failed: %s", self.file.path, exc.strerror or exc)
            return
        self.written += len(records)

    async def run(self) -> None:
        """Flush ``flush_interval`` after the first record waiting, or at ``max_buffered``,
        until cancelled; flushes what is left on the way out. With nothing waiting it
        sleeps without a timer."""
        try:
            while True:
                if not self.pending:
                    await self._wake.wait()  # the first record
                self._wake = aio.Event()
                if len(self.pending) < self.max_buffered:
                    with aio.move_on_after(self.flush_interval):
                        await self._wake.wait()  # a full buffer
                    self._wake = aio.Event()
                await self.flush()
        finally:
            with aio.CancelScope(shield=True):
                await self.flush()
                self.file.close()
