"""Registry of sparsity methods: ``sparsity.method`` in a recipe names one of these."""

from __future__ import annotations

from .base import MaskedMethod, MethodConfig, SparsityMethod

METHODS: dict[str, type[SparsityMethod]] = {}


def register_method(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Class decorator: make a method available under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[SparsityMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown sparsity method {name!r}; known: {', '.join(sorted(METHODS))}") from None


# Importing the modules registers the methods.
from . import autoprune, dns, gmp, gradual, l0  # noqa: E402,F401

__all__ = ["METHODS", "MaskedMethod", "MethodConfig", "SparsityMethod", "get_method", "register_method"]
