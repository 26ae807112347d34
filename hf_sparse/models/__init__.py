"""Model sources: hf_sparse's own registry, timm, and transformers' Auto classes.

Importing this package registers hf_sparse's own models with the transformers Auto classes (their
modules do it on import) and installs the pipelines' audio-file reader once transformers' pipeline
modules are imported.
"""

from __future__ import annotations

from .._post_import import when_imported
from . import lenet, speech_rnn  # noqa: F401  (their Auto-class and MODEL_REGISTRY registrations)
from .build import build_model, forward_problem
from .pipeline_audio import PIPELINE_MODULES, install_audio_file_reader
from .registry import MODEL_REGISTRY, register_model

for _module in PIPELINE_MODULES:  # audio files without FFmpeg, once each pipeline module is imported
    when_imported(_module, install_audio_file_reader)

__all__ = ["MODEL_REGISTRY", "build_model", "forward_problem", "register_model"]
