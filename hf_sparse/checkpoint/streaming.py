"""``hf_sparse.stream`` on a saved checkpoint: load it (any format, folder or Hub id) with its feature
extractor, then stream it as :mod:`hf_sparse.runtime.streaming` streams a model in memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.streaming import SpeechStream
from ..runtime.streaming import stream as stream_model
from .save_and_load import load_sparse, resolve_checkpoint

if TYPE_CHECKING:
    from torch import nn


def stream(model: nn.Module | str | Path, feature_extractor: Any = None, *, runtime: str = "dense",
           **load_kwargs: Any) -> SpeechStream:
    """A :class:`~hf_sparse.runtime.streaming.SpeechStream` for a speech model, or for a checkpoint
    folder / Hub id (loaded with ``load_sparse(..., runtime=runtime)`` and its saved feature extractor;
    ``load_kwargs``: revision, endpoint, token...)."""
    if not isinstance(model, (str, Path)):
        return stream_model(model, feature_extractor, runtime=runtime)
    from transformers import AutoFeatureExtractor

    from .. import models  # noqa: F401  (registers the speech feature extractor with the Auto classes)

    folder = resolve_checkpoint(model, **load_kwargs)
    loaded = load_sparse(folder, runtime=runtime)
    return SpeechStream(loaded, feature_extractor or AutoFeatureExtractor.from_pretrained(folder))


__all__ = ["stream"]
