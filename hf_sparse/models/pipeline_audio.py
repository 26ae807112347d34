"""Audio files as ``transformers.pipeline`` inputs on machines without the FFmpeg binary.

transformers' ``audio-classification`` and ``automatic-speech-recognition`` pipelines read a path
or bytes by piping them through the ``ffmpeg`` program, which pip cannot install; without it every
file input fails with "ffmpeg was not found". After ``import hf_sparse`` those two pipelines
decode with soundfile (libsndfile: WAV, FLAC, OGG, MP3; carried by its wheel) and resample with
soxr instead, *only while no ``ffmpeg`` is on the PATH*: with FFmpeg installed, transformers
behaves exactly as without hf_sparse. Audio comes out as transformers' own reader gives it: mono
float32 at the feature extractor's rate.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from types import ModuleType

import numpy as np

#: the pipeline modules that call ``ffmpeg_read`` by their module-level name
PIPELINE_MODULES = ("transformers.pipelines.audio_classification",
                    "transformers.pipelines.automatic_speech_recognition")


def read_audio_bytes(payload: bytes, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples of an encoded file at ``sampling_rate`` (soundfile + soxr).

    Raises ValueError, as transformers' reader does, when the bytes are not a readable file.
    """
    from ..data import DataError
    from ..data.audio_io import load_audio

    try:
        return load_audio(bytes(payload), sampling_rate)
    except DataError as e:
        raise ValueError(f"{e}; FFmpeg is not installed, so only the formats libsndfile reads (WAV, FLAC, "
                         "OGG, MP3) can be given as files") from None


def _without_ffmpeg(original: Callable[[bytes, int], np.ndarray]) -> Callable[[bytes, int], np.ndarray]:
    @functools.wraps(original)
    def read(bpayload: bytes, sampling_rate: int) -> np.ndarray:
        if shutil.which("ffmpeg"):
            return original(bpayload, sampling_rate)
        return read_audio_bytes(bpayload, sampling_rate)

    read.hf_sparse_fallback = True  # type: ignore[attr-defined]
    return read


def install_audio_file_reader(module: ModuleType) -> None:
    """Route one audio pipeline module's file decoding through :func:`read_audio_bytes` when FFmpeg
    is missing (a module without ``ffmpeg_read``, from another transformers, is left as it is)."""
    original = getattr(module, "ffmpeg_read", None)
    if original is not None and not getattr(original, "hf_sparse_fallback", False):
        module.ffmpeg_read = _without_ffmpeg(original)
