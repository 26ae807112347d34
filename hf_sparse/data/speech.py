"""Pieces every speech data source shares: audio datasets, featurising, batching, augmentation, CTC metrics.

Two ways to featurise. FSDD (small, in memory) computes features once per split with the model's
feature extractor (``datasets.map``, ~0.2 ms per utterance) and stores them as ``input_features``.
Audio folders and Hub audio datasets (any size: LibriSpeech-100 is 6 GB of audio) keep only a
reference to each file (a path or the encoded bytes) in the ``input_features`` column and
:class:`AudioTransform` decodes, resamples and featurises each example when a batch reads it
(``Dataset.with_transform``). Either way the column is named ``input_features``, so the splits
survive Trainer's ``remove_unused_columns`` (which would drop a column named ``audio``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from transformers import TrainerCallback

from .feature_extraction import SpeechRNNFeatureExtractor

logger = logging.getLogger(__name__)

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


# -- featurising when read, and training-only augmentation ----------------------------------------
def _draw(rng: np.random.Generator, high: int) -> int:
    """A uniform integer in [0, high]."""
    return int(rng.integers(0, high + 1)) if high > 0 else 0


def spec_augment(features: np.ndarray, rng: np.random.Generator, time_masks: int = 0, time_mask_width: int = 0,
                 freq_masks: int = 0, freq_mask_width: int = 0) -> np.ndarray:
    """SpecAugment's masking (Park et al. 2019) on one (frames, n_mels) array: each mask sets a band
    of up to ``*_width`` frames / mel bins (width drawn uniformly, position uniformly) to 0, the
    mean of normalised features. Time warping is not applied."""
    out = np.array(features, dtype=np.float32, copy=True)
    frames, bins = out.shape
    for _ in range(time_masks):
        width = min(_draw(rng, time_mask_width), frames)
        start = _draw(rng, frames - width)
        out[start:start + width] = 0.0
    for _ in range(freq_masks):
        width = min(_draw(rng, freq_mask_width), bins)
        start = _draw(rng, bins - width)
        out[:, start:start + width] = 0.0
    return out


def perturb_waveform(audio: np.ndarray, sampling_rate: int, rng: np.random.Generator,
                     speed: Sequence[float] | None = None, noise_snr_db: Sequence[float] | None = None) -> np.ndarray:
    """Speed perturbation (one factor drawn from ``speed``; 1.1 plays 10% faster, as Kaldi's
    resampling does: pitch and tempo both change) and white noise at an SNR drawn uniformly from
    ``noise_snr_db`` = [low, high] dB."""
    from .audio_io import resample

    if speed:
        factor = float(speed[_draw(rng, len(speed) - 1)])
        if factor != 1.0:
            audio = resample(audio, sampling_rate * factor, sampling_rate)
    if noise_snr_db:
        low, high = float(noise_snr_db[0]), float(noise_snr_db[-1])
        snr = rng.uniform(low, high)
        power = float(np.mean(np.square(audio, dtype=np.float64))) if len(audio) else 0.0
        if power > 0:
            audio = (audio + rng.standard_normal(len(audio)) * np.sqrt(power / 10 ** (snr / 10))).astype(np.float32)
    return audio


def augment_settings(augment: Any) -> dict[str, Any] | None:
    """The recipe's ``data.augment`` (an AugmentConfig, a dict or None) as keyword arguments, or
    None when it changes nothing (the default: augmentation off)."""
    if augment is None:
        return None
    settings = augment.model_dump() if hasattr(augment, "model_dump") else dict(augment)
    masks = (settings.get("time_masks", 0) and settings.get("time_mask_width", 0)) or \
            (settings.get("freq_masks", 0) and settings.get("freq_mask_width", 0))
    speed = [f for f in (settings.get("speed") or []) if f != 1.0]
    if not (masks or speed or settings.get("noise_snr_db")):
        return None
    return settings


def needs_waveform(settings: dict[str, Any] | None) -> bool:
    """Whether the augmentation acts on the waveform (speed, noise) rather than only on features."""
    return bool(settings and (settings.get("speed") or settings.get("noise_snr_db")))


def _identity(value: Any) -> bytes:
    """What tells one clip from another: its path, else its encoded bytes, else its samples."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes") or b""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes()
    if isinstance(value, (list, tuple)):
        return np.asarray(value, np.float32).tobytes()
    return value if isinstance(value, (bytes, bytearray)) else str(value).encode()


