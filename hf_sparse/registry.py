"""Name -> object registries (methods, models, data sources) that refuse a silent overwrite."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any


class Registry(MutableMapping):
    """A mapping whose :meth:`add` refuses a name already taken: registering a second ``"gmp"`` by
    accident would silently replace the first. ``override=True`` replaces on purpose.

    ``builtins`` names the modules that register the built-in entries; they are imported on the
    first lookup, so importing the registry's package does not import them all (nor what they need).
    """

    def __init__(self, kind: str, builtins: Sequence[str] = ()):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._builtins = tuple(builtins)
        self._loaded = not self._builtins

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the modules' own registrations look names up
            for module in self._builtins:
                importlib.import_module(module)

    def __getitem__(self, name: str) -> Any:
        self._load()
        return self._entries[name]

    def __setitem__(self, name: str, obj: Any) -> None:
        self._entries[name] = obj

    def __delitem__(self, name: str) -> None:
        self._load()
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"

    def add(self, name: str, obj: Any, override: bool = False) -> Any:
        if name in self and not override and self[name] is not obj:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self[name]!r}); "
                             "pass override=True to replace it")
        self[name] = obj
        return obj
