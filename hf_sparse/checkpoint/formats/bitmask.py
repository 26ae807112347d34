"""``bitmask``: each targeted tensor as a packed bit mask (``np.packbits`` order) plus its nonzero
values, in ``model.bitmask.safetensors``; lossless, several times smaller than dense.

The file has another name than ``model.safetensors`` on purpose: plain ``from_pretrained`` then
fails loudly instead of building a randomly initialised model. The layout (shape and dtype of each
packed tensor) is in the file's header metadata.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import DENSE_INDEX, META_PREFIX, CheckpointError
from . import CheckpointFormat, SaveJob, read_header_metadata, register_format, weight_files

if TYPE_CHECKING:
    import torch

BITMASK_WEIGHTS = "model.bitmask.safetensors"
_MASK, _VALUES = "::mask", "::values"  # ':' never occurs in a state-dict key (it is not a valid attribute)
_LAYOUT_KEY = f"{META_PREFIX}bitmask"


def pack_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed keep-mask as uint8, nonzero values in order); the mask is ``t != 0``."""
    import torch

    flat = t.detach().reshape(-1).cpu()
    keep = flat != 0
    packed = torch.from_numpy(np.packbits(keep.numpy()))
    return packed, flat[keep].contiguous()


def _declared_numel(shape: Any, mask_bytes: int, name: str = "") -> int:
    """Entries of a bitmask entry's recorded shape, which its stored mask must cover exactly: a header
    cannot make the loader allocate more than 8 entries per byte of the file."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"corrupt bitmask entry{f' {name!r}' if name else ''}: shape {shape!r} is not a list of "
                              "non-negative integers")
    numel = math.prod(shape)
    if (numel + 7) // 8 != mask_bytes:
        raise CheckpointError(f"corrupt bitmask entry{f' {name!r}' if name else ''}: shape {shape} declares {numel:,} "
                              f"entries, its mask holds {mask_bytes:,} bytes ({mask_bytes * 8:,} entries at most)")
    return numel


def unpack_tensor(packed: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    import torch

    numel = _declared_numel(shape, packed.numel())
    keep = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
    if int(keep.sum()) != values.numel():
        raise CheckpointError(f"corrupt bitmask entry: {int(keep.sum())} mask bits set, {values.numel()} values")
    out = torch.zeros(numel, dtype=values.dtype)
    out[keep] = values
    return out.reshape(shape)


def _layout(folder: Path, file: Path) -> dict[str, Any]:
    try:
        layout = json.loads(read_header_metadata(folder).get(_LAYOUT_KEY, "{}"))
    except ValueError:
        layout = None
    if not isinstance(layout, dict) or not all(isinstance(v, dict) for v in layout.values()):
        raise CheckpointError(f"{file}: the bitmask layout in its header is not a mapping of names to entries")
    return layout


@register_format
class Bitmask(CheckpointFormat):
    name = "bitmask"
    weights_file = BITMASK_WEIGHTS
    card_note = ("each pruned tensor as a packed bit mask plus its nonzero values (`model.bitmask.safetensors`); "
                 "lossless, load it with `hf_sparse.load_sparse`.")

    def load_note(self, sparsity: dict[str, Any]) -> tuple[str | None, str]:
        return "hf_sparse", "The bitmask format needs hf_sparse to load (`load_sparse` rebuilds the dense tensors)."

    def encode(self, folder: Path, headline: dict[str, str], job: SaveJob) -> None:
        """Pack the targeted tensors into :data:`BITMASK_WEIGHTS`; the model's own weight files go."""
        from safetensors.torch import load_file, save_file

        files = weight_files(folder)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        layout, out = {}, {}
        for name, t in tensors.items():
            if name in job.layers:
                out[name + _MASK], out[name + _VALUES] = pack_tensor(t)
                layout[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            else:
                out[name] = t
        meta = {"format": "pt", **headline, _LAYOUT_KEY: json.dumps(layout, separators=(",", ":"))}
        save_file(out, str(folder / BITMASK_WEIGHTS), metadata=meta)
        for f in files:
            f.unlink()
        (folder / DENSE_INDEX).unlink(missing_ok=True)

    def decode(self, folder: Path, file: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layout = _layout(folder, file)
        out = {k: v for k, v in tensors.items() if not k.endswith((_MASK, _VALUES))}
        for name, info in layout.items():
            try:
                out[name] = unpack_tensor(tensors[name + _MASK], tensors[name + _VALUES], info["shape"])
            except KeyError as e:
                raise CheckpointError(f"{file}: bitmask entry for {name!r} is incomplete ({e})") from None
            except CheckpointError as e:
                raise CheckpointError(f"{file}: {name!r}: {e}") from None
        return out

    def stats(self, folder: Path, file: Path, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each packed entry counted from its stored values and recorded shape, without unpacking."""
        stats = dict(stats)
        for name, info in _layout(folder, file).items():
            values = stats.pop(name + _VALUES, None)
            mask = stats.pop(name + _MASK, None)
            if values is None or mask is None:
                raise CheckpointError(f"{file}: bitmask entry for {name!r} is incomplete")
            try:
                numel = _declared_numel(info.get("shape"), mask["numel"], name)
            except CheckpointError as e:
                raise CheckpointError(f"{file}: {e}") from None
            stats[name] = {"shape": list(info["shape"]), "nonzero": values["nonzero"], "numel": numel,
                           "density": values["nonzero"] / max(numel, 1), "dtype": values["dtype"]}
        return stats
