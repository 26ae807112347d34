"""Image datasets larger than memory (ImageNet): images stay encoded and are transformed when read.

The in-memory path (``idx``, Hub datasets by default) decodes every image once into a uint8 table;
ImageNet's 1.28 M images would need ~190 GB that way. Here the splits keep ``datasets``' encoded
``Image`` column, and a per-example transform (``Dataset.with_transform``) decodes each image as a
batch is read and applies timm's standard pipeline: random-resized crop, flip and colour jitter
for training, resize and centre crop for evaluation, the model's mean and std. The transform is
built from the model (``timm.data.resolve_data_config``) once the model exists, the same as
``timm``'s own training script does.

Sources: ``data.name: image_folder`` reads ``data.path`` laid out as ``train/<class>/*.jpg`` and
``val/<class>/*.jpg`` (``datasets``' ``imagefolder`` builder); ``data.hub_id`` with
``data.transforms: timm`` reads a Hub image dataset the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch

from ..text import first_line
from . import DataBundle, DataError, register_data
from .idx import accuracy

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")
#: Evaluation split, in order of preference: ImageNet-1k's ``test`` split carries no labels (-1).
EVAL_SPLITS = ("validation", "val", "valid", "test")
#: Side of the images until a model's own config is known, unless the recipe sets data.image_size.
DEFAULT_IMAGE_SIZE = 224


def image_and_label_columns(split: datasets.Dataset, name: str) -> tuple[str, str]:
    """The split's image and label column names, or a DataError listing what it has."""
    columns = split.column_names
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if image_col is None or label_col is None:
        raise DataError(f"{name}: need an image and a label column, found {columns}")
    return image_col, label_col


class _ImageTransform:
    """``with_transform`` function: decoded PIL images -> RGB -> ``transform`` -> ``pixel_values``.

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [self.transform(img.convert("RGB")) for img in batch["pixel_values"]]
        return {"pixel_values": images, "labels": batch["labels"]}


def _stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([int(r["labels"]) for r in rows])}


def lazy_image_bundle(dd: datasets.DatasetDict, name: str, image_size: int | None) -> DataBundle:
    """A bundle over ``dd``'s ``train`` split (the callers check it exists) and its evaluation
    split, whose images are decoded when read.

    Columns are renamed to ``pixel_values``/``labels`` so that Trainer's ``remove_unused_columns``
    (which keeps only the model's forward arguments) leaves them in place.
    """
    eval_split = next((s for s in EVAL_SPLITS if s in dd), None)
    if eval_split is None:
        raise DataError(f"{name} has no evaluation split: need one of {', '.join(EVAL_SPLITS)}")
    image_col, label_col = image_and_label_columns(dd["train"], name)
    feature = dd["train"].features[label_col]
    if not isinstance(feature, datasets.ClassLabel):
        raise DataError(f"{name}: the label column {label_col!r} must be a ClassLabel (class names), "
                        f"got {type(feature).__name__}")

    def prepare(split: datasets.Dataset) -> datasets.Dataset:
        split = split.select_columns([image_col, label_col])
        return split.rename_columns({c: n for c, n in ((image_col, "pixel_values"), (label_col, "labels")) if c != n})

    bundle = DataBundle(
        train=prepare(dd["train"]), eval=prepare(dd[eval_split]), collator=_stack, compute_metrics=accuracy,
        task="image-classification", num_labels=feature.num_classes, label_names=list(feature.names),
        info={"num_channels": 3, "lazy_images": True, "requested_image_size": image_size},
        card_name=name)
    set_timm_transforms(bundle, {})
    return bundle


def set_timm_transforms(bundle: DataBundle, data_config: dict[str, Any]) -> None:
    """Install timm's train and eval transforms for ``data_config`` (``resolve_data_config``'s
    output for the model; empty for timm's defaults). The image side is ``data.image_size`` when
    the recipe gives one, else the model's input size."""
    from timm.data import create_transform, resolve_data_config

    config = {**resolve_data_config(pretrained_cfg={"input_size": (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)}), **data_config}
    size = int(bundle.info["requested_image_size"] or config["input_size"][-1])
    config["input_size"] = (3, size, size)
    bundle.info["image_size"] = size
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: v for k, v in config.items() if k in keep}
    bundle.train = bundle.train.with_transform(_ImageTransform(create_transform(**config, is_training=True)))
    bundle.eval = bundle.eval.with_transform(_ImageTransform(create_transform(**config, is_training=False)))
    bundle.info["image_transform"] = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


@register_data("image_folder", reuse=False)
def image_folder_source(cfg) -> DataBundle:
    """``data.path``: ``train/<class>/*`` and ``val/<class>/*`` (or ``validation``/``test``) image files."""
    if not cfg.path:
        raise DataError("data.name 'image_folder' needs data.path: a folder with train/<class>/ and "
                        "val/<class>/ image folders")
    folder = Path(cfg.path)
    if not (folder / "train").is_dir():
        raise DataError(f"{folder} has no train/ folder (expected train/<class>/*.jpg and val/<class>/*.jpg)")
    try:
        dd = datasets.load_dataset("imagefolder", data_dir=str(folder), **cfg.options)
    except (ValueError, FileNotFoundError) as e:  # an option datasets' imagefolder does not take, among others
        key = "options" if any(str(k) in str(e) for k in cfg.options) else None
        raise DataError(f"{folder}: {first_line(e)}", key=key) from None
    return lazy_image_bundle(dd, str(folder), cfg.image_size)
