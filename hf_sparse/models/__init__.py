"""Model sources: hf_sparse's own registry, timm, and transformers' Auto classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from ..data import DataBundle

#: hf_sparse's own models: name -> factory(config_overrides: dict, data: DataBundle) -> PreTrainedModel
MODEL_REGISTRY: dict[str, Callable[[dict, DataBundle], nn.Module]] = {}


def register_model(name: str) -> Callable:
    def deco(fn):
        MODEL_REGISTRY[name] = fn
        return fn

    return deco


from . import lenet, speech_rnn  # noqa: E402,F401
from .build import build_model, forward_problem  # noqa: E402

__all__ = ["MODEL_REGISTRY", "build_model", "forward_problem", "register_model"]
