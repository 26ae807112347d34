"""Image-classification datasets from the Hub (``data.hub_id``), via ``datasets.load_dataset``.

This is the path for users with internet access. Without it (as on hf_sparse's CI) the load
fails and the user gets one sentence saying so, not a traceback. By default the images are
decoded once into memory (small datasets such as Fashion-MNIST or CIFAR); ``data.transforms: timm``
keeps them encoded and transforms each when read (:mod:`.lazy_images`, for ImageNet).
"""

from __future__ import annotations

import datasets
import numpy as np

from ..text import first_line
from . import DataBundle, DataError
from .idx import image_bundle, images_to_dataset
from .lazy_images import image_and_label_columns, lazy_image_bundle


def load_hub_images(cfg) -> DataBundle:
    try:
        dd = datasets.load_dataset(cfg.hub_id, **cfg.options)
    except Exception as e:  # network, auth, missing repo: all reported the same way
        reason = first_line(e)
        raise DataError(f"cannot load Hub dataset {cfg.hub_id!r} ({reason}); without Hub access, point data.path "
                        f"at a local copy or use a built-in data.name") from None
    if not isinstance(dd, datasets.DatasetDict) or "train" not in dd:
        raise DataError(f"Hub dataset {cfg.hub_id!r} has no 'train' split")
    if cfg.transforms == "timm":
        return lazy_image_bundle(dd, cfg.hub_id, cfg.image_size)
    test_split = next((s for s in ("test", "validation") if s in dd), None)
    if test_split is None:
        raise DataError(f"Hub dataset {cfg.hub_id!r} has no 'test' or 'validation' split")
    image_col, label_col = image_and_label_columns(dd["train"], f"Hub dataset {cfg.hub_id!r}")
    label_feature = dd["train"].features[label_col]
    names = list(getattr(label_feature, "names", None) or map(str, sorted(set(dd["train"][label_col]))))

    def to_dataset(split: datasets.Dataset) -> datasets.Dataset:
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in split[image_col]])
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return images_to_dataset(images, np.asarray(split[label_col]))

    converted = datasets.DatasetDict({"train": to_dataset(dd["train"]), "test": to_dataset(dd[test_split])})
    shape = tuple(int(x) for x in np.asarray(dd["train"][0][image_col]).shape)
    shape = (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])
    return image_bundle(converted, names, cfg.hub_id, shape)
