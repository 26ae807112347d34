"""The image preprocessing of hf_sparse's image data as a transformers image processor.

Checkpoints of image models carry it (``preprocessor_config.json``; a timm checkpoint's
``config.json``), so ``pipeline("image-classification", model=CHECKPOINT)`` and
``AutoImageProcessor`` turn any image into the inputs the model was trained on. transformers' own
processors cannot say "grey": the pipeline makes every image RGB, and a 1-channel model (LeNet,
a timm model with ``in_chans=1`` on Fashion-MNIST) needs it back in one channel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import make_flat_list_of_images, to_numpy_array

#: resampling filters by the names the data pipeline uses
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
#: key of a timm checkpoint's config.json that holds this processor's settings
TIMM_CONFIG_KEY = "hf_sparse_image_processor"


class SparseImageProcessor(BaseImageProcessor):
    """Grey or RGB conversion, an optional resize, then ``(pixels / 255 - mean) / std`` per channel."""

    model_input_names = ["pixel_values"]

    def __init__(self, num_channels: int = 3, size: dict[str, int] | None = None, do_resize: bool = False,
                 resample: str = "bilinear", image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grey) or 3 (RGB), not {num_channels}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, not {resample!r}")
        self.num_channels, self.size, self.do_resize, self.resample = num_channels, size, do_resize, resample
        self.image_mean = list(image_mean or [0.0] * num_channels)
        self.image_std = list(image_std or [1.0] * num_channels)

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs: Any):
        """Also read from a timm checkpoint's ``config.json``, where the settings sit under one key."""
        if TIMM_CONFIG_KEY in image_processor_dict:
            image_processor_dict = {"image_processor_type": cls.__name__, **image_processor_dict[TIMM_CONFIG_KEY]}
        return super().from_dict(image_processor_dict, **kwargs)

    def save_into_timm_config(self, folder: str | Path) -> None:
        """Name this processor in a timm checkpoint's ``config.json``: ``AutoImageProcessor`` reads a
        timm folder's processor from that file (and would otherwise build timm's RGB transform)."""
        config_file = Path(folder) / "config.json"
        config = json.loads(config_file.read_text())
        config["image_processor_type"] = type(self).__name__
        config[TIMM_CONFIG_KEY] = {k: v for k, v in self.to_dict().items() if k != "image_processor_type"}
        config_file.write_text(json.dumps(config, indent=2))

    def _one(self, image: Any) -> np.ndarray:
        if not isinstance(image, Image.Image):
            array = to_numpy_array(image)
            if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
                array = array.transpose(1, 2, 0)  # channels first -> last
            if array.dtype != np.uint8:
                array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).round().astype(np.uint8)
            image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
        image = image.convert("L" if self.num_channels == 1 else "RGB")
        if self.do_resize and self.size and image.size != (self.size["width"], self.size["height"]):
            image = image.resize((self.size["width"], self.size["height"]), _RESAMPLE[self.resample])
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        return (x - mean) / std

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One image or a list (PIL images, HWC/CHW arrays or tensors) -> ``pixel_values`` (N, C, H, W)."""
        pixels = np.stack([self._one(image) for image in make_flat_list_of_images(images)])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

