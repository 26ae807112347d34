"""``unstructured``: every weight is its own group."""

from __future__ import annotations

from dataclasses import dataclass

from .granularity import Granularity, register_granularity


@register_granularity
@dataclass(frozen=True)
class Unstructured(Granularity):
    name = "unstructured"
    independent = True

