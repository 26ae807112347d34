"""Reading audio with pip-only libraries: ``soundfile`` decodes, ``soxr`` resamples.

``datasets`` 5 decodes an ``Audio`` column through torchcodec, which needs the system's FFmpeg
shared libraries (absent on a fresh machine, not installable with pip). ``soundfile``'s wheels
carry libsndfile (WAV, FLAC, OGG/Vorbis/Opus and MP3), and ``soxr``'s wheels carry the SoX
resampler, so ``pip install hf_sparse`` is enough. Hub audio is therefore read with
``Audio(decode=False)`` (bytes and/or a path) and decoded here.

Audio comes out as mono float32 in [-1, 1): PCM is scaled by 2^(bits-1) (16-bit samples become
``k / 32768``, exactly what the stdlib ``wave`` path of :mod:`.fsdd` gives) and channels are
averaged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import DataError

#: File endings the decoder reads (libsndfile's formats; MP3 and Opus need libsndfile >= 1.1).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
#: A clip whose largest absolute sample is below this is silence (-80 dBFS).
SILENCE_PEAK = 1e-4


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says: its length in frames, rate and channel count."""

    frames: int
    sampling_rate: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sampling_rate if self.sampling_rate else 0.0


def audio_source(value: Any) -> tuple[Any, str]:
    """What to open and a name for messages, from a path or an ``Audio(decode=False)`` value
    (``{"bytes": ..., "path": ...}``: bytes win, the path names them)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return io.BytesIO(data), str(path or "<audio bytes>")
        if path:
            return str(path), str(path)
        raise DataError("an audio entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value), "<audio bytes>"
    return str(value), str(value)


def audio_info(value: Any) -> AudioInfo:
    """The header of a file (path, bytes or ``Audio(decode=False)`` dict), read without decoding it."""
    import soundfile as sf

    source, name = audio_source(value)
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
        raise DataError(f"{name}: not a readable audio file ({_reason(e)})") from None
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def decode_audio(value: Any) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their sampling rate (channels averaged)."""
    import soundfile as sf

    source, name = audio_source(value)
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as e:
        raise DataError(f"{name}: not a readable audio file ({_reason(e)})") from None
    if not len(data):
        raise DataError(f"{name}: the file holds no audio samples")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(1)
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``audio`` at ``to_rate`` (soxr, high quality); unchanged when the rates agree."""
    if from_rate == to_rate:
        return audio
    import soxr

    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(value: Any, sampling_rate: int) -> np.ndarray:
    """Decode ``value`` (a path, bytes, an ``Audio(decode=False)`` dict, or samples already decoded
    at ``sampling_rate``) to mono float32 at ``sampling_rate``."""
    if isinstance(value, np.ndarray) or (isinstance(value, list) and (not value or not isinstance(value[0], dict))):
        return np.asarray(value, dtype=np.float32)
    audio, rate = decode_audio(value)
    return resample(audio, rate, sampling_rate)


def is_silent(audio: np.ndarray) -> bool:
    """True for a clip with no sample above -80 dBFS."""
    return not len(audio) or float(np.abs(audio).max()) < SILENCE_PEAK


def write_audio(path: str | Path, audio: np.ndarray, sampling_rate: int, subtype: str | None = None) -> Path:
    """Write float samples in [-1, 1) (1-D mono, or (frames, channels)) with soundfile: the format
    from the file ending, 16-bit PCM for WAV unless ``subtype`` says otherwise."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(audio, np.float32)
    if subtype is None and path.suffix.lower() == ".wav":
        subtype = "PCM_16"
    if subtype == "PCM_16":  # scale by 2^15 ourselves: decoding then gives back k / 32768 exactly
        data = np.clip(np.round(data * 32768.0), -32768, 32767).astype(np.int16)
    sf.write(str(path), data, sampling_rate, subtype=subtype)
    return path


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["AUDIO_EXTENSIONS", "AudioInfo", "audio_info", "audio_source", "decode_audio", "is_silent",
           "load_audio", "resample", "write_audio"]
