"""``DATACLASS_SLOTS``: the options of the dataclasses that meshctl's compiled modules
make per request, in whichever build this is.

In the pure-Python build those dataclasses get ``__slots__``: without them each
instance carries a ``__dict__`` (measured on 3.11: protocol/events.py's RequestHead
120 -> 168 bytes, Data 48 -> 88) and takes misspelt attributes. Under mypyc a native
class is a fixed C struct already and may not have ``__slots__``, so there the options
are empty. Users: protocol/events.py and protocol/http2.py (the events), core/retry.py
(Outcome) and core/route.py (RequestView, Forward); all are compiled or none is, so
this module is compiled with them (setup.py's COMPILED): ``_probe`` tells the builds
apart for them, as a compiled function is not a Python function object.
(Passed as ``@dataclass(**DATACLASS_SLOTS)``: mypy's dataclass plugin only reads
literal True/False keywords.)

Layer 0: imports nothing of meshctl, so both core/ and protocol/ may use it.
"""

from __future__ import annotations

import types
from typing import Final

__all__ = ["DATACLASS_SLOTS"]


def _probe() -> None:
    pass


DATACLASS_SLOTS: Final[dict[str, bool]] = {"slots": True} if isinstance(_probe, types.FunctionType) else {}
