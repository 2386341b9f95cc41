"""One log line per cause and interval, for events a stranger can repeat at will.

A refused local user or a failed mTLS handshake is worth a line in the log, but
an attacker on loopback can open thousands of connections a second: logged one
line each, they would fill the disk and bury everything else. ``LogThrottle``
admits the first event of a key at once, then at most one per ``every``
seconds, and tells the admitted line how many of the same key it held back
since the last one, so the log still says how many there were. The counters
(``meshctl_downstream_cx_peer_refused``, ``..._cx_tls_refused``) count every event.

Pure: the caller passes the clock reading.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

EVERY = 10.0  # seconds between two lines of one key
MAX_KEYS = 1024  # keys remembered; the oldest is forgotten first (a new key then logs at once)


class LogThrottle:
    __slots__ = ("every", "max_keys", "_keys")

    def __init__(self, every: float = EVERY, max_keys: int = MAX_KEYS) -> None:
        self.every = every
        self.max_keys = max_keys
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()  # key -> [last line at, held back since]

    def admit(self, key: Hashable, now: float) -> int | None:
        """None: don't log this one. Otherwise log it, saying how many of this key
        were held back since the previous line (0: none)."""
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self.max_keys:
                self._keys.popitem(last=False)
            self._keys[key] = [now, 0.0]
            return 0
        if now - entry[0] < self.every:
            entry[1] += 1
            return None
        held = int(entry[1])
        entry[0], entry[1] = now, 0.0
        self._keys.move_to_end(key)
        return held


def held_back(n: int) -> str:
    """The suffix an admitted line carries: "" or " (and 41 more like it since the last line)"."""
    return f" (and {n} more like it since the last line)" if n else ""
