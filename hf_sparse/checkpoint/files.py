"""What a checkpoint folder holds on disk, format aside: file names, safe paths, JSON, digests.

Kept free of torch (``hf-sparse inspect`` reads folders with numpy only) and of any one storage
format (those are :mod:`hf_sparse.checkpoint.formats`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SPARSITY_FILE = "sparsity.json"
DENSE_WEIGHTS = "model.safetensors"
DENSE_INDEX = f"{DENSE_WEIGHTS}.index.json"
DENSITY_PLOT = "density.png"
#: Prefix of hf_sparse's keys in the safetensors header metadata.
META_PREFIX = "hf_sparse."


class CheckpointError(ValueError):
    """A folder is not a checkpoint hf_sparse can read, or a request cannot be met; the message says why."""


def hf_sparse_version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # a partial checkout without the package's __init__ exports
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hf_sparse")
        except PackageNotFoundError:
            return "unknown"


def _cache_blobs(folder: Path) -> Path | None:
    """The Hub cache's ``blobs/`` folder when ``folder`` is a cache snapshot (``<repo>/snapshots/<rev>``),
    whose files are links into it."""
    blobs = folder.parent.parent / "blobs"
    return blobs.resolve() if folder.parent.name == "snapshots" and blobs.is_dir() else None


def checked_file(folder: Path, name: str) -> Path:
    """``folder / name``, refused when the name or a link leads outside the checkpoint folder.

    The name must stay inside the folder as written (no ``..``, not absolute), and the file it
    resolves to must too; in a Hub cache snapshot a link may lead into the cache's own ``blobs/``.
    """
    root = folder.resolve()
    path = folder / name
    if not Path(os.path.normpath(root / name)).is_relative_to(root):
        raise CheckpointError(f"{folder} names {name!r}, outside the checkpoint folder; refusing it")
    target = path.resolve()
    if target.is_relative_to(root) or (path.is_symlink() and target.parent == _cache_blobs(folder)):
        return path
    raise CheckpointError(f"{path} is a link to {target}, outside the checkpoint folder; refusing it")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; anything else is a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def layer_stats(t: torch.Tensor | np.ndarray) -> dict[str, Any]:
    nonzero = int(np.count_nonzero(t) if isinstance(t, np.ndarray) else t.count_nonzero())
    numel = math.prod(t.shape)
    return {"shape": list(t.shape), "nonzero": nonzero, "numel": numel, "density": nonzero / max(numel, 1),
            "dtype": str(t.dtype).removeprefix("torch.")}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clear_stale_weights(out: Path) -> None:
    """Remove weights of an earlier export into the same folder: two weight files would contradict each other."""
    for pattern in ("model*.safetensors", DENSE_INDEX, "pytorch_model*.bin", "model*.onnx", DENSITY_PLOT):
        for f in out.glob(pattern):
            f.unlink()


#: Suffixes of the extra files a re-export carries over (processor, tokenizer and generation configs,
#: vocabularies); weights and pickles (.bin, .pt, .pth, .pkl...) never: they would sit outside the digests.
EXTRA_FILE_SUFFIXES = (".json", ".txt", ".model")


def copy_extra_files(src: Path, dst: Path) -> list[str]:
    """Copy files a checkpoint carries beyond what ``save_sparse_checkpoint`` writes (processor configs...).

    Only regular files (no links) with a suffix in :data:`EXTRA_FILE_SUFFIXES` that the new
    checkpoint does not hold already.
    """
    own = {SPARSITY_FILE, "README.md", "recipe.yaml", "config.json", DENSITY_PLOT, DENSE_INDEX}
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.name.endswith(EXTRA_FILE_SUFFIXES) or (dst / f.name).exists():
            continue
        if f.is_file() and f.name not in own and not f.name.endswith((".safetensors", ".onnx")) \
                and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied
