"""Build the model a recipe names, sized for its data, and check that it runs on that data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..config.recipe import first_line
from . import MODEL_REGISTRY

if TYPE_CHECKING:
    from ..data import DataBundle

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


def timm_channel_stats(model: nn.Module, in_chans: int) -> dict[str, tuple[float, ...]]:
    """The pretrained config's mean/std refitted to ``in_chans`` channels (their average, repeated).

    timm keeps ImageNet's three values for a 1-channel model and warns each time it resolves
    them (on every export); refitting once says the same thing quietly.
    """
    out = {}
    for key in ("mean", "std"):
        value = model.pretrained_cfg.get(key)
        if isinstance(value, (list, tuple)) and len(value) not in (1, in_chans):
            out[key] = (sum(value) / len(value),) * in_chans
    return out


def _build_timm(cfg, data: DataBundle) -> nn.Module:
    import timm

    from ..data.resize import adopt_timm_preprocessing

    if not timm.is_model(cfg.name):
        raise ValueError(f"unknown timm model {cfg.name!r}")
    in_chans = data.info.get("num_channels", 3)
    kwargs = {"num_classes": data.num_labels, "in_chans": in_chans, **cfg.kwargs}
    model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, **timm_channel_stats(model, kwargs["in_chans"])}
    adopt_timm_preprocessing(data, model, cfg.pretrained)
    return TimmClassifier(model, cfg.name)


def build_model(cfg, data: DataBundle) -> nn.Module:
    """``cfg`` is a ``recipe.ModelConfig``. Raises ValueError with a plain message on bad names."""
    if cfg.source == "hf_sparse":
        if cfg.name not in MODEL_REGISTRY:
            raise ValueError(f"unknown hf_sparse model {cfg.name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
        return MODEL_REGISTRY[cfg.name](dict(cfg.config), data)
    if cfg.source == "timm":
        return _build_timm(cfg, data)
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
    if data.task == "image-classification":
        for key in ("num_channels", "image_size"):
            if key in config.to_dict() and key in data.info and key not in config_kwargs:
                setattr(config, key, data.info[key])
    return auto.from_config(config)


def forward_problem(model: nn.Module, data: DataBundle) -> str | None:
    """Run ``model`` once on two evaluation examples; a sentence on why it fails, or None.

    Catches what only shows at the first training step, such as images smaller than the
    network's downsampling (``Kernel size can't be greater than actual input size``). Eval mode
    and no gradients: no dropout draws, no BatchNorm statistics change, so training is unaffected.
    """
    rows = [data.eval[i] for i in range(min(2, len(data.eval)))]
    if not rows:
        return None
    batch = data.collator(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**batch)
    # TypeError: inputs the model does not take; AssertionError: torch._assert shape checks
    # (timm's fixed-size patch embeddings: "Input height (28) doesn't match model (224)")
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
        first = first_line(e)
        shape = tuple(batch["pixel_values"].shape[1:]) if "pixel_values" in batch else None
        where = f" on {'×'.join(map(str, shape))} inputs" if shape else ""
        return f"the model fails on a batch of the data{where} ({first}){_size_hint(model, shape)}"
    finally:
        model.train(was_training)
    return None


def _size_hint(model: nn.Module, shape: tuple[int, ...] | None) -> str:
    """What to change when images are the wrong size for the model."""
    if not shape or len(shape) != 3:
        return ""
    patch_embed = getattr(getattr(model, "model", None), "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if getattr(patch_embed, "strict_img_size", False) and size and tuple(size) != tuple(shape[1:]):
        # timm ViT-style models are built for one input size; img_size rebuilds them for another
        return (f"; the model is built for {'×'.join(map(str, size))} images: set data.image_size: {size[0]}, "
                f"or model.kwargs: {{img_size: {shape[-1]}}}")
    return "; set data.image_size to a larger size"
