"""One shape for everything pluggable: a `Registry` of named entries (dialects, variants, quant backends).

BACKENDS: Registry[QuantBackend] = Registry("quantization backend")
BACKENDS.register(Int4Backend())      # refuses a second entry of the same name
BACKENDS.get("int4")                  # UsageError listing the known names when unknown
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from kaggle_utils.core.errors import UsageError

T = TypeVar("T")
_REQUIRED: Any = object()  # `get` without a default raises


def _name_attribute(entry: Any) -> str:
    return getattr(entry, "name", "")


class Registry(MutableMapping[str, T], Generic[T]):
    """Entries of one kind by name, in registration order; reads like a dict (`REG[name]`, `set(REG)`)."""

    def __init__(self, kind: str, name_of: Callable[[T], str] = _name_attribute) -> None:
        self.kind = kind  # "quantization backend": used in every message
        self._name_of = name_of
        self._entries: dict[str, T] = {}

    def register(self, entry: T, replace: bool = False) -> T:
        """Add `entry` under its name and return it; a different entry of the same name needs `replace`."""
        name = self._name_of(entry)
        if not name:
            raise ValueError(f"a {self.kind} needs a name")
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise UsageError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str, default: Any = _REQUIRED) -> T:  # type: ignore[override]
        """The entry called `name`; if none: `default` when given, else UsageError naming the known."""
        if name in self._entries:
            return self._entries[name]
        if default is not _REQUIRED:
            return default
        raise UsageError(f"unknown {self.kind} {name!r} (known: {', '.join(self._entries)})")

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