class _Augmenter:
    """Per-clip random draws that depend only on (``seed``, ``epoch``, the clip): the same clip gets
    the same augmentation in the same epoch of any run, whatever the batch order, the number of
    DataLoader workers or a resume in between. :class:`AugmentEpochCallback` advances ``epoch``."""

    def __init__(self, augment: dict[str, Any] | None, seed: int = 0):
        self.augment, self.seed, self.epoch = augment, int(seed), 0

    def rng(self, value: Any) -> np.random.Generator:
        key = int.from_bytes(hashlib.blake2b(_identity(value), digest_size=8).digest(), "little")
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, key])

    def masks(self, features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.augment
        return spec_augment(features, rng, a.get("time_masks", 0), a.get("time_mask_width", 0),
                            a.get("freq_masks", 0), a.get("freq_mask_width", 0))


class AudioTransform(_Augmenter):
    """``Dataset.with_transform`` function: ``input_features`` holds audio (a path, encoded bytes as
    ``Audio(decode=False)`` gives them, or samples already at the extractor's rate) and comes out as
    log-mel features; with ``augment`` (the training split only) the waveform is perturbed and the
    features masked. A class rather than a closure so DataLoader workers can pickle it.

    A clip of silence (no sample above -80 dBFS) is featurised as it is (finite, constant features:
    Speech Commands' ``_silence_`` class is exactly that) and named once in the log.
    """

    def __init__(self, feature_extractor: SpeechRNNFeatureExtractor, augment: dict[str, Any] | None = None,
                 seed: int = 0):
        super().__init__(augment, seed)
        self.feature_extractor = feature_extractor
        self._silent_named = 0

    def waveform(self, value: Any) -> np.ndarray:
        from .audio_io import audio_source, is_silent, load_audio

        audio = load_audio(value, self.feature_extractor.sampling_rate)
        if self._silent_named < 5 and is_silent(audio):
            self._silent_named += 1
            name = audio_source(value)[1] if not isinstance(value, (np.ndarray, list)) else "an utterance"
            logger.warning("%s is silence (no sample above -80 dBFS); its features are constant", name)
        return audio

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        values = batch["input_features"]
        waves = [self.waveform(v) for v in values]
        aug = self.augment
        rngs = [self.rng(v) for v in values] if aug else []
        if needs_waveform(aug):
            rate = self.feature_extractor.sampling_rate
            waves = [perturb_waveform(w, rate, r, aug.get("speed"), aug.get("noise_snr_db"))
                     for w, r in zip(waves, rngs)]
        feats = [np.asarray(f, np.float32) for f in self.feature_extractor(waves, padding=False)["input_features"]]
        if aug:
            feats = [self.masks(f, r) for f, r in zip(feats, rngs)]
        out: dict[str, list] = {"input_features": feats}
        if "labels" in batch:
            out["labels"] = batch["labels"]
        return out


class FeatureAugment(_Augmenter):
    """``Dataset.with_transform`` function for splits featurised up front (FSDD): SpecAugment masks
    on the stored ``input_features`` of the training split."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = dict(batch)
        feats = [np.asarray(f, np.float32) for f in batch["input_features"]]
        out["input_features"] = [self.masks(f, self.rng(f)) for f in feats]
        return out


class AugmentEpochCallback(TrainerCallback):
    """Tells the training split's augmentation which epoch begins (a resumed run included: Trainer
    restores ``state.epoch`` from the checkpoint), so each epoch draws afresh."""

    def __init__(self, augmenter: _Augmenter):
        self.augmenter = augmenter

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.augmenter.epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0


def install_augmentation(bundle, augmenter: _Augmenter) -> None:
    """Record the callback a run's trainer adds (``DataBundle.info["callbacks"]``)."""
    bundle.info["callbacks"] = [*bundle.info.get("callbacks", []), AugmentEpochCallback(augmenter)]


# -- text transcripts: character error rate and word error rate -------------------------------------
def text_error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level ``cer`` (character edit distance over reference characters, spaces included)
    and ``wer`` (word edit distance over reference words)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    char_edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    word_edits = sum(edit_distance(h.split(), r.split()) for h, r in zip(hypotheses, references))
    chars = sum(len(r) for r in references)
    words = sum(len(r.split()) for r in references)
    return {"cer": float(char_edits) / max(chars, 1), "wer": float(word_edits) / max(words, 1)}


class TextCTCMetrics:
    """``compute_metrics`` for CTC over a character vocabulary (``vocab[i]`` is token i; 0 the blank,
    ``delimiter`` the word boundary): greedy decoding, ids to text, then :func:`text_error_rates`.
    A reference character the vocabulary lacks (``<unk>``) can never be produced, so it counts as
    an error."""

    def __init__(self, vocab: Sequence[str], delimiter: str = "|", unk: str = "<unk>", blank: int = 0):
        self.vocab, self.delimiter, self.unk, self.blank = list(vocab), delimiter, unk, blank

    def text(self, ids: Sequence[int]) -> str:
        chars = [" " if self.vocab[i] == self.delimiter else "\ufffd" if self.vocab[i] == self.unk else self.vocab[i]
                 for i in ids if 0 <= i < len(self.vocab)]
        return " ".join("".join(chars).split())

    def __call__(self, eval_pred) -> dict[str, float]:
        preds, lengths = eval_pred.predictions, None
        if isinstance(preds, (tuple, list)):
            preds, lengths = preds[0], (preds[1] if len(preds) > 1 else None)
        hyps = [self.text(h) for h in ctc_greedy_decode(preds, lengths, blank=self.blank)]
        refs = [self.text([int(t) for t in row if t >= 0]) for row in np.asarray(eval_pred.label_ids)]
        return text_error_rates(hyps, refs)


def apply_augmentation(bundle, cfg):
    """Install ``data.augment`` on the training split of a bundle whose features were computed up
    front (FSDD); sources that featurise when read (audio folders, Hub audio) install it themselves.
    Off (the bundle unchanged) unless the recipe asks for it."""
    from . import DataError

    settings = augment_settings(getattr(cfg, "augment", None))
    if settings is None or bundle.info.get("lazy_audio"):
        return bundle
    if "feature_extractor" not in bundle.info:
        raise DataError(f"data.augment applies to speech data, not to {bundle.task} data", key="augment")
    if needs_waveform(settings):
        raise DataError(f"speed and noise perturbation act on the waveform, but data.name {cfg.name!r} stores "
                        "features; use SpecAugment masks only, or lay the recordings out as an audio_folder",
                        key="augment")
    augmenter = FeatureAugment(settings, cfg.seed)
    bundle.train = bundle.train.with_transform(augmenter)
    install_augmentation(bundle, augmenter)
    return bundle
