"""Recurrent (GRU/LSTM) speech models: utterance classification and CTC, as transformers models.

The shape Narang et al. pruned: an optional Conv1d front-end over time, then a stack of plain
``nn.GRU``/``nn.LSTM`` layers. The recurrent module is deliberately the stock torch module: the
sparsity engine selects its ``weight_ih_l*``/``weight_hh_l*`` (including ``*_reverse``) parameters
and writes them in place, and a pruned checkpoint loads with plain transformers once hf_sparse is
imported (config, models and feature extractor are registered with the Auto classes below).

Padding is handled exactly: ``attention_mask`` gives each utterance's length, the front-end zeroes
frames past it, the RNN runs on a packed sequence (so the reverse direction starts at the real end),
classification pools over valid frames only and CTC uses the true (downsampled) input lengths.
An utterance therefore gets the same outputs alone or in any padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForCTC,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

from ..data.feature_extraction import SpeechRNNFeatureExtractor
from ..data.speech_processor import SpeechRNNProcessor
from ..families import SPEECH_MODEL_TYPE
from .registry import register_model

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
POOLINGS = ("mean", "max")


class SpeechRNNConfig(PretrainedConfig):
    """Sizes of the speech RNN.

    ``num_mel_bins`` must equal the feature extractor's ``feature_size``. ``conv_channels`` lists
    the front-end's Conv1d layers (empty: none); each uses ``conv_kernel_size`` and ``conv_stride``,
    so the RNN sees ``conv_stride ** len(conv_channels)`` times fewer frames. For CTC,
    ``vocab_size`` counts the blank, which is ``pad_token_id`` (0).
    """

    model_type = SPEECH_MODEL_TYPE

    def __init__(self, num_mel_bins: int = 40, cell: str = "gru", hidden_size: int = 128, num_layers: int = 2,
                 bidirectional: bool = True, conv_channels: list[int] | None = None, conv_kernel_size: int = 5,
                 conv_stride: int = 2, dropout: float = 0.1, pooling: str = "mean", vocab_size: int = 11,
                 ctc_loss_reduction: str = "mean", ctc_zero_infinity: bool = True, pad_token_id: int = 0,
                 **kwargs):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if ctc_loss_reduction not in ("mean", "sum"):
            raise ValueError(f"ctc_loss_reduction must be 'mean' or 'sum', got {ctc_loss_reduction!r}")
        self.num_mel_bins = num_mel_bins
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.conv_channels = list(conv_channels or [])
        self.conv_kernel_size = conv_kernel_size
        self.conv_stride = conv_stride
        self.dropout = dropout
        self.pooling = pooling
        self.vocab_size = vocab_size
        self.ctc_loss_reduction = ctc_loss_reduction
        self.ctc_zero_infinity = ctc_zero_infinity
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def output_size(self) -> int:
        """Width of the RNN output per frame (both directions concatenated)."""
        return self.hidden_size * (2 if self.bidirectional else 1)


@dataclass
class SpeechRNNModelOutput(ModelOutput):
    """Per-frame RNN states and, per utterance, how many of those frames are real."""

    last_hidden_state: torch.Tensor | None = None
    output_lengths: torch.Tensor | None = None


@dataclass
class SpeechRNNCTCOutput(ModelOutput):
    """CTC output. ``output_lengths`` says how many frames of ``logits`` are real per utterance,
    so decoding (and Trainer's metrics, which receive it next to the logits) ignores padding."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    output_lengths: torch.Tensor | None = None


class SpeechRNNFrontEnd(nn.Module):
    """Conv1d layers over time (ReLU after each); frames past each utterance's length are zeroed."""

    def __init__(self, config: SpeechRNNConfig):
        super().__init__()
        k, s = config.conv_kernel_size, config.conv_stride
        widths = [config.num_mel_bins, *config.conv_channels]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, k, stride=s, padding=k // 2) for a, b in zip(widths, widths[1:]))

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames left after the front-end, for inputs of ``lengths`` frames."""
        for conv in self.convs:
            lengths = _conv_length(conv, lengths)
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.convs):
            return x, lengths
        x = x.transpose(1, 2)  # (batch, features, frames)
        for conv in self.convs:
            lengths = _conv_length(conv, lengths)
            x = F.relu(conv(x))
            x = x * _valid(lengths, x.shape[-1])[:, None, :].to(x.dtype)
        return x.transpose(1, 2), lengths


def _conv_length(conv: nn.Conv1d, lengths: torch.Tensor) -> torch.Tensor:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1


def _valid(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, frames) bool: which frames are inside each utterance."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class SpeechRNNPreTrainedModel(PreTrainedModel):
    config_class = SpeechRNNConfig
    base_model_prefix = "speech_rnn"
    main_input_name = "input_features"
    # The loss is a per-batch mean: Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """torch's own defaults, written out so missing weights are initialised the same way on load."""
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                bound = module.weight[0].numel() ** -0.5
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.RNNBase):
            bound = module.hidden_size**-0.5
            for p in module.parameters(recurse=False):
                init.uniform_(p, -bound, bound)


