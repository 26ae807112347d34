"""Speech datasets from the Hub (``data.hub_id`` with an ``Audio`` column), via ``datasets``.

``data.hub_id`` is dispatched on the dataset's columns: an ``Audio`` column makes it speech data
(this module), anything else goes to :mod:`.hub_images`. A local folder written by
``Dataset(Dict).save_to_disk`` is accepted as ``hub_id`` too (read with ``load_from_disk``), as is
a local folder ``datasets.load_dataset`` reads (e.g. parquet files named by split).

- ``data.config_name`` picks the configuration (``v0.02`` for Speech Commands, ``clean`` for
  LibriSpeech); other ``data.options`` (except ``features``, the extractor's) go to ``load_dataset``.
- ``data.train_split`` (default ``train``), ``data.eval_split`` (default ``validation``, else
  ``test``; with neither, a seeded held-out part of the training split).
- ``data.audio_column`` (default ``audio``, or the only ``Audio`` column); ``data.label_column``
  (default: the only ``ClassLabel`` column, or ``label``) for classification, ``data.text_column``
  (default: ``transcription``, ``text`` or ``sentence``) for CTC; ``data.task`` decides when both exist.

The audio column is read with ``Audio(decode=False)`` and decoded by :mod:`.audio_io` when a batch
reads it (no FFmpeg needed). The headers are read once up front to skip unreadable, empty and
too-long clips; nothing is decoded or copied up front: the splits stay memory-mapped and are
narrowed with ``select``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from ..text import first_line
from . import DataBundle, DataError
from .audio_folder import (
    EVAL_SPLITS,
    LABEL_COLUMNS,
    SplitRefs,
    default_rate,
    metadata_task,
    select_examples,
    speech_bundle,
)

#: Rows whose headers are read per batch while checking a split.
SCAN_BATCH = 512


def load_hub_dataset(cfg) -> datasets.DatasetDict:
    """The dataset ``data.hub_id`` names: a ``save_to_disk`` folder, or anything ``load_dataset`` takes."""
    options = {k: v for k, v in cfg.options.items() if k != "features"}
    local = Path(cfg.hub_id).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            dd = datasets.load_from_disk(str(local))
        else:
            from ..hub_probe import hub_problem

            if not local.exists() and (problem := hub_problem(cfg.hub_id, repo_type="dataset")):
                raise OSError(f"the Hub does not answer: {problem}")  # in seconds, not after datasets' retries
            dd = datasets.load_dataset(cfg.hub_id, cfg.config_name, **options)
    except Exception as e:  # network, auth, missing repo or config: all reported the same way
        raise DataError(f"cannot load Hub dataset {cfg.hub_id!r}{f' ({cfg.config_name})' if cfg.config_name else ''} "
                        f"({first_line(e)}); without Hub access, point data.path at a local copy or use a "
                        "built-in data.name") from None
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    return dd


def audio_column(split: datasets.Dataset, cfg, where: str) -> str | None:
    """The split's audio column: ``data.audio_column`` if it is one, else the only ``Audio`` column."""
    audio = [c for c, f in split.features.items() if isinstance(f, datasets.Audio)]
    if cfg.audio_column in audio:
        return cfg.audio_column
    if "audio_column" in cfg.model_fields_set and cfg.audio_column not in audio:
        raise DataError(f"{where} has no Audio column {cfg.audio_column!r}; its Audio columns: "
                        f"{', '.join(audio) or 'none'}", key="audio_column")
    if len(audio) > 1:
        raise DataError(f"{where} has several Audio columns ({', '.join(audio)}): name one with data.audio_column",
                        key="audio_column")
    return audio[0] if audio else None


def is_audio_dataset(dd: datasets.DatasetDict) -> bool:
    return any(isinstance(f, datasets.Audio) for split in dd.values() for f in split.features.values())


def load_hub_data(cfg) -> DataBundle:
    """``data.hub_id``: a speech bundle for a dataset with an ``Audio`` column, else an image bundle."""
    dd = load_hub_dataset(cfg)
    if not is_audio_dataset(dd):
        from .hub_images import load_hub_images

        return load_hub_images(cfg)
    return hub_audio_bundle(dd, cfg)


