"""Building blocks shared by every model module.

Model objects are frozen dataclasses: hashable, comparable, safe to share
between the old and the new config while a proxy swaps them.

Field names mirror Istio's API in snake_case (``perTryTimeout`` is
``per_try_timeout``) so that ``loader.codec`` can convert between YAML/JSON
dicts and model objects by reflection, in both directions, without a
hand-written mapping per type.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, TypeVar

# A header list as the codecs produce it: (lower-case name, value) in wire order.
HeaderList = list[tuple[str, str]]

K = TypeVar("K")
V = TypeVar("V")


class FrozenDict(Mapping[K, V]):
    """An immutable, hashable mapping (labels, header maps, ...)."""

    __slots__ = ("_d", "_h")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._d: dict[K, V] = dict(*args, **kwargs)
        self._h: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._d!r})"


EMPTY: FrozenDict[Any, Any] = FrozenDict()


class Duration(float):
    """Seconds, as a float. Written ``"1.5s"``, ``"250ms"``, ``"3m"`` in YAML.

    A distinct type only so that the reflective codec knows to parse and
    format it; arithmetic works as on any float.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Duration({float(self)!r})"


def format_duration(seconds: float) -> str:
    """Format seconds the way Istio writes durations (``"0.5s"``, ``"3s"``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    text = f"{seconds:.9f}".rstrip("0")
    return f"{text}s"
