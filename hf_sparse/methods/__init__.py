"""Registry of sparsity methods: ``sparsity.method`` in a recipe names one of these."""

from __future__ import annotations

from ..registry import Registry
from .base import MaskedMethod, MethodConfig, SparsityMethod

#: The built-in methods register themselves when their modules are imported, on the first lookup.
METHODS: Registry = Registry("sparsity method",
                             builtins=tuple(f"{__name__}.{m}" for m in ("autoprune", "dns", "gmp", "gradual", "l0")))


def register_method(cls: type[SparsityMethod] | None = None, *, override: bool = False):
    """Class decorator: make a method available under ``cls.name`` (a taken name is refused unless
    ``@register_method(override=True)``)."""
    def deco(method: type[SparsityMethod]) -> type[SparsityMethod]:
        return METHODS.add(method.name, method, override=override)

    return deco(cls) if cls is not None else deco


def get_method(name: str) -> type[SparsityMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown sparsity method {name!r}; known: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "MaskedMethod", "MethodConfig", "SparsityMethod", "get_method", "register_method"]
