"""Log-mel features for the recurrent speech models, as a transformers feature extractor.

torchaudio is not usable here, so the spectrogram is ``torch.stft`` and the mel filters come from
``transformers.audio_utils.mel_filter_bank``. Being a ``SequenceFeatureExtractor`` it saves and loads
with ``save_pretrained``/``AutoFeatureExtractor.from_pretrained``, next to the model it was trained with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.audio_utils import mel_filter_bank

NORMALIZATIONS = ("utterance", "global", "none")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: per-utterance STFTs are tiny, and on a busy CPU the intra-op
    thread pool's hand-offs cost ~10x the work itself."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


class SpeechRNNFeatureExtractor(SequenceFeatureExtractor):
    """Waveforms -> ``input_features`` (batch, frames, n_mels) of log-mel energies + ``attention_mask``.

    Frames are ``1 + len(audio) // hop_length`` (centred, zero-padded windows), so every frame
    of a padded batch belongs to exactly one utterance and the mask is exact.

    ``normalize``: ``"utterance"`` subtracts each utterance's mean and divides by its standard
    deviation per mel bin (cepstral mean/variance normalisation; robust to recording level);
    ``"global"`` uses the ``mean``/``std`` vectors fitted on training data with
    :meth:`fit_global_stats` (they are saved with the extractor); ``"none"`` keeps raw log-mels.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(self, feature_size: int = 40, sampling_rate: int = 8000, padding_value: float = 0.0,
                 n_fft: int = 256, win_length: int = 200, hop_length: int = 80, f_min: float = 20.0,
                 f_max: float | None = None, normalize: str = "utterance", mean: list[float] | None = None,
                 std: list[float] | None = None, log_floor: float = 1e-6, return_attention_mask: bool = True,
                 **kwargs):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) must not exceed n_fft ({n_fft})")
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         return_attention_mask=return_attention_mask, **kwargs)
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.f_min = f_min
        self.f_max = f_max if f_max is not None else sampling_rate / 2
        self.normalize = normalize
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.log_floor = log_floor
        # ``mel_filters`` and ``window`` are derived, and FeatureExtractionMixin.to_dict leaves them out.
        self.mel_filters = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1, num_mel_filters=feature_size, min_frequency=f_min,
            max_frequency=self.f_max, sampling_rate=sampling_rate, norm="slaney", mel_scale="slaney",
        )).float()
        self.window = torch.hann_window(win_length)

    # -- features ----------------------------------------------------------------------------
    def log_mel(self, waveform: np.ndarray | torch.Tensor) -> np.ndarray:
        """Un-normalised log-mel energies of one mono waveform, shape (frames, n_mels), float32."""
        x = torch.tensor(np.asarray(waveform, dtype=np.float32)).flatten()
        spec = torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window, center=True, pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (freq, frames)
        mel = power.T @ self.mel_filters  # (frames, n_mels)
        return torch.log(mel + self.log_floor).numpy()

    def _normalise(self, feats: np.ndarray) -> np.ndarray:
        if self.normalize == "utterance":
            return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
        if self.normalize == "global":
            if self.mean is None or self.std is None:
                raise ValueError("normalize='global' needs mean/std: call fit_global_stats on training audio first")
            return (feats - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return feats

    def fit_global_stats(self, waveforms: Sequence[np.ndarray]) -> SpeechRNNFeatureExtractor:
        """Set ``mean``/``std`` per mel bin over all frames of ``waveforms`` (use the training split)."""
        total = np.zeros(self.feature_size, np.float64)
        total_sq = np.zeros(self.feature_size, np.float64)
        count = 0
        for w in waveforms:
            with _one_thread():
                f = self.log_mel(w).astype(np.float64)
            total += f.sum(0)
            total_sq += np.square(f).sum(0)
            count += len(f)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 1e-10))
        self.mean, self.std = mean.tolist(), std.tolist()
        return self

    def __call__(self, raw_speech: np.ndarray | list | torch.Tensor, sampling_rate: int | None = None,
                 padding: bool | str = "longest", max_length: int | None = None, truncation: bool = False,
                 pad_to_multiple_of: int | None = None, return_attention_mask: bool | None = None,
                 return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Featurise one waveform or a batch of them (a list of 1-D arrays, or a 2-D array).

        ``max_length``/``truncation``/``pad_to_multiple_of`` count frames, as in ``pad``.
        ``padding=False`` returns one (frames, n_mels) array per utterance (for ``datasets.map``).
        """
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"this feature extractor expects audio at {self.sampling_rate} Hz, got {sampling_rate} Hz; "
                             "resample it first")
        if isinstance(raw_speech, torch.Tensor):
            raw_speech = raw_speech.detach().cpu().numpy()
        batched = (isinstance(raw_speech, np.ndarray) and raw_speech.ndim > 1) or (
            isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0
            and isinstance(raw_speech[0], (np.ndarray, list, tuple, torch.Tensor)))
        waves = list(raw_speech) if batched else [raw_speech]
        with _one_thread():
            feats = [self._normalise(self.log_mel(w)).astype(np.float32) for w in waves]
        encoded = BatchFeature({"input_features": feats})
        return self.pad(encoded, padding=padding, max_length=max_length, truncation=truncation,
                        pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=return_attention_mask,
                        return_tensors=return_tensors)
