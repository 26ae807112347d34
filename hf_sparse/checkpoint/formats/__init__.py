"""Checkpoint storage formats: one module each, registered by name, behind :class:`CheckpointFormat`.

Saving runs the steps a format may change, in order: ``check`` (before anything is written),
``storage`` (the format whose weight files are written: ``onnx`` stores purged or dense weights),
``prepare`` (the module to save: ``purged`` removes channels), ``encode`` (the weight files after
the model's own ``save_pretrained``) and ``finish`` (files added beside them: ``model.onnx``).
Reading, a folder's format is told by its weight file, and ``decode`` / ``stats`` turn what is
stored back into the dense tensors (or their counts).

A new format is one module in this package with a :class:`CheckpointFormat` subclass decorated
``@register_format``, named in ``_BUILTINS``; or registered from your own code the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from safetensors import safe_open

from ...registry import Registry
from ..files import DENSE_INDEX, DENSE_WEIGHTS, CheckpointError, checked_file, file_sha256, read_json

if TYPE_CHECKING:
    import torch
    from torch import nn

_BUILTINS = tuple(f"{__name__}.{m}" for m in ("dense", "bitmask", "purged", "onnx"))
CHECKPOINT_FORMATS: Registry = Registry("checkpoint format", builtins=_BUILTINS)


@dataclass
class SaveJob:
    """What ``save_sparse_checkpoint`` hands each step of a format."""

    model: nn.Module  # the module to save (hf_sparse's timm wrapper already unwrapped)
    library: str  # transformers, timm or torch
    prefix: str  # what the report's parameter names carry in front of the module's own
    report: dict[str, Any]
    layers: dict[str, dict[str, Any]]  # saved weight name -> the report's facts on it (the targets)
    rename: dict[str, str]  # in-memory state-dict name -> saved name
    structure: dict[str, list[int]] | None = None
    quantize: str | None = None
    recipe_yaml: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what a format adds to sparsity.json


class CheckpointFormat:
    """One way of storing a sparse model's weights; the defaults store them as they are."""

    name: ClassVar[str]
    weights_file: ClassVar[str] = DENSE_WEIGHTS
    quantizes: ClassVar[bool] = False  # whether ``quantize=`` means something to this format
    #: The model card's sentence on this format.
    card_note: ClassVar[str] = "full-size tensors with zeros where pruned; it loads with plain transformers/timm."

    def check(self, job: SaveJob) -> None:
        """Refuse a request this format cannot meet, before anything is written."""
        if job.quantize is not None:
            raise CheckpointError(f"format {self.name!r} does not quantize; quantize applies to formats that "
                                  f"export a graph ({', '.join(n for n, f in CHECKPOINT_FORMATS.items() if f.quantizes)})")

    def storage(self, job: SaveJob) -> CheckpointFormat:
        """The format whose weight files are written (and recorded in ``sparsity.json``)."""
        return self

    def prepare(self, job: SaveJob) -> nn.Module:
        """The module to save; may record facts for ``sparsity.json`` in ``job.extra``."""
        return job.model

    def encode(self, folder: Path, headline: dict[str, str], job: SaveJob) -> None:
        """Rewrite the weight files the model's own save wrote; by default add the headline metadata."""
        from safetensors.torch import load_file, save_file

        for f in weight_files(folder):
            with safe_open(str(f), framework="pt") as h:
                meta = dict(h.metadata() or {})
            save_file(load_file(str(f)), str(f), metadata={"format": "pt", **meta, **headline})

    def finish(self, folder: Path, job: SaveJob) -> None:
        """Add files beside a finished checkpoint."""

    def decode(self, folder: Path, file: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The dense state dict from the stored tensors."""
        return tensors

    def stats(self, folder: Path, file: Path, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Per-tensor counts (:func:`~hf_sparse.checkpoint.files.layer_stats`) of the dense state dict,
        from those of the stored tensors."""
        return stats

    def load_note(self, sparsity: dict[str, Any]) -> tuple[str | None, str]:
        """What the card says about loading this checkpoint without hf_sparse: (the card's
        ``library_name`` when the format decides it, with the whole text; else None, with a sentence
        to put before the library's own snippet)."""
        return None, ""

    def resize_plan(self, sparsity: dict[str, Any]) -> dict | None:
        """Shapes the model must be built with before the weights fit (None: as its config says)."""
        return None


def register_format(cls: type[CheckpointFormat], override: bool = False) -> type[CheckpointFormat]:
    """Class decorator: make ``cls`` available as ``format=cls.name`` everywhere a format is named."""
    CHECKPOINT_FORMATS.add(cls.name, cls(), override=override)
    return cls


def get_format(name: str) -> CheckpointFormat:
    try:
        return CHECKPOINT_FORMATS[name]
    except KeyError:
        raise CheckpointError(f"unknown checkpoint format {name!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}") \
            from None


def _own_file_format(folder: Path) -> CheckpointFormat | None:
    """The format whose own weight file (not ``model.safetensors``) the folder holds."""
    for fmt in CHECKPOINT_FORMATS.values():
        if fmt.weights_file != DENSE_WEIGHTS and (folder / fmt.weights_file).is_file():
            return fmt
    return None


def stored_format(folder: str | Path) -> CheckpointFormat:
    """The format that decodes the folder's weight files (``dense`` when they are plain safetensors:
    ``purged`` and ``onnx`` store theirs so too, and read back the same way)."""
    return _own_file_format(Path(folder)) or CHECKPOINT_FORMATS["dense"]


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files (checked to lie inside it)."""
    folder = Path(folder)
    if (own := _own_file_format(folder)) is not None:
        return [checked_file(folder, own.weights_file)]
    index = folder / DENSE_INDEX
    if index.is_file():
        weight_map = read_json(checked_file(folder, index.name)).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not a mapping of weight names to file names")
        shards = [checked_file(folder, s) for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} maps weights to {missing[0]!r}, which is not in the folder")
        return shards
    if (folder / DENSE_WEIGHTS).is_file():
        return [checked_file(folder, DENSE_WEIGHTS)]
    names = sorted({DENSE_WEIGHTS, *(f.weights_file for f in CHECKPOINT_FORMATS.values())})
    raise CheckpointError(f"{folder} holds no {' nor '.join(names)}")


def read_header_metadata(folder: str | Path) -> dict[str, str]:
    """The safetensors header metadata of the checkpoint's (first) weights file."""
    with safe_open(str(weight_files(folder)[0]), framework="numpy") as f:
        return dict(f.metadata() or {})


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full dense state dict of a checkpoint folder, whatever its storage format."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return stored_format(folder).decode(folder, files[0], tensors)


def read_layer_stats(folder: str | Path) -> dict[str, dict[str, Any]]:
    """:func:`~hf_sparse.checkpoint.files.layer_stats` of every tensor of a checkpoint folder's dense
    state dict, read with numpy (no torch import); a file numpy cannot read (bfloat16) falls back to torch."""
    from ..files import layer_stats

    folder = Path(folder)
    files = weight_files(folder)
    stats: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            from safetensors.numpy import load_file

            arrays = load_file(str(f))
        except (TypeError, ValueError):
            return {k: layer_stats(v) for k, v in read_state_dict(folder).items()}
        stats.update({k: layer_stats(v) for k, v in arrays.items()})
    return stored_format(folder).stats(folder, files[0], stats)


def weight_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every weight file of a checkpoint folder, by file name (recorded in ``sparsity.json``)."""
    return {f.name: file_sha256(f) for f in weight_files(folder)}