class SpeechRNNModel(SpeechRNNPreTrainedModel):
    """Front-end + recurrent stack; returns per-frame states and the valid length of each utterance."""

    def __init__(self, config: SpeechRNNConfig):
        super().__init__(config)
        self.frontend = SpeechRNNFrontEnd(config)
        rnn_input = config.conv_channels[-1] if config.conv_channels else config.num_mel_bins
        self.rnn = CELLS[config.cell](
            rnn_input, config.hidden_size, num_layers=config.num_layers, batch_first=True,
            bidirectional=config.bidirectional, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.post_init()

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> SpeechRNNModelOutput:
        batch, frames, _ = input_features.shape
        if attention_mask is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=input_features.device)
        else:
            lengths = attention_mask.long().sum(-1)
            input_features = input_features * attention_mask[..., None].to(input_features.dtype)
        x, lengths = self.frontend(input_features, lengths)
        if x.is_cuda:  # cuDNN wants one contiguous weight buffer; a no-op when it already is one
            self.rnn.flatten_parameters()
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return SpeechRNNModelOutput(last_hidden_state=out, output_lengths=lengths)


class SpeechRNNForSequenceClassification(SpeechRNNPreTrainedModel):
    """Utterance label from the mean (or max) of the RNN states over the utterance's valid frames."""

    def __init__(self, config: SpeechRNNConfig):
        super().__init__(config)
        self.speech_rnn = SpeechRNNModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.output_size, config.num_labels)
        self.post_init()

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        enc = self.speech_rnn(input_features, attention_mask)
        h, lengths = enc.last_hidden_state, enc.output_lengths
        valid = _valid(lengths, h.shape[1])[..., None]
        if self.config.pooling == "mean":
            pooled = (h * valid).sum(1) / lengths.clamp(min=1)[:, None].to(h.dtype)
        else:
            pooled = h.masked_fill(~valid, float("-inf")).amax(1)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class SpeechRNNForCTC(SpeechRNNPreTrainedModel):
    """Per-frame token logits trained with CTC; token 0 (``pad_token_id``) is the blank.

    ``labels`` are token ids padded with -100 (any negative value is padding).
    """

    def __init__(self, config: SpeechRNNConfig):
        super().__init__(config)
        self.speech_rnn = SpeechRNNModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.output_size, config.vocab_size)
        self.post_init()

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SpeechRNNCTCOutput:
        enc = self.speech_rnn(input_features, attention_mask)
        lengths = enc.output_lengths
        logits = self.lm_head(self.dropout(enc.last_hidden_state))
        loss = None
        if labels is not None:
            if labels.max() >= self.config.vocab_size:
                raise ValueError(f"label ids must be below vocab_size={self.config.vocab_size}")
            keep = labels >= 0
            log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN's CTC has extra input constraints
                loss = F.ctc_loss(log_probs, labels[keep], lengths, keep.sum(-1), blank=self.config.pad_token_id,
                                  reduction=self.config.ctc_loss_reduction,
                                  zero_infinity=self.config.ctc_zero_infinity)
        return SpeechRNNCTCOutput(loss=loss, logits=logits, output_lengths=lengths)


AutoConfig.register(SpeechRNNConfig.model_type, SpeechRNNConfig)
AutoModel.register(SpeechRNNConfig, SpeechRNNModel)
AutoModelForAudioClassification.register(SpeechRNNConfig, SpeechRNNForSequenceClassification)
AutoModelForCTC.register(SpeechRNNConfig, SpeechRNNForCTC)
AutoFeatureExtractor.register(SpeechRNNConfig, SpeechRNNFeatureExtractor)
AutoProcessor.register(SpeechRNNConfig, SpeechRNNProcessor)



@register_model("speech_rnn")
def speech_rnn(config: dict, data) -> SpeechRNNPreTrainedModel:
    """Classifier for ``audio-classification`` data, CTC model for ``ctc`` data; sizes from ``config``.

    Input width comes from the data's feature extractor; labels (or the CTC vocabulary, blank
    first) from the data bundle.
    """
    config = dict(config)
    fe = data.info.get("feature_extractor") if data is not None else None
    if fe is not None:
        config.setdefault("num_mel_bins", fe.feature_size)
    task = data.task if data is not None else "audio-classification"
    names = list(data.label_names) if data is not None else []
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
    if task == "ctc":
        cfg = SpeechRNNConfig(vocab_size=data.num_labels, **labels, **config)
        return SpeechRNNForCTC(cfg)
    if task != "audio-classification":
        raise ValueError(f"speech_rnn handles audio-classification and ctc data, not {task!r}")
    cfg = SpeechRNNConfig(**labels, **config) if names else SpeechRNNConfig(
        num_labels=data.num_labels if data is not None else 10, **config)
    return SpeechRNNForSequenceClassification(cfg)
