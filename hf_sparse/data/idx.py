"""MNIST-format idx files (Fashion-MNIST is the bundled copy) as ``datasets`` objects."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import datasets
import numpy as np
import torch

from . import BUNDLED_DATA, DataBundle, DataError, register_data

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: Path) -> np.ndarray:
    """Decode one (optionally gzipped) idx file: a big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_idx_folder(folder: str | Path) -> datasets.DatasetDict:
    """``train``/``test`` splits with ``pixel_values`` (uint8, 1x28x28) and ``labels``."""
    folder = Path(folder)
    missing = [name for name in IDX_FILES.values() if not (folder / name).exists()]
    if missing:
        raise DataError(f"{folder} lacks the idx files {', '.join(missing)}")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        images = read_idx(folder / IDX_FILES[f"{prefix}_images"])
        labels = read_idx(folder / IDX_FILES[f"{prefix}_labels"])
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
        n, h, w = images.shape
        features = datasets.Features({
            "pixel_values": datasets.Array3D((1, h, w), "uint8"),
            "labels": datasets.Value("int64"),
        })
        splits[split] = datasets.Dataset.from_dict(
            {"pixel_values": images.reshape(n, 1, h, w), "labels": labels.astype(np.int64)}, features=features)
    return datasets.DatasetDict(splits).with_format("torch")


class ImageCollator:
    """Stacks uint8 images into normalised float ``pixel_values`` (per-dataset mean/std)."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([r["pixel_values"] for r in rows]).float().div_(255.0)
        return {"pixel_values": pixels.sub_(self.mean).div_(self.std),
                "labels": torch.tensor([int(r["labels"]) for r in rows])}


def accuracy(eval_pred) -> dict[str, float]:
    """Top-1 accuracy from Trainer's ``EvalPrediction`` (logits or argmax predictions)."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(preds, tuple):
        preds = preds[0]
    if preds.ndim > 1:
        preds = preds.argmax(-1)
    return {"accuracy": float((preds == labels).mean())}


def image_bundle(dd: datasets.DatasetDict, label_names: list[str], card_name: str) -> DataBundle:
    train = dd["train"]
    sample = train[:1000]["pixel_values"].float() / 255.0
    _, c, h, w = sample.shape
    return DataBundle(
        train=train, eval=dd["test"], collator=ImageCollator(float(sample.mean()), float(sample.std())),
        compute_metrics=accuracy, task="image-classification", num_labels=len(label_names),
        label_names=label_names, info={"num_channels": c, "image_size": h}, card_name=card_name)


@register_data("fashion_mnist", "idx")
def idx_source(cfg) -> DataBundle:
    """``fashion_mnist`` reads the bundled copy unless ``data.path`` names another idx folder."""
    if cfg.name == "idx" and not cfg.path:
        raise DataError("data.name 'idx' needs data.path: a folder with the four idx .gz files")
    folder = Path(cfg.path) if cfg.path else BUNDLED_DATA / "fashion_mnist"
    dd = load_idx_folder(folder)
    n = int(max(max(dd["train"].unique("labels")), max(dd["test"].unique("labels"))) + 1)
    names = FASHION_MNIST_CLASSES if n == 10 and cfg.name == "fashion_mnist" else [str(i) for i in range(n)]
    return image_bundle(dd, names, "zalando-datasets/fashion_mnist" if not cfg.path else str(folder))
