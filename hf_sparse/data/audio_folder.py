"""Speech data from the user's own audio files: ``data.name: audio_folder`` over ``data.path``.

The layout is the one ``datasets``' ``audiofolder`` builder reads:

- classification by folders: ``train/<label>/*.wav`` and ``test/<label>/*.wav`` (or ``validation/``,
  ``val/``, ``valid/``, ``dev/``); the folder names are the class names. Without split folders,
  ``<label>/*.wav`` is the training split.
- a ``metadata.csv`` with a ``file_name`` column (a path relative to the CSV) plus ``label``
  (classification) or a transcript column ``transcription``, ``text`` or ``sentence`` (CTC); one at
  the root (``file_name`` may start with the split folder, ``train/a.wav``) or one per split folder.
  ``data.label_column``/``data.text_column`` name other columns, ``data.task`` decides when both
  kinds are present.

Any file soundfile reads (WAV, FLAC, OGG, MP3), any sampling rate (resampled to the feature
extractor's rate), stereo mixed to mono. A folder with only a training split gets a seeded
evaluation split of ``data.eval_fraction`` of the files (stratified by label for classification),
and the log says so. Every file's header is read up front (length, rate, channels: < 0.1 ms a file);
the audio itself is decoded and featurised when a batch reads it (:class:`.speech.AudioTransform`),
so a folder of any size trains without holding its audio in memory.

Bad data: an unreadable or empty file, or one longer than ``data.max_duration_s``, is skipped and
counted in the log (with the first few names); an empty transcript too. A label folder without
audio files, an evaluation label the training split lacks, a metadata row naming a missing file,
or a split left with no files is a :class:`~hf_sparse.data.DataError` naming the file or folder.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from . import DataBundle, DataError, register_data
from .audio_io import AUDIO_EXTENSIONS, audio_info
from .feature_extraction import SpeechRNNFeatureExtractor
from .idx import accuracy
from .speech import (
    AudioTransform,
    AugmentEpochCallback,
    SpeechCollator,
    TextCTCMetrics,
    augment_settings,
    ctc_argmax,
)

logger = logging.getLogger(__name__)

TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("validation", "valid", "val", "dev", "test")
TEXT_COLUMNS = ("transcription", "text", "sentence")
LABEL_COLUMNS = ("label", "labels")
TASKS = ("audio-classification", "ctc")
#: Feature extractor rate when the recipe sets none: the files' most common rate, at most this.
MAX_DEFAULT_RATE = 16000
OPTIONS = {"features": {}}


# -- the feature extractor, sized for the data's rate ----------------------------------------------
def feature_extractor_for(features: dict[str, Any], rate: int) -> SpeechRNNFeatureExtractor:
    """The extractor from ``data.options.features`` at ``rate`` unless they set ``sampling_rate``.

    Window, hop and FFT sizes left unset keep 25 ms windows every 10 ms whatever the rate:
    ``win_length = 0.025 * rate``, ``hop_length = 0.01 * rate``, ``n_fft`` the next power of two
    (at 8 kHz exactly the extractor's defaults 200/80/256, so FSDD features do not change).
    """
    kwargs = dict(features)
    rate = int(kwargs.pop("sampling_rate", rate))
    kwargs.setdefault("win_length", int(round(0.025 * rate)))
    kwargs.setdefault("hop_length", int(round(0.01 * rate)))
    kwargs.setdefault("n_fft", 1 << max(int(kwargs["win_length"]) - 1, 1).bit_length())
    try:
        return SpeechRNNFeatureExtractor(sampling_rate=rate, **kwargs)
    except (TypeError, ValueError) as e:
        raise DataError(f"data.options.features: {e}", key="options") from None


def default_rate(rates: Iterable[int]) -> int:
    """The most common rate (ties: the higher), at most :data:`MAX_DEFAULT_RATE`."""
    counts = Counter(rates)
    if not counts:
        return MAX_DEFAULT_RATE
    best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return min(int(best), MAX_DEFAULT_RATE)


# -- checks that skip bad files --------------------------------------------------------------------
class Skipped:
    """Files left out, by reason, reported in one log line per reason."""

    def __init__(self, where: str):
        self.where = where
        self.reasons: dict[str, list[str]] = {}

    def add(self, reason: str, name: str) -> None:
        self.reasons.setdefault(reason, []).append(name)

    def log(self) -> None:
        for reason, names in self.reasons.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            logger.warning("%s: skipped %d file(s) %s: %s%s", self.where, len(names), reason,
                           ", ".join(names[:3]), more)

    def count(self) -> int:
        return sum(len(v) for v in self.reasons.values())


def check_audio(values: Sequence[Any], names: Sequence[str], max_duration_s: float | None,
                skipped: Skipped) -> tuple[list[int], list[int]]:
    """Indices of the readable, non-empty clips no longer than ``max_duration_s``, and their rates."""
    keep, rates = [], []
    for i, (value, name) in enumerate(zip(values, names)):
        try:
            info = audio_info(value)
        except DataError as e:
            skipped.add("that cannot be read", f"{name} ({str(e).rsplit('(', 1)[-1].rstrip(')')})")
            continue
        if info.frames == 0 or info.channels == 0:
            skipped.add("with no audio samples", name)
        elif max_duration_s is not None and info.duration_s > max_duration_s:
            skipped.add(f"longer than max_duration_s={max_duration_s:g}", f"{name} ({info.duration_s:.1f} s)")
        else:
            keep.append(i)
            rates.append(info.sampling_rate)
    return keep, rates


# -- turning labels and transcripts into targets ---------------------------------------------------
def class_ids(train_labels: Sequence[str], eval_labels: Sequence[str], eval_names: Sequence[str],
              where: str, names: list[str] | None = None) -> tuple[list[str], list[int], list[int]]:
    """Class names (``names``, else the training labels sorted) and both splits' label ids; an
    evaluation label the training split lacks is a DataError naming its file."""
    names = list(names) if names is not None else sorted({str(x) for x in train_labels})
    index = {n: i for i, n in enumerate(names)}
    for label, name in zip(eval_labels, eval_names):
        if str(label) not in index:
            raise DataError(f"{where}: {name} has label {label!r}, which no training file has "
                            f"(training labels: {', '.join(names[:10])}{'...' if len(names) > 10 else ''})")
    return names, [index[str(x)] for x in train_labels], [index[str(x)] for x in eval_labels]


def transcript_ids(train_texts: Sequence[str], eval_texts: Sequence[str], eval_names: Sequence[str],
                   where: str) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """The character vocabulary of the normalised training transcripts and both splits' token ids.

    Evaluation characters outside the vocabulary become ``<unk>`` (counted as errors by the
    metrics) and are reported in the log with the first file that has them.
    """
    from .speech_processor import UNK, build_vocab, normalize_transcript

    train_norm = [normalize_transcript(t) for t in train_texts]
    vocab = build_vocab(train_norm)
    index = {c: i for i, c in enumerate(vocab)}
    unk = index[UNK]

    def encode(text: str) -> list[int]:
        return [index["|"] if c == " " else index.get(c, unk) for c in text]

    missing: Counter = Counter()
    first: dict[str, str] = {}
    eval_ids = []
    for text, name in zip(eval_texts, eval_names):
        norm = normalize_transcript(text)
        for c in set(norm) - set(index) - {" "}:
            missing[c] += 1
            first.setdefault(c, name)
        eval_ids.append(encode(norm))
    if missing:
        listed = ", ".join(f"{c!r} ({n} transcript(s), e.g. {first[c]})" for c, n in missing.most_common(5))
        logger.warning("%s: evaluation transcripts use characters no training transcript has; they are "
                       "<unk> and count as errors: %s", where, listed)
    return vocab, [encode(t) for t in train_norm], eval_ids


def holdout_split(n: int, labels: Sequence[Any] | None, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/eval indices with ``fraction`` held out; stratified when ``labels`` are given
    (every class with at least two files keeps at least one in training and gives at least one)."""
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i in range(n):
        groups.setdefault(labels[i] if labels is not None else 0, []).append(i)
    held: list[int] = []
    for key in sorted(groups, key=str):
        members = list(rng.permutation(groups[key]))
        take = int(round(len(members) * fraction))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        held += [int(i) for i in members[:take]]
    if not held and n >= 2:  # classes too small to give any: hold out one file all the same
        held = [int(rng.integers(n))]
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


# -- the bundle both folder and Hub sources build --------------------------------------------------
def speech_bundle(train: datasets.Dataset, evaluation: datasets.Dataset, task: str, label_names: list[str],
                  rate: int, cfg, card_name: str) -> DataBundle:
    """A bundle over splits whose ``input_features`` column holds audio references and whose
    ``labels`` are class ids or token ids; featurised (and, for training, augmented) when read."""
    options = {**OPTIONS, **cfg.options}
    fe = feature_extractor_for(options.get("features") or {}, rate)
    if fe.normalize == "global" and fe.mean is None:
        reader = AudioTransform(fe)  # one pass over the training audio, a batch of references at a time
        fe.fit_global_stats(reader.waveform(v) for batch in train.iter(batch_size=256)
                            for v in batch["input_features"])
    train_transform = AudioTransform(fe, augment_settings(cfg.augment), cfg.seed)
    info: dict[str, Any] = {"feature_extractor": fe, "sampling_rate": fe.sampling_rate, "lazy_audio": True}
    if train_transform.augment:
        info["callbacks"] = [AugmentEpochCallback(train_transform)]
    metrics = accuracy
    if task == "ctc":
        from .speech_processor import SpeechRNNProcessor, ctc_tokenizer

        info.update(vocab=label_names, preprocess_logits_for_metrics=ctc_argmax,
                    processor=SpeechRNNProcessor(feature_extractor=fe, tokenizer=ctc_tokenizer(label_names)))
        metrics = TextCTCMetrics(label_names)
    return DataBundle(train=train.with_transform(train_transform),
                      eval=evaluation.with_transform(AudioTransform(fe)), collator=SpeechCollator(fe),
                      compute_metrics=metrics, task=task, num_labels=len(label_names), label_names=label_names,
                      info=info, card_name=card_name)


@dataclass
class SplitRefs:
    """One split before checking: audio references (read once, in order), a name per example for
    messages, and its target (a label string or a transcript)."""

    values: Iterable[Any]
    names: list[str]
    targets: list[str]


@dataclass
class Selection:
    """What :func:`select_examples` keeps: per split, the row indices into its source and their
    targets (class ids or token ids); the eval split's source is ``"train"`` when it was held out."""

    train_keep: list[int]
    train_ids: list
    eval_source: str
    eval_keep: list[int]
    eval_ids: list
    label_names: list[str]
    rates: list[int]


def select_examples(where: str, cfg, task: str, train: SplitRefs, evaluation: SplitRefs | None,
                    label_names: list[str] | None = None) -> Selection:
    """Check the audio (skipping bad files, logged), hold out an evaluation split when there is none,
    drop empty transcripts, encode the targets. ``label_names`` fixes the class order (a Hub
    ClassLabel's); by default the training labels, sorted."""
    skipped = Skipped(where)
    train_keep, rates = check_audio(train.values, train.names, cfg.max_duration_s, skipped)
    eval_source = "eval"
    if evaluation is None:
        labels = [train.targets[i] for i in train_keep] if task == "audio-classification" else None
        tr, ev = holdout_split(len(train_keep), labels, cfg.eval_fraction, cfg.seed)
        logger.warning("%s has no evaluation split: holding out %d of %d training files (data.eval_fraction=%g, "
                       "seed %d%s)", where, len(ev), len(train_keep), cfg.eval_fraction, cfg.seed,
                       ", stratified by label" if labels is not None else "")
        train_keep, eval_keep, eval_source, evaluation = [train_keep[i] for i in tr], [train_keep[i] for i in ev], \
            "train", train
    else:
        eval_keep, eval_rates = check_audio(evaluation.values, evaluation.names, cfg.max_duration_s, skipped)
        rates += eval_rates
    if task == "ctc":
        from .speech_processor import normalize_transcript

        def non_empty(keep: list[int], refs: SplitRefs) -> list[int]:
            empty = [i for i in keep if not normalize_transcript(refs.targets[i])]
            for i in empty:
                skipped.add("with an empty transcript", refs.names[i])
            gone = set(empty)
            return [i for i in keep if i not in gone]

        train_keep, eval_keep = non_empty(train_keep, train), non_empty(eval_keep, evaluation)
    skipped.log()
    for split_name, keep in (("training", train_keep), ("evaluation", eval_keep)):
        if not keep:
            raise DataError(f"{where}: no usable audio file is left in the {split_name} split"
                            f"{f' ({skipped.count()} skipped, see the log)' if skipped.count() else ''}")
    train_targets = [train.targets[i] for i in train_keep]
    eval_targets = [evaluation.targets[i] for i in eval_keep]
    eval_names = [evaluation.names[i] for i in eval_keep]
    if task == "ctc":
        names, train_ids, eval_ids = transcript_ids(train_targets, eval_targets, eval_names, where)
    else:
        names, train_ids, eval_ids = class_ids(train_targets, eval_targets, eval_names, where, label_names)
    return Selection(train_keep, train_ids, eval_source, eval_keep, eval_ids, names, rates)


# -- the folder layout -----------------------------------------------------------------------------
def _audio_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)


