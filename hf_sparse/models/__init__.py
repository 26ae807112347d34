"""Model sources: hf_sparse's own registry, timm, and transformers' Auto classes."""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry

#: hf_sparse's own models: name -> factory(config_overrides: dict, data: DataBundle) -> PreTrainedModel
MODEL_REGISTRY: Registry = Registry("model")


def register_model(name: str, override: bool = False) -> Callable:
    """Decorator: register a model factory under ``name`` (a taken name is refused unless ``override``)."""
    def deco(fn):
        return MODEL_REGISTRY.add(name, fn, override=override)

    return deco


from .._post_import import when_imported  # noqa: E402
from . import lenet, speech_rnn  # noqa: E402,F401
from .pipeline_audio import PIPELINE_MODULES, install_audio_file_reader  # noqa: E402

for _module in PIPELINE_MODULES:  # audio files without FFmpeg, once each pipeline module is imported
    when_imported(_module, install_audio_file_reader)
from .build import build_model, forward_problem  # noqa: E402

__all__ = ["MODEL_REGISTRY", "build_model", "forward_problem", "register_model"]