def _label_column(split: datasets.Dataset, cfg) -> str | None:
    """``data.label_column``, else the only ClassLabel column, else a column named label/labels."""
    if cfg.label_column:
        return cfg.label_column
    class_labels = [c for c, f in split.features.items() if isinstance(f, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    return next((c for c in LABEL_COLUMNS if c in split.column_names), None)


def _values(split: datasets.Dataset, column: str) -> Iterator[Any]:
    """The encoded audio of every row, in order, read in batches (never the whole column at once)."""
    for batch in split.select_columns([column]).iter(batch_size=SCAN_BATCH):
        yield from batch[column]


def _names(split: datasets.Dataset, column: str, where: str) -> list[str]:
    """A name per row for messages: the file path the dataset records, else ``where[i]``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = None
    try:  # the path field alone, from the memory-mapped table (no audio bytes are copied)
        table = split.select_columns([column]).with_format("arrow")[:]
        paths = pc.struct_field(table.column(column), "path").to_pylist()
    except (KeyError, AttributeError, TypeError, ValueError, pa.ArrowException):
        pass
    return [p or f"{where}[{i}]" for i, p in enumerate(paths or [None] * len(split))]


def hub_audio_bundle(dd: datasets.DatasetDict, cfg) -> DataBundle:
    """The speech bundle of a loaded dataset with an Audio column (see the module docstring)."""
    name = cfg.hub_id
    train_split = cfg.train_split or "train"
    if train_split not in dd:
        raise DataError(f"{name} has no split {train_split!r}; its splits: {', '.join(dd)}", key="train_split")
    eval_split = cfg.eval_split or next((s for s in EVAL_SPLITS if s in dd), None)
    if eval_split is not None and eval_split not in dd:
        raise DataError(f"{name} has no split {eval_split!r}; its splits: {', '.join(dd)}", key="eval_split")
    train = dd[train_split]
    where = f"{name}[{train_split}]"
    col = audio_column(train, cfg, where)
    label = _label_column(train, cfg)
    task, target = metadata_task(train.column_names, cfg.model_copy(update={"label_column": label}), where)
    if target == col:
        raise DataError(f"{where}: the target column {target!r} is the audio column", key="label_column")
    feature = train.features[target]
    label_names = list(feature.names) if task == "audio-classification" and isinstance(feature, datasets.ClassLabel) \
        else None
    splits = {"train": train.cast_column(col, datasets.Audio(decode=False))}
    if eval_split is not None:
        splits["eval"] = dd[eval_split].cast_column(col, datasets.Audio(decode=False))
        missing = [c for c in (col, target) if c not in splits["eval"].column_names]
        if missing:
            raise DataError(f"{name}[{eval_split}] lacks the column(s) {', '.join(missing)}", key="eval_split")

    def targets(split: datasets.Dataset) -> list[str]:
        values = split[target]
        if label_names is not None:
            return [label_names[int(v)] for v in values]
        return [str(v) for v in values]

    refs = {key: SplitRefs(_values(split, col), _names(split, col, f"{name}[{key}]"), targets(split))
            for key, split in splits.items()}
    sel = select_examples(where, cfg, task, refs["train"], refs.get("eval"), label_names)

    def dataset(source: str, keep: list[int], ids: list) -> datasets.Dataset:
        split = splits[source]
        full: list = [[] if task == "ctc" else -1] * len(split)
        for i, value in zip(keep, ids):
            full[i] = value
        narrowed = split.select_columns([col]).rename_column(col, "input_features")
        return narrowed.add_column("labels", full).select(keep)

    sampling_rate = getattr(train.features[col], "sampling_rate", None)
    rate = min(int(sampling_rate), 16000) if sampling_rate else default_rate(sel.rates)
    card_name = Path(name).name if Path(name).expanduser().is_dir() else name  # never a local absolute path
    return speech_bundle(dataset("train", sel.train_keep, sel.train_ids),
                         dataset(sel.eval_source, sel.eval_keep, sel.eval_ids), task, sel.label_names, rate, cfg,
                         card_name)


__all__ = ["audio_column", "hub_audio_bundle", "is_audio_dataset", "load_hub_data", "load_hub_dataset"]
