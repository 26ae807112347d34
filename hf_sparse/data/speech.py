"""Pieces every speech data source shares: audio datasets, featurising, batching, CTC metrics.

Features are computed once per split with the model's feature extractor (``datasets.map``, ~0.2 ms
per utterance) and stored as an ``input_features`` column, so the batches only need padding and the
splits survive Trainer's ``remove_unused_columns`` (which would drop a raw ``audio`` column).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from ..models.feature_extraction import SpeechRNNFeatureExtractor

#: Label value that marks padding in CTC label batches (ignored by the loss and the metrics).
LABEL_PAD = -100


def audio_dataset(audio: Sequence[np.ndarray], **columns: list) -> datasets.Dataset:
    """An in-memory Dataset with a float32 ``audio`` column plus the given plain columns.

    Built through Arrow offsets directly: converting thousands of float arrays through Python
    lists (``Dataset.from_dict``) takes seconds.
    """
    lengths = np.fromiter((len(a) for a in audio), dtype=np.int64, count=len(audio))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([np.asarray(a, np.float32) for a in audio]) if len(audio) else np.zeros(0, np.float32)
    audio_arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat, pa.float32()))
    extra = datasets.Dataset.from_dict(columns) if columns else None
    table = pa.table({"audio": audio_arr, **({n: extra.data.column(n) for n in columns} if extra else {})})
    features = datasets.Features({"audio": datasets.LargeList(datasets.Value("float32")),
                                  **(extra.features if extra else {})})
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def featurize(ds: datasets.Dataset, feature_extractor: SpeechRNNFeatureExtractor, keep_audio: bool = False,
              batch_size: int = 256) -> datasets.Dataset:
    """Add ``input_features`` (frames, n_mels) float32 per row; drop ``audio`` unless asked to keep it."""
    n_mels = feature_extractor.feature_size
    features = ds.features.copy()
    features["input_features"] = datasets.Array2D((None, n_mels), "float32")
    if not keep_audio:
        del features["audio"]

    def fn(batch: dict) -> dict:
        out = feature_extractor(list(batch["audio"]), padding=False)
        return {"input_features": [np.asarray(f, np.float32) for f in out["input_features"]]}

    return ds.with_format("numpy", columns=["audio"], output_all_columns=True).map(
        fn, batched=True, batch_size=batch_size, features=features,
        remove_columns=None if keep_audio else ["audio"], desc="log-mel features",
    ).with_format("numpy")


class SpeechCollator:
    """Pads ``input_features`` into (batch, frames, n_mels) with a frame ``attention_mask``.

    Integer labels (classification) become a tensor; label sequences (CTC) are padded with -100.
    Other columns are ignored, so it works whether or not Trainer removed them.
    """

    def __init__(self, feature_extractor: SpeechRNNFeatureExtractor):
        self.feature_extractor = feature_extractor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats = [np.asarray(r["input_features"], np.float32) for r in rows]
        batch = dict(self.feature_extractor.pad({"input_features": feats}, padding="longest",
                                                return_attention_mask=True, return_tensors="pt"))
        if "labels" in rows[0]:
            labels = [np.asarray(r["labels"]) for r in rows]
            if labels[0].ndim == 0:
                batch["labels"] = torch.as_tensor(np.stack(labels), dtype=torch.long)
            else:
                out = torch.full((len(labels), max(len(x) for x in labels)), LABEL_PAD, dtype=torch.long)
                for i, x in enumerate(labels):
                    out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
                batch["labels"] = out
        return batch


# -- CTC decoding and error rates -----------------------------------------------------------------
def ctc_greedy_decode(predictions: np.ndarray | torch.Tensor, lengths: Sequence[int] | None = None,
                      blank: int = 0) -> list[list[int]]:
    """Best-path decoding: argmax per frame (if given logits), merge repeats, then drop blanks.

    ``predictions`` is (batch, frames, vocab) logits or (batch, frames) token ids. Frames past
    ``lengths`` and negative ids (Trainer pads with -100) are padding and ignored.
    """
    preds = predictions.detach().cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
    ids = preds.argmax(-1) if preds.ndim == 3 else preds
    decoded = []
    for i, row in enumerate(ids):
        if lengths is not None:
            row = row[: int(lengths[i])]
        row = row[row >= 0]
        if len(row):
            row = row[np.concatenate([[True], row[1:] != row[:-1]])]
        decoded.append([int(t) for t in row if t != blank])
    return decoded


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(hypotheses: Sequence[Sequence], references: Sequence[Sequence]) -> dict[str, float]:
    """``cer``: total edit distance / total reference length over the set (the corpus-level CER);
    ``digit_error_rate``: fraction of utterances not recognised exactly (string error rate)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    chars = sum(len(r) for r in references)
    wrong = sum(list(h) != list(r) for h, r in zip(hypotheses, references))
    return {"cer": float(edits) / max(chars, 1), "digit_error_rate": float(wrong) / max(len(references), 1)}


def ctc_argmax(logits: torch.Tensor | tuple, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Trainer's ``preprocess_logits_for_metrics`` for CTC: keep only the argmax ids per frame.

    With the model's ``output_lengths`` next to the logits, frames past each utterance's end are
    set to -100 so the metrics ignore them. Saves gathering (batch, frames, vocab) floats.
    """
    lengths = None
    if isinstance(logits, (tuple, list)):
        logits, lengths = logits[0], (logits[1] if len(logits) > 1 else None)
    ids = logits.argmax(-1)
    if lengths is not None:
        ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device)[None, :] >= lengths[:, None], LABEL_PAD)
    return ids


def ctc_metrics(eval_pred, blank: int = 0) -> dict[str, float]:
    """``compute_metrics`` for CTC models: greedy decoding, then :func:`error_rates`.

    Accepts raw predictions (logits, or the tuple (logits, output_lengths) a SpeechRNNForCTC
    returns) and the ids that :func:`ctc_argmax` leaves.
    """
    preds, lengths = eval_pred.predictions, None
    if isinstance(preds, (tuple, list)):
        preds, lengths = preds[0], (preds[1] if len(preds) > 1 else None)
    hyps = ctc_greedy_decode(preds, lengths, blank=blank)
    refs = [[int(t) for t in row if t >= 0] for row in np.asarray(eval_pred.label_ids)]
    return error_rates(hyps, refs)
