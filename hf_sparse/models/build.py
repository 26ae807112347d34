"""Build the model a recipe names, sized for its data."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..data import DataBundle
from . import MODEL_REGISTRY

_DEFAULT_AUTO_CLASS = {
    "image-classification": "AutoModelForImageClassification",
    "audio-classification": "AutoModelForAudioClassification",
    "ctc": "AutoModelForCTC",
}


class TimmClassifier(nn.Module):
    """Lets a timm model train under ``transformers.Trainer``.

    timm models take a positional tensor and return bare logits; Trainer passes keyword inputs
    and wants a loss. The timm model itself is ``.model`` (exported on its own, loadable by timm).
    """

    accepts_loss_kwargs = False  # a mean loss: Trainer must scale it for gradient accumulation

    def __init__(self, model: nn.Module, timm_name: str):
        super().__init__()
        self.model = model
        self.timm_name = timm_name

    def forward(self, pixel_values, labels=None, **kwargs) -> ImageClassifierOutput:
        logits = self.model(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_model(cfg, data: DataBundle) -> nn.Module:
    """``cfg`` is a ``recipe.ModelConfig``. Raises ValueError with a plain message on bad names."""
    if cfg.source == "hf_sparse":
        if cfg.name not in MODEL_REGISTRY:
            raise ValueError(f"unknown hf_sparse model {cfg.name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
        return MODEL_REGISTRY[cfg.name](dict(cfg.config), data)
    if cfg.source == "timm":
        import timm

        if not timm.is_model(cfg.name):
            raise ValueError(f"unknown timm model {cfg.name!r}")
        kwargs = {"num_classes": data.num_labels, "in_chans": data.info.get("num_channels", 3), **cfg.kwargs}
        return TimmClassifier(timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs), cfg.name)
    import transformers

    auto = getattr(transformers, cfg.auto_class or _DEFAULT_AUTO_CLASS[data.task], None)
    if auto is None:
        raise ValueError(f"transformers has no class {cfg.auto_class!r}")
    labels = {"num_labels": data.num_labels}
    if data.label_names:
        labels["id2label"] = dict(enumerate(data.label_names))
        labels["label2id"] = {n: i for i, n in enumerate(data.label_names)}
    if cfg.path:
        return auto.from_pretrained(cfg.path, **labels, **cfg.config)
    config_kwargs = dict(cfg.config)
    model_type = config_kwargs.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_kwargs, **labels)
    if data.task == "image-classification" and "num_channels" in config.to_dict():
        config.num_channels = data.info.get("num_channels", config.num_channels)
    return auto.from_config(config)
