"""``data.image_size`` and ``data.channels``: images at the size and channel count a backbone expects.

Stored images (Fashion-MNIST: 1×28×28) are resized per batch after collation, so the dataset stays
as stored and every model of a sweep reads the same data. Grey images become RGB by replicating the
channel. For a timm model the interpolation mode (and, for pretrained weights, the per-channel
mean/std) come from timm's ``resolve_data_config`` for that model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


class ResizingCollator:
    """Wraps an image collator: replicate grey channels, resize to ``size``×``size``, optionally renormalise."""

    def __init__(self, inner: Callable[[list[dict]], dict[str, torch.Tensor]], size: int | None,
                 channels: int | None, interpolation: str = "bilinear"):
        self.inner, self.size, self.channels, self.interpolation = inner, size, channels, interpolation
        self._renorm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stats: tuple[list[float], list[float]] | None = None  # per-channel mean/std, once renormalised

    def normalize_like(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Undo the inner collator's scalar normalisation and apply per-channel ``mean``/``std`` (of [0, 1] pixels)."""
        m0, s0 = float(self.inner.mean), float(self.inner.std)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._renorm = (s0 / std_t, (m0 - mean_t) / std_t)  # x_new = x * scale + shift
        self._stats = ([float(v) for v in mean], [float(v) for v in std])

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch = self.inner(rows)
        x = batch["pixel_values"]
        if self.channels and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            x = F.interpolate(x, size=(self.size, self.size), mode=mode,
                              **({} if mode == "nearest" else {"align_corners": False, "antialias": True}))
        if self._renorm is not None:
            x = x * self._renorm[0] + self._renorm[1]
        batch["pixel_values"] = x.contiguous()
        return batch

    def image_processor(self) -> Any:
        """The inner collator's image processor with this one's channels, size and normalisation."""
        processor = self.inner.image_processor()
        channels = self.channels or processor.num_channels
        processor.num_channels = channels
        processor.image_mean, processor.image_std = self._stats or (processor.image_mean[:1] * channels,
                                                                    processor.image_std[:1] * channels)
        if self.size:
            processor.do_resize, processor.size = True, {"height": self.size, "width": self.size}
            processor.resample = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") \
                else "bilinear"
        return processor


def resize_images(bundle, cfg):
    """Apply ``cfg.image_size``/``cfg.channels`` (a ``recipe.DataConfig``) to an image bundle, in place."""
    from . import DataError

    if not (cfg.image_size or cfg.channels):
        return bundle
    if bundle.task != "image-classification":
        raise DataError(f"image_size/channels apply to images; data {cfg.name!r} is {bundle.task}",
                        key="image_size" if cfg.image_size else "channels")
    if bundle.info.get("lazy_images"):  # the per-example transforms already resize (and make RGB)
        if cfg.channels and cfg.channels != 3:
            raise DataError(f"images read with data.transforms 'timm' are RGB (3 channels), not {cfg.channels}",
                            key="channels")
        return bundle
    stored = int(bundle.info.get("num_channels", 1))
    if cfg.channels and cfg.channels != stored and stored != 1:
        raise DataError(f"the images have {stored} channels; only 1-channel images can be replicated to "
                        f"{cfg.channels}", key="channels")
    bundle.collator = ResizingCollator(bundle.collator, cfg.image_size, cfg.channels)
    bundle.info["num_channels"] = cfg.channels or stored
    if cfg.image_size:
        bundle.info["image_size"] = cfg.image_size
    return bundle


def adopt_timm_preprocessing(bundle, model: torch.nn.Module, pretrained: bool) -> None:
    """Take the timm model's interpolation (and mean/std when its weights are pretrained) for resized
    images; images decoded per example get the model's whole train/eval transform pipeline."""
    from timm.data import resolve_data_config

    if bundle.info.get("lazy_images"):
        from .lazy_images import set_timm_transforms

        set_timm_transforms(bundle, resolve_data_config({}, model=model))
        return
    if not isinstance(bundle.collator, ResizingCollator):
        return
    config = resolve_data_config({}, model=model)
    bundle.collator.interpolation = str(config.get("interpolation") or "bilinear")
    if pretrained:
        bundle.collator.normalize_like(config["mean"], config["std"])
