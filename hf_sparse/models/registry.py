"""hf_sparse's own model factories, by the name a recipe's ``model.name`` gives."""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry

#: name -> factory(config_overrides: dict, data: DataBundle) -> PreTrainedModel
MODEL_REGISTRY: Registry = Registry("model")


def register_model(name: str, override: bool = False) -> Callable:
    """Decorator: register a model factory under ``name`` (a taken name is refused unless ``override``)."""
    def deco(fn):
        return MODEL_REGISTRY.add(name, fn, override=override)

    return deco
