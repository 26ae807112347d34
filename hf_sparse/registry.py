"""Name -> object registries (methods, models, data sources) that refuse a silent overwrite."""

from __future__ import annotations

from typing import Any


class Registry(dict):
    """A dict whose :meth:`add` refuses a name already taken: registering a second ``"gmp"`` by accident
    would silently replace the first. ``override=True`` replaces on purpose."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, obj: Any, override: bool = False) -> Any:
        if name in self and not override and self[name] is not obj:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self[name]!r}); "
                             "pass override=True to replace it")
        self[name] = obj
        return obj
