"""Free Spoken Digit Dataset: isolated-digit classification (``fsdd``) and connected digits (``fsdd_digits``).

The bundled copy (``data/fsdd``: a tar.gz of 3000 8 kHz WAVs + ``metadata.csv``) or any folder
with the same layout (``data.path``) is decoded with the stdlib ``wave`` module.

Splits (``data.split``):
- ``official``: takes 0-4 are test, takes 5-49 train (2700/300); every speaker is in both parts.
- ``speaker``: one speaker held out for test (``data.options.holdout_speaker``; 2500/500).

``fsdd_digits`` builds connected-digit utterances for CTC: 2-5 digits, all from ONE speaker,
joined by 50-150 ms of silence. Each side of the split draws only from that side's recordings,
so train and test never share a recording, and everything follows from ``data.seed``.
"""

from __future__ import annotations

import csv
import functools
import io
import struct
import tarfile
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from . import BUNDLED_DATA, DataBundle, DataError, register_data
from .feature_extraction import SpeechRNNFeatureExtractor
from .idx import accuracy
from .speech import SpeechCollator, audio_dataset, ctc_argmax, ctc_metrics, featurize

DIGITS = [str(d) for d in range(10)]
#: CTC vocabulary: the blank (id 0, the model's pad_token_id), then the digits 0-9 as ids 1-10.
CTC_VOCAB = ["<blank>", *DIGITS]
CARD_NAME = "free-spoken-digit-dataset"
SPLITS = ("official", "speaker")
OFFICIAL_TEST_TAKES = range(5)


@dataclass(frozen=True)
class Recording:
    file: str
    digit: int
    speaker: str
    take: int


