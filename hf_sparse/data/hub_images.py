"""Image-classification datasets from the Hub (``data.hub_id``), via ``datasets.load_dataset``.

This is the path for users with internet access. Without it (as on hf_sparse's CI) the load
fails and the user gets one sentence saying so, not a traceback.
"""

from __future__ import annotations

import datasets
import numpy as np

from . import DataBundle, DataError
from .idx import image_bundle, images_to_dataset

_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")


def load_hub_images(cfg) -> DataBundle:
    try:
        dd = datasets.load_dataset(cfg.hub_id, **cfg.options)
    except Exception as e:  # network, auth, missing repo: all reported the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load Hub dataset {cfg.hub_id!r} ({reason}); without Hub access, point data.path "
                        f"at a local copy or use a built-in data.name") from None
    if not isinstance(dd, datasets.DatasetDict) or "train" not in dd:
        raise DataError(f"Hub dataset {cfg.hub_id!r} has no 'train' split")
    test_split = next((s for s in ("test", "validation") if s in dd), None)
    if test_split is None:
        raise DataError(f"Hub dataset {cfg.hub_id!r} has no 'test' or 'validation' split")
    columns = dd["train"].column_names
    image_col = next((c for c in _IMAGE_COLUMNS if c in columns), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in columns), None)
    if image_col is None or label_col is None:
        raise DataError(f"Hub dataset {cfg.hub_id!r}: need an image and a label column, found {columns}")
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
