"""Streaming speech: feed audio chunks of any size to a unidirectional GRU/LSTM speech model.

``hf_sparse.stream(model_or_path)`` returns a :class:`SpeechStream`. Each :meth:`SpeechStream.feed`
takes the next samples and returns the frames they completed: per-frame logits (CTC), the running
greedy CTC text, or the running class posterior (classifiers). :meth:`SpeechStream.finish` ends the
utterance. Every stage carries its context over chunk boundaries, so the result equals the
offline forward on the whole utterance (to float32 rounding):

- the log-mel front-end keeps the samples a window still needs (``n_fft`` minus a hop) and, as the
  offline ``torch.stft(center=True)`` does, treats the utterance as zero-padded by ``n_fft // 2``
  on both sides (the right padding is applied by :meth:`~SpeechStream.finish`);
- each Conv1d keeps the frames its next output still needs (its kernel minus its stride), with the
  same zero padding at both ends;
- the GRU/LSTM state carries over (dense ``nn.GRU``/``nn.LSTM`` or the sparse runtime's layers).

Refused, with the reason: bidirectional models (the reverse direction reads the future) and
feature extractors with ``normalize="utterance"`` (whole-utterance statistics, unknown until the
end): train streaming models with ``normalize: global`` (or ``none``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..families import SPEECH_MODEL_TYPE


class StreamingError(ValueError):
    """The model or its feature extractor cannot stream; the message says why and what to do."""


@dataclass
class StreamUpdate:
    """What one :meth:`SpeechStream.feed` (or :meth:`~SpeechStream.finish`) produced.

    ``frame_logits``: (new frames, vocab) logits of the frames completed by this chunk (CTC models);
    ``text``: the greedy CTC transcript so far; ``logits``/``posterior``/``label``: the utterance
    classifier's output on everything heard so far (classifiers, once a frame exists).
    """

    frames: int = 0
    frame_logits: np.ndarray | None = None
    text: str | None = None
    logits: np.ndarray | None = None
    posterior: np.ndarray | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _StreamingConv:
    """One ``Conv1d`` (+ ReLU) of the front-end over a stream of frames, with the offline padding."""

    def __init__(self, conv: nn.Conv1d):
        self.conv = conv
        self.k, self.s, self.p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.reset()

    def reset(self) -> None:
        self.buffer = torch.zeros(self.conv.in_channels, self.p)  # left zero padding
        self.start = 0  # padded index of buffer[:, 0]
        self.done = 0  # outputs produced
        self.seen = 0  # input frames received

    def _emit(self, last: int) -> torch.Tensor:
        """Outputs ``done .. last-1`` from the buffer, then drop what no later output needs."""
        if last <= self.done:
            return torch.zeros(0, self.conv.out_channels)
        lo = self.done * self.s - self.start
        hi = (last - 1) * self.s + self.k - self.start
        out = F.relu(F.conv1d(self.buffer[None, :, lo:hi], self.conv.weight, self.conv.bias, stride=self.s))[0]
        self.done = last
        keep = self.done * self.s - self.start
        self.buffer, self.start = self.buffer[:, keep:], self.start + keep
        return out.T  # (frames, channels)

    def feed(self, frames: torch.Tensor) -> torch.Tensor:
        self.seen += frames.shape[0]
        self.buffer = torch.cat([self.buffer, frames.T], 1)
        end = self.start + self.buffer.shape[1]  # padded frames available
        return self._emit(max((end - self.k) // self.s + 1, 0))

    def finish(self) -> torch.Tensor:
        self.buffer = torch.cat([self.buffer, torch.zeros(self.conv.in_channels, self.p)], 1)
        return self._emit((self.seen + 2 * self.p - self.k) // self.s + 1)


class SpeechStream:
    """A unidirectional speech RNN and its feature extractor, fed chunk by chunk (see the module doc)."""

    def __init__(self, model: nn.Module, feature_extractor: Any):
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != SPEECH_MODEL_TYPE or not hasattr(model, "speech_rnn"):
            raise StreamingError(f"streaming needs one of hf_sparse's speech RNN models (speech_rnn), not "
                                 f"{type(model).__name__}")
        if config.bidirectional:
            raise StreamingError("this model is bidirectional: its reverse direction reads the utterance from the "
                                 "end, so it cannot stream; train a unidirectional one "
                                 "(model.config.bidirectional: false)")
        if feature_extractor is None:
            raise StreamingError("streaming needs the model's feature extractor: pass feature_extractor=")
        if feature_extractor.normalize == "utterance":
            raise StreamingError("the feature extractor normalises with whole-utterance statistics "
                                 "(normalize='utterance'), which a stream cannot know until the end; train with "
                                 "data.options normalize: global (statistics fitted on the training audio) or none")
        self.model = model.eval()
        self.fe = feature_extractor
        self.ctc = hasattr(model, "lm_head")
        self.blank = int(config.pad_token_id or 0)
        self.labels = {int(k): v for k, v in (config.id2label or {}).items()}
        self.convs = [_StreamingConv(c) for c in model.speech_rnn.frontend.convs]
        self.rnn = model.speech_rnn.rnn
        self.window = feature_extractor.window
        self.mel = feature_extractor.mel_filters
        self.reset()

    @property
    def sampling_rate(self) -> int:
        return int(self.fe.sampling_rate)

    def reset(self) -> None:
        """Start a new utterance."""
        self.audio = np.zeros(self.fe.n_fft // 2, np.float32)  # the left centre padding
        self.audio_start = 0  # padded sample index of audio[0]
        self.frames_done = 0
        self.samples = 0
        self.state = None
        for conv in self.convs:
            conv.reset()
        self.ids: list[int] = []
        self.last_id = self.blank
        self.pool_sum: torch.Tensor | None = None
        self.pool_max: torch.Tensor | None = None
        self.rnn_frames = 0
        self.finished = False

    # -- stages ------------------------------------------------------------------------------------
    def _log_mel(self, last: int) -> torch.Tensor:
        """Normalised log-mel frames ``frames_done .. last-1`` (what the offline extractor computes)."""
        n_fft, hop = self.fe.n_fft, self.fe.hop_length
        if last <= self.frames_done:
            return torch.zeros(0, self.fe.feature_size)
        lo = self.frames_done * hop - self.audio_start
        hi = (last - 1) * hop + n_fft - self.audio_start
        seg = torch.from_numpy(self.audio[lo:hi])
        spec = torch.stft(seg, n_fft=n_fft, hop_length=hop, win_length=self.fe.win_length, window=self.window,
                          center=False, return_complex=True)
        mel = (spec.real.square() + spec.imag.square()).T @ self.mel
        feats = self.fe._normalise(torch.log(mel + self.fe.log_floor).numpy()).astype(np.float32)
        self.frames_done = last
        keep = last * hop - self.audio_start
        self.audio, self.audio_start = self.audio[keep:], self.audio_start + keep
        return torch.from_numpy(feats)

    def _frontend(self, frames: torch.Tensor, final: bool) -> torch.Tensor:
        x = frames
        for conv in self.convs:
            x = conv.feed(x) if x.shape[0] else torch.zeros(0, conv.conv.out_channels)
            if final:
                x = torch.cat([x, conv.finish()])
        return x

    def _step(self, frames: torch.Tensor, final: bool) -> StreamUpdate:
        with torch.no_grad():
            x = self._frontend(frames, final)
            update = StreamUpdate(frames=int(x.shape[0]))
            if x.shape[0]:
                out, self.state = self.rnn(x[None], self.state)
                out = out[0]
                self.rnn_frames += out.shape[0]
                if self.ctc:
                    logits = self.model.lm_head(out)
                    update.frame_logits = logits.numpy()
                    for i in logits.argmax(-1).tolist():
                        if i != self.last_id and i != self.blank:
                            self.ids.append(i)
                        self.last_id = i
                else:
                    total = out.sum(0)
                    self.pool_sum = total if self.pool_sum is None else self.pool_sum + total
                    peak = out.amax(0)
                    self.pool_max = peak if self.pool_max is None else torch.maximum(self.pool_max, peak)
            if self.ctc:
                update.text = self.text
            elif self.rnn_frames:
                pooled = self.pool_sum / self.rnn_frames if self.model.config.pooling == "mean" else self.pool_max
                logits = self.model.classifier(pooled[None])[0]
                update.logits = logits.numpy()
                update.posterior = torch.softmax(logits, -1).numpy()
                update.label = self.labels.get(int(logits.argmax()), str(int(logits.argmax())))
        return update

    @property
    def text(self) -> str:
        """The greedy CTC transcript so far (labels joined; single characters without spaces)."""
        pieces = [self.labels.get(i, str(i)) for i in self.ids]
        return ("" if all(len(p) == 1 for p in pieces) else " ").join(pieces)

    # -- public ------------------------------------------------------------------------------------
    def feed(self, audio: np.ndarray | torch.Tensor) -> StreamUpdate:
        """Take the next mono samples (at the extractor's rate); return what they completed."""
        if self.finished:
            raise StreamingError("this utterance is finished; call reset() to start another")
        chunk = np.asarray(audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else audio,
                           np.float32).reshape(-1)
        self.samples += chunk.size
        self.audio = np.concatenate([self.audio, chunk])
        end = self.audio_start + self.audio.size
        return self._step(self._log_mel(max((end - self.fe.n_fft) // self.fe.hop_length + 1, 0)), final=False)

    def finish(self) -> StreamUpdate:
        """End the utterance: the frames that needed the right padding, and the final result."""
        if self.finished:
            raise StreamingError("this utterance is finished already; call reset() to start another")
        self.audio = np.concatenate([self.audio, np.zeros(self.fe.n_fft // 2, np.float32)])
        update = self._step(self._log_mel(1 + self.samples // self.fe.hop_length), final=True)
        self.finished = True
        return update


def stream(model: nn.Module, feature_extractor: Any, *, runtime: str = "dense") -> SpeechStream:
    """A :class:`SpeechStream` for a speech model in memory (``runtime="sparse"``: on the sparse kernels).
    ``hf_sparse.stream`` also takes a checkpoint folder or Hub id
    (:func:`hf_sparse.checkpoint.streaming.stream`)."""
    if runtime == "sparse":
        from .convert import to_sparse_runtime

        model = to_sparse_runtime(model)
    return SpeechStream(model, feature_extractor)


__all__ = ["SpeechStream", "StreamUpdate", "StreamingError", "stream"]