def _split_folders(root: Path, cfg) -> tuple[Path | None, Path | None]:
    """The training and evaluation folders (``data.train_split``/``data.eval_split`` name them)."""
    def pick(names: Sequence[str]) -> Path | None:
        return next((root / n for n in names if (root / n).is_dir()), None)

    train = pick([cfg.train_split] if cfg.train_split else TRAIN_SPLITS)
    if cfg.train_split and train is None:
        raise DataError(f"{root} has no folder {cfg.train_split!r} (data.train_split)", key="train_split")
    evaluation = pick([cfg.eval_split] if cfg.eval_split else EVAL_SPLITS)
    if cfg.eval_split and evaluation is None:
        raise DataError(f"{root} has no folder {cfg.eval_split!r} (data.eval_split)", key="eval_split")
    return train, evaluation


def _read_metadata(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise DataError(f"{csv_path}: not a readable CSV file ({e})") from None
    if not rows or "file_name" not in rows[0]:
        raise DataError(f"{csv_path}: needs a header with a file_name column (and label or a transcript column "
                        f"{', '.join(TEXT_COLUMNS)}), got {list(rows[0]) if rows else 'no rows'}")
    return rows


def metadata_task(columns: Sequence[str], cfg, where: str) -> tuple[str, str]:
    """The task and the target column of a metadata table (or Hub split) with ``columns``."""
    text = cfg.text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    label = cfg.label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    for key, col in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if col and col not in columns:
            raise DataError(f"{where} has no column {col!r}; its columns: {', '.join(columns)}", key=key)
    task = cfg.task
    if task is None:
        if text and label:
            raise DataError(f"{where} has both a label column ({label!r}) and a transcript column ({text!r}): set "
                            "data.task to audio-classification or ctc", key="task")
        if not (text or label):
            raise DataError(f"{where} has no label column ({', '.join(LABEL_COLUMNS)}) and no transcript column "
                            f"({', '.join(TEXT_COLUMNS)}); name one with data.label_column or data.text_column; "
                            f"its columns: {', '.join(columns)}", key="label_column")
        task = "ctc" if text else "audio-classification"
    column = text if task == "ctc" else label
    if column is None:
        wanted = "a transcript column" if task == "ctc" else "a label column"
        raise DataError(f"{where}: data.task {task} needs {wanted}; its columns: {', '.join(columns)}", key="task")
    return task, column


def _metadata_split(root: Path, split: Path | None, rows: list[dict[str, str]], csv_path: Path,
                    column: str) -> dict[str, list]:
    """The rows of ``csv_path`` that belong to ``split`` (all rows when there are no split folders)."""
    out: dict[str, list] = {"audio": [], "name": [], "target": []}
    base = csv_path.parent
    for line, row in enumerate(rows, start=2):
        rel = (row.get("file_name") or "").strip()
        path = (base / rel)
        if split is not None and base == root and split not in path.parents:
            continue
        if not rel or not path.is_file():
            raise DataError(f"{csv_path}:{line}: file_name {rel!r} is not a file under {base}")
        out["audio"].append(str(path))
        out["name"].append(str(path.relative_to(root)) if root in path.parents else str(path))
        out["target"].append(row.get(column) or "")
    return out


def _class_split(root: Path, split: Path) -> dict[str, list]:
    out: dict[str, list] = {"audio": [], "name": [], "target": []}
    classes = sorted(d for d in split.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{split} has no class folders (expected {split.name}/<label>/*.wav) and no metadata.csv")
    for d in classes:
        files = _audio_files(d)
        if not files:
            raise DataError(f"{d}: the label folder {d.name!r} holds no audio files "
                            f"({', '.join(AUDIO_EXTENSIONS)}); add recordings or remove the folder")
        for f in files:
            out["audio"].append(str(f))
            out["name"].append(str(f.relative_to(root)))
            out["target"].append(d.name)
    return out


def scan_audio_folder(folder: str | Path, cfg) -> tuple[str, dict[str, list], dict[str, list] | None]:
    """The task and per-split ``{"audio", "name", "target"}`` lists of an audiofolder layout."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    train_dir, eval_dir = _split_folders(root, cfg)
    metas = {d: d / "metadata.csv" for d in (root, train_dir, eval_dir) if d is not None and (d / "metadata.csv").is_file()}
    if metas:
        tables = {d: _read_metadata(p) for d, p in metas.items()}
        first = next(iter(tables.values()))
        task, column = metadata_task(list(first[0]), cfg, str(next(iter(metas.values()))))
        for d, rows in tables.items():
            if column not in rows[0]:
                raise DataError(f"{metas[d]} has no column {column!r}; its columns: {', '.join(rows[0])}")

        def split_rows(split: Path | None) -> dict[str, list] | None:
            if split is not None and split in tables:
                return _metadata_split(root, None, tables[split], metas[split], column)
            if root in tables and (split is not None or train_dir is None):
                return _metadata_split(root, split, tables[root], metas[root], column)
            return None

        train = split_rows(train_dir)
        evaluation = split_rows(eval_dir) if eval_dir is not None else None
        if evaluation is not None and not evaluation["audio"]:
            evaluation = None
    else:
        if cfg.task == "ctc":
            raise DataError(f"{root}: data.task ctc needs a metadata.csv with file_name and a transcript column "
                            f"({', '.join(TEXT_COLUMNS)})", key="task")
        task = "audio-classification"
        if train_dir is None:  # <label>/*.wav at the root: everything is training data
            train = _class_split(root, root)
        else:
            train = _class_split(root, train_dir)
        evaluation = _class_split(root, eval_dir) if eval_dir is not None else None
    if not train or not train["audio"]:
        raise DataError(f"{root} holds no training audio: expected train/<label>/*.wav, or a metadata.csv with "
                        "file_name and label/transcription columns")
    return task, train, evaluation


@register_data("audio_folder", reuse=False)
def audio_folder_source(cfg) -> DataBundle:
    """``data.path`` in the audiofolder layout (see the module docstring). Options: ``features``."""
    if not cfg.path:
        raise DataError("data.name 'audio_folder' needs data.path: a folder with train/<label>/*.wav and "
                        "test/<label>/*.wav, or a metadata.csv (file_name plus label or transcription)")
    unknown = sorted(set(cfg.options) - set(OPTIONS))
    if unknown:
        raise DataError(f"data.options: unknown key(s) {', '.join(unknown)} for source 'audio_folder'; allowed: "
                        f"{', '.join(OPTIONS)}", key="options")
    task, train, evaluation = scan_audio_folder(cfg.path, cfg)
    refs = {name: SplitRefs(split["audio"], split["name"], split["target"])
            for name, split in (("train", train), ("eval", evaluation)) if split is not None}
    sel = select_examples(str(cfg.path), cfg, task, refs["train"], refs.get("eval"))

    def dataset(source: str, keep: list[int], ids: list) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"input_features": [refs[source].values[i] for i in keep], "labels": ids})

    rate = default_rate(sel.rates)
    return speech_bundle(dataset("train", sel.train_keep, sel.train_ids),
                         dataset(sel.eval_source, sel.eval_keep, sel.eval_ids), task, sel.label_names, rate, cfg,
                         Path(cfg.path).name)


__all__ = ["SplitRefs", "audio_folder_source", "select_examples", "feature_extractor_for", "metadata_task", "scan_audio_folder",
           "speech_bundle"]