# -- reading the recordings --------------------------------------------------------------------
def _decode_wav(raw: bytes, name: str) -> tuple[np.ndarray, int]:
    """Mono float32 in [-1, 1) and the sampling rate; 8/16/32-bit PCM, channels averaged."""
    try:
        with wave.open(io.BytesIO(raw)) as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, EOFError, struct.error, ValueError) as e:
        raise DataError(f"{name}: not a readable WAV file ({e or type(e).__name__})") from None
    if len(frames) != n * channels * width or channels < 1:
        raise DataError(f"{name}: the WAV header claims {n} frames but the file is cut short")
    if width == 1:
        x = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        x = np.frombuffer(frames, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise DataError(f"{name}: {8 * width}-bit WAV samples are not supported (use 8/16/32-bit PCM)")
    return x.reshape(-1, channels).mean(1) if channels > 1 else x, rate


def _find_archive(folder: Path) -> Path | None:
    archives = sorted(folder.glob("*.tar.gz")) + sorted(folder.glob("*.tgz"))
    if len(archives) > 1:
        raise DataError(f"{folder} holds several archives ({', '.join(a.name for a in archives)}); keep one")
    return archives[0] if archives else None


@functools.lru_cache(maxsize=2)
def _read_folder(folder: str, stamp: float) -> tuple[dict[str, np.ndarray], int]:
    """All WAVs of a folder (its tar.gz, or a ``recordings/`` directory), keyed by path in it."""
    path = Path(folder)
    audio, rates = {}, set()
    archive = _find_archive(path)
    if archive is not None:
        try:
            with tarfile.open(archive) as tf:
                for member in tf:
                    if member.isfile() and member.name.endswith(".wav"):
                        audio[member.name], rate = _decode_wav(tf.extractfile(member).read(),
                                                               f"{archive}:{member.name}")
                        rates.add(rate)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{archive}: not a readable tar.gz archive ({e or type(e).__name__})") from None
    elif (path / "recordings").is_dir():
        for f in sorted((path / "recordings").glob("*.wav")):
            audio[f"recordings/{f.name}"], rate = _decode_wav(f.read_bytes(), str(f))
            rates.add(rate)
    else:
        raise DataError(f"{path} has no .tar.gz of recordings and no recordings/ folder of WAV files")
    if not audio:
        raise DataError(f"{path}: found no .wav files")
    if len(rates) > 1:
        raise DataError(f"{path}: recordings have different sampling rates {sorted(rates)}; resample them to one")
    return audio, rates.pop()


def _parse_name(file: str) -> Recording:
    """``recordings/{digit}_{speaker}_{take}.wav`` -> Recording."""
    stem = Path(file).stem
    try:
        digit, speaker, take = stem.split("_")
        return Recording(file, int(digit), speaker, int(take))
    except ValueError:
        raise DataError(f"{file}: expected a name like 3_theo_12.wav ({{digit}}_{{speaker}}_{{take}})") from None


def read_fsdd(folder: str | Path | None = None) -> tuple[list[Recording], dict[str, np.ndarray], int]:
    """Recordings (sorted by file), their audio and the sampling rate. Decoding is cached per folder.

    Labels come from ``metadata.csv`` when the folder has one (columns file, digit, speaker,
    take), otherwise from the file names.
    """
    folder = Path(folder) if folder else BUNDLED_DATA / "fsdd"
    if not folder.is_dir():
        raise DataError(f"FSDD folder {folder} does not exist")
    source = _find_archive(folder) or folder / "recordings"
    audio, rate = _read_folder(str(folder.resolve()), source.stat().st_mtime if source.exists() else 0.0)
    meta = folder / "metadata.csv"
    if meta.exists():
        try:
            with open(meta, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{meta}: not a readable CSV file ({e})") from None
        missing = {"file", "digit", "speaker", "take"} - set(rows[0] if rows else {})
        if missing:
            raise DataError(f"{meta} lacks the columns {', '.join(sorted(missing))}")
        try:
            recs = [Recording(r["file"], int(r["digit"]), r["speaker"], int(r["take"])) for r in rows]
        except (TypeError, ValueError) as e:
            raise DataError(f"{meta}: digit and take must be integers ({e})") from None
        absent = [r.file for r in recs if r.file not in audio]
        if absent:
            raise DataError(f"{meta} lists {len(absent)} files the recordings lack, e.g. {absent[0]}")
    else:
        recs = [_parse_name(name) for name in audio]
    bad = sorted({r.digit for r in recs} - set(range(10)))
    if bad:
        raise DataError(f"{folder}: digit labels must be 0-9, found {bad}")
    return sorted(recs, key=lambda r: r.file), audio, rate


def split_recordings(recs: list[Recording], split: str, holdout_speaker: str = "theo") -> dict[str, list[Recording]]:
    """``{"train": [...], "test": [...]}`` for the ``official`` or ``speaker`` scheme."""
    if split == "official":
        is_test = [r.take in OFFICIAL_TEST_TAKES for r in recs]
    elif split == "speaker":
        speakers = sorted({r.speaker for r in recs})
        if holdout_speaker not in speakers:
            raise DataError(f"holdout_speaker {holdout_speaker!r} is not in the data; speakers: {', '.join(speakers)}")
        is_test = [r.speaker == holdout_speaker for r in recs]
    else:
        raise DataError(f"data.split {split!r} is not offered by FSDD; use one of {', '.join(SPLITS)}", key="split")
    return {"train": [r for r, t in zip(recs, is_test) if not t], "test": [r for r, t in zip(recs, is_test) if t]}


# -- isolated digits ---------------------------------------------------------------------------
def load_fsdd(folder: str | Path | None = None, split: str = "official",
              holdout_speaker: str = "theo") -> datasets.DatasetDict:
    """Raw-audio ``train``/``test`` splits: ``audio`` (float32), ``labels`` (digit), ``speaker``, ``take``, ``file``."""
    recs, audio, _ = read_fsdd(folder)
    parts = split_recordings(recs, split, holdout_speaker)
    return datasets.DatasetDict({
        name: audio_dataset([audio[r.file] for r in rs], labels=[r.digit for r in rs],
                            speaker=[r.speaker for r in rs], take=[r.take for r in rs], file=[r.file for r in rs])
        for name, rs in parts.items()
    })


# -- connected digits --------------------------------------------------------------------------
def connected_digits(recs: list[Recording], audio: dict[str, np.ndarray], rate: int, num: int, seed: int,
                     salt: int, min_digits: int = 2, max_digits: int = 5,
                     gap_ms: tuple[float, float] = (50.0, 150.0)) -> datasets.Dataset:
    """``num`` utterances of ``min_digits``-``max_digits`` random digits from ``recs``.

    Per utterance: pick a speaker, then for each digit one of that speaker's recordings of it;
    join them with silences drawn uniformly from ``gap_ms``. ``salt`` separates the streams of
    the train and test sides. Columns: ``audio``, ``labels`` (CTC ids: digit + 1), ``text``,
    ``speaker``, ``files`` (the recordings used, in order).
    """
    by_key: dict[tuple[str, int], list[Recording]] = {}
    for r in recs:
        by_key.setdefault((r.speaker, r.digit), []).append(r)
    speakers = sorted({s for s, d in by_key if all((s, k) in by_key for k in range(10))})
    if not speakers:
        raise DataError("connected digits need a speaker with recordings of every digit 0-9")
    lo, hi = (int(round(g * rate / 1000)) for g in gap_ms)
    rng = np.random.default_rng([seed, salt])
    waves, labels, texts, spk, files = [], [], [], [], []
    for _ in range(num):
        speaker = speakers[rng.integers(len(speakers))]
        digits = rng.integers(0, 10, size=rng.integers(min_digits, max_digits + 1))
        chosen = [by_key[speaker, int(d)][rng.integers(len(by_key[speaker, int(d)]))] for d in digits]
        gaps = rng.integers(lo, hi + 1, size=len(digits) - 1)
        pieces = [audio[chosen[0].file]]
        for g, r in zip(gaps, chosen[1:]):
            pieces += [np.zeros(g, np.float32), audio[r.file]]
        waves.append(np.concatenate(pieces))
        labels.append([int(d) + 1 for d in digits])
        texts.append("".join(str(d) for d in digits))
        spk.append(speaker)
        files.append([r.file for r in chosen])
    return audio_dataset(waves, labels=labels, text=texts, speaker=spk, files=files)


def load_fsdd_digits(folder: str | Path | None = None, split: str = "official", holdout_speaker: str = "theo",
                     num_train: int = 3000, num_test: int = 500, seed: int = 0, min_digits: int = 2,
                     max_digits: int = 5, gap_ms: tuple[float, float] = (50.0, 150.0)) -> datasets.DatasetDict:
    """Connected-digit ``train``/``test`` splits built from disjoint recordings (see :func:`connected_digits`)."""
    if not 1 <= min_digits <= max_digits:
        raise DataError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    if not 0 <= gap_ms[0] <= gap_ms[1]:
        raise DataError(f"gap_ms must be [low, high] milliseconds with 0 <= low <= high, got {list(gap_ms)}")
    recs, audio, rate = read_fsdd(folder)
    parts = split_recordings(recs, split, holdout_speaker)
    kw = {"min_digits": min_digits, "max_digits": max_digits, "gap_ms": tuple(gap_ms)}
    return datasets.DatasetDict({
        "train": connected_digits(parts["train"], audio, rate, num_train, seed, salt=0, **kw),
        "test": connected_digits(parts["test"], audio, rate, num_test, seed, salt=1, **kw),
    })


# -- recipe sources ----------------------------------------------------------------------------
_COMMON_OPTIONS = {"holdout_speaker": "theo", "features": {}}
_DIGITS_OPTIONS = {**_COMMON_OPTIONS, "num_train": 3000, "num_test": 500, "min_digits": 2, "max_digits": 5,
                   "gap_ms": [50.0, 150.0]}


def _options(cfg, defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(cfg.options) - set(defaults))
    if unknown:
        raise DataError(f"data.options: unknown key(s) {', '.join(unknown)} for source {cfg.name!r}; "
                        f"allowed: {', '.join(defaults)}", key="options")
    return {**defaults, **cfg.options}


def _feature_extractor(options: dict, rate: int, train: datasets.Dataset) -> SpeechRNNFeatureExtractor:
    """The extractor from ``data.options.features``; global statistics are fitted on the train split."""
    try:
        fe = SpeechRNNFeatureExtractor(sampling_rate=rate, **options["features"])
    except (TypeError, ValueError) as e:
        raise DataError(f"data.options.features: {e}", key="options") from None
    if fe.normalize == "global" and fe.mean is None:
        fe.fit_global_stats(train.with_format("numpy")["audio"])
    return fe


def _bundle(dd: datasets.DatasetDict, options: dict, rate: int, task: str, label_names: list[str],
            card_name: str) -> DataBundle:
    fe = _feature_extractor(options, rate, dd["train"])
    train, test = featurize(dd["train"], fe), featurize(dd["test"], fe)
    info = {"feature_extractor": fe, "sampling_rate": rate}
    if task == "ctc":  # the fixed digit vocabulary, saved with the checkpoint as a tokenizer + processor
        from .speech_processor import SpeechRNNProcessor, ctc_tokenizer

        info.update(vocab=label_names, preprocess_logits_for_metrics=ctc_argmax,
                    processor=SpeechRNNProcessor(feature_extractor=fe, tokenizer=ctc_tokenizer(label_names)))
    return DataBundle(train=train, eval=test, collator=SpeechCollator(fe),
                      compute_metrics=ctc_metrics if task == "ctc" else accuracy, task=task,
                      num_labels=len(label_names), label_names=label_names, info=info, card_name=card_name)


@register_data("fsdd")
def fsdd_source(cfg) -> DataBundle:
    """Spoken-digit classification (10 classes). Options: ``holdout_speaker``, ``features``."""
    options = _options(cfg, _COMMON_OPTIONS)
    dd = load_fsdd(cfg.path, cfg.split, options["holdout_speaker"])
    _, _, rate = read_fsdd(cfg.path)
    return _bundle(dd, options, rate, "audio-classification", DIGITS, cfg.path or CARD_NAME)


@register_data("fsdd_digits")
def fsdd_digits_source(cfg) -> DataBundle:
    """Connected-digit recognition with CTC. Options: ``num_train``, ``num_test``, ``min_digits``,
    ``max_digits``, ``gap_ms``, ``holdout_speaker``, ``features``."""
    o = _options(cfg, _DIGITS_OPTIONS)
    gap = o["gap_ms"]
    if not (isinstance(gap, (list, tuple)) and len(gap) == 2):
        raise DataError(f"data.options.gap_ms must be [low, high] in milliseconds, got {gap!r}", key="options")
    dd = load_fsdd_digits(cfg.path, cfg.split, o["holdout_speaker"], int(o["num_train"]), int(o["num_test"]),
                          cfg.seed, int(o["min_digits"]), int(o["max_digits"]), (float(gap[0]), float(gap[1])))
    _, _, rate = read_fsdd(cfg.path)
    return _bundle(dd, o, rate, "ctc", CTC_VOCAB, cfg.path or CARD_NAME)
