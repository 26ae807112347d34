"""Data sources: each turns the recipe's ``data`` section into a :class:`DataBundle`.

A source is a function ``(DataConfig) -> DataBundle`` registered under a name with
``@register_data``; ``data.name`` in a recipe picks it. Splits are ``datasets.Dataset`` objects.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    import datasets


def _bundled_data() -> Path:
    """The repository's ``data/`` folder: beside the package in a clone or editable install; for
    a wheel install, ``./data`` when run from a clone. The wheel itself carries no datasets."""
    beside_package = Path(__file__).resolve().parents[2] / "data"
    for folder in (beside_package, Path.cwd() / "data"):
        if (folder / "fashion_mnist").is_dir() or (folder / "fsdd").is_dir():
            return folder
    return beside_package


#: Repository folder with the bundled datasets (see :func:`_bundled_data`).
BUNDLED_DATA = _bundled_data()


@dataclass
class DataBundle:
    """Everything a run needs from its data."""

    train: datasets.Dataset
    eval: datasets.Dataset
    collator: Callable[[list[dict]], dict]
    compute_metrics: Callable[[Any], dict[str, float]]
    task: str  # "image-classification" | "audio-classification" | "ctc"
    num_labels: int
    label_names: list[str]
    #: task-specific facts the model factory needs (e.g. in_chans, image_size, feature extractor).
    info: dict[str, Any] = field(default_factory=dict)
    #: Hub dataset id / name for model cards.
    card_name: str = ""


class DataError(ValueError):
    """The data named by a recipe cannot be loaded; the message says why and what to do.

    ``key`` names the ``data`` key at fault (e.g. ``"split"``, ``"options"``) when it is not the
    source itself, so the recipe error points at the right line.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


#: the built-in sources register themselves when their module is imported: on the first lookup
DATA_SOURCES: Registry = Registry("data source", builtins=[f"{__name__}.{m}" for m in (
    "idx", "lazy_images", "fsdd", "audio_folder")])
#: Sources whose bundles are not kept for reuse (see :func:`_build_source`): lazy ones, whose
#: folders are too large to stamp file by file and cost nothing to open again.
_NOT_REUSED: set[str] = set()


def register_data(*names: str, reuse: bool = True, override: bool = False) -> Callable:
    """Decorator: register a source under ``names`` (a taken name is refused unless ``override``)."""
    def deco(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        for n in names:
            DATA_SOURCES.add(n, fn, override=override)
            if not reuse:
                _NOT_REUSED.add(n)
        return fn

    return deco


#: Recently built source bundles, keyed by what they were built from (see :func:`_source_key`).
_BUILT: OrderedDict[tuple, DataBundle] = OrderedDict()
_BUILT_MAX = 4


def _source_key(cfg) -> tuple | None:
    """What a local source's bundle depends on: the source's settings and every file under its folder
    (path, size, modification time), so an edited or replaced file builds afresh. ``None`` (no reuse)
    for Hub data, sources registered with ``reuse=False`` and folders that cannot be listed."""
    if cfg.hub_id or cfg.name in _NOT_REUSED:
        return None
    folder = Path(cfg.path) if cfg.path else BUNDLED_DATA
    try:
        stamp = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*") if f.is_file()))
    except OSError:
        return None
    settings = json.dumps([cfg.name, cfg.path, cfg.split, cfg.options, cfg.seed], sort_keys=True, default=repr)
    return settings, str(folder.resolve()), stamp


def _build_source(cfg) -> DataBundle:
    """The source's bundle, reused when the same process asks again for the same unchanged data:
    ``validate`` then ``train``, a test suite or a recipe fuzzer decode and featurise each dataset once."""
    key = _source_key(cfg)
    if key is not None and key in _BUILT:
        _BUILT.move_to_end(key)
        built = _BUILT[key]
    else:
        built = DATA_SOURCES[cfg.name](cfg)
        if key is not None:
            _BUILT[key] = built
            while len(_BUILT) > _BUILT_MAX:
                _BUILT.popitem(last=False)
    # Callers replace splits and the collator (subsampling, resizing): hand out a shallow copy.
    return dataclasses.replace(built, info=dict(built.info))


def load_data(cfg) -> DataBundle:
    """Build the bundle for a recipe's ``data`` section (a ``recipe.DataConfig``)."""
    if cfg.transforms == "timm" and not (cfg.hub_id or cfg.name == "image_folder"):
        raise DataError(f"transforms 'timm' applies to image_folder and hub_id images, not data.name {cfg.name!r}",
                        key="transforms")
    if cfg.transforms == "stored" and cfg.name == "image_folder" and not cfg.hub_id:
        raise DataError("image_folder always decodes images when read: transforms must be 'timm' (or unset)",
                        key="transforms")
    if cfg.hub_id:
        from .hub_audio import load_hub_data  # audio columns -> speech, otherwise images

        bundle = load_hub_data(cfg)
    else:
        try:
            bundle = _build_source(cfg)
        except DataError:
            if cfg.path or BUNDLED_DATA.is_dir():
                raise
            raise DataError(f"data.name {cfg.name!r} reads the datasets bundled in a clone of the hf_sparse "
                            f"repository (its data/ folder, looked for in {BUNDLED_DATA.parent} and {Path.cwd()}), "
                            "which an installed wheel does not carry: run from a clone, point data.path at a copy, "
                            "or use data.hub_id (needs a connection to the Hub)") from None
    from .resize import resize_images
    from .speech import apply_augmentation

    return apply_augmentation(resize_images(_subsample(bundle, cfg), cfg), cfg)


def _subsample(bundle: DataBundle, cfg) -> DataBundle:
    """Honour ``max_train_samples``/``max_eval_samples`` (first N after a seeded shuffle)."""
    if cfg.max_train_samples and cfg.max_train_samples < len(bundle.train):
        bundle.train = bundle.train.shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(bundle.eval):
        bundle.eval = bundle.eval.shuffle(seed=cfg.seed).select(range(cfg.max_eval_samples))
    return bundle


__all__ = ["BUNDLED_DATA", "DATA_SOURCES", "DataBundle", "DataError", "load_data", "register_data"]
