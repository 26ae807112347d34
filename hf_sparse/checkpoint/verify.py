"""Checks on what a checkpoint folder claims: the types of ``sparsity.json``'s fields, the
densities recomputed from the tensors, and the SHA-256 of every weight file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .files import SPARSITY_FILE, CheckpointError, checked_file, file_sha256, layer_stats, read_json
from .formats import weight_files


def read_sparsity(folder: str | Path) -> dict[str, Any]:
    """``sparsity.json`` of a checkpoint folder ({} for a plain transformers/timm folder).

    Its fields are checked for the types the loader relies on; a file that is not JSON, not an
    object, or holds a wrong type is a CheckpointError naming the file and the field.
    """
    folder = Path(folder)
    f = folder / SPARSITY_FILE
    if not f.is_file():
        return {}
    sparsity = read_json(checked_file(folder, SPARSITY_FILE))
    if problem := _sparsity_problem(sparsity):
        raise CheckpointError(f"{f}: {problem}")
    return sparsity


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1


def _layers_problem(layers: Any, key: str) -> str | None:
    if not isinstance(layers, dict):
        return f"{key} is not a mapping of layer names"
    for name, info in layers.items():
        if not isinstance(info, dict):
            return f"{key}.{name} is not a mapping"
        for field in ("nonzero", "numel"):
            if field in info and not _is_count(info[field]):
                return f"{key}.{name}.{field} is not a count: {info[field]!r}"
        if "density" in info and not _is_fraction(info["density"]):
            return f"{key}.{name}.density is not a fraction in [0, 1]: {info['density']!r}"
        if "shape" in info and not (isinstance(info["shape"], list) and all(_is_count(d) for d in info["shape"])):
            return f"{key}.{name}.shape is not a list of non-negative integers: {info['shape']!r}"
        if "dtype" in info and not isinstance(info["dtype"], str):
            return f"{key}.{name}.dtype is not a string"
    return None


def _sparsity_problem(sparsity: dict[str, Any]) -> str | None:
    """What is wrong with the types of ``sparsity.json``'s fields, or None."""
    for key in ("format", "library", "model_class", "timm_name", "method", "weights_file", "granularity"):
        if sparsity.get(key) is not None and not isinstance(sparsity[key], str):
            return f"{key} is not a string: {sparsity[key]!r}"
    for key in ("target_density", "achieved_density", "model_density"):
        if sparsity.get(key) is not None and not _is_fraction(sparsity[key]):
            return f"{key} is not a fraction in [0, 1]: {sparsity[key]!r}"
    digests = sparsity.get("sha256")
    if digests is not None and not (isinstance(digests, dict) and
                                    all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
        return "sha256 is not a mapping of file names to SHA-256 digests"
    if sparsity.get("per_layer") is not None and (problem := _layers_problem(sparsity["per_layer"], "per_layer")):
        return problem
    purged = sparsity.get("purged")
    if purged is not None:
        if not isinstance(purged, dict):
            return "purged is not a mapping"
        if purged.get("per_layer") is not None and (problem := _layers_problem(purged["per_layer"], "purged.per_layer")):
            return problem
    return None


#: How far a recorded headline density may be from the one the per-layer tensors give (rounding only).
DENSITY_TOLERANCE = 1e-6


def verify_densities(sparsity: dict, state: dict[str, Any]) -> list[str]:
    """Recompute nonzero counts from the tensors; return one line per disagreement with the record.

    ``state`` maps names to tensors, or to their :func:`layer_stats` (as :func:`read_layer_stats` gives).
    Checked: each recorded layer's shape, nonzero count and dtype, and the headline
    ``achieved_density`` against the layers' total; a sparse method's checkpoint must record its
    layers (without them nothing could be checked).
    """
    purged = (sparsity.get("purged") or {}).get("per_layer")
    recorded = purged or sparsity.get("per_layer") or {}
    problems = []
    if not recorded and sparsity.get("method") not in (None, "none"):
        problems.append(f"per_layer: missing, so the {sparsity.get('method')} densities cannot be checked")
    nonzero = numel = 0
    for name, info in recorded.items():
        if name not in state:
            problems.append(f"{name}: missing from the weights")
            continue
        got = state[name] if isinstance(state[name], dict) else layer_stats(state[name])
        nonzero, numel = nonzero + got["nonzero"], numel + got["numel"]
        if "shape" in info and list(info["shape"]) != got["shape"]:
            problems.append(f"{name}: shape {got['shape']}, recorded {info['shape']}")
        elif "nonzero" in info and int(info["nonzero"]) != got["nonzero"]:
            problems.append(f"{name}: {got['nonzero']} nonzero weights, recorded {info['nonzero']}")
        elif "dtype" in info and "dtype" in got and info["dtype"] != got["dtype"]:
            problems.append(f"{name}: dtype {got['dtype']}, recorded {info['dtype']}")
    achieved = sparsity.get("achieved_density")
    if not purged and numel and achieved is not None and abs(nonzero / numel - achieved) > DENSITY_TOLERANCE:
        problems.append(f"achieved_density: recorded {achieved:.6g}, the weights give {nonzero / numel:.6g}")
    return problems


def verify_digests(folder: Path, sparsity: dict) -> None:
    """Raise CheckpointError if a weight file differs from the SHA-256 that ``sparsity.json`` records.

    An hf_sparse checkpoint (it has ``sparsity.json``) without recorded digests is refused: its
    weights cannot be verified (``load_sparse(..., verify=False)`` loads it). A plain
    transformers/timm folder has nothing to verify against; it loads with a warning saying so.
    """
    recorded = sparsity.get("sha256")
    if not sparsity:
        warnings.warn(f"{folder} has no {SPARSITY_FILE}: a plain transformers/timm folder, loaded unverified "
                      "(no SHA-256 digests to check the weights against)", stacklevel=3)
        return
    if not recorded:
        raise CheckpointError(f"{folder / SPARSITY_FILE} records no sha256 digests, so the weights cannot be verified "
                              "(load_sparse(..., verify=False) loads it unverified)")
    for f in weight_files(folder):
        if f.name not in recorded:
            raise CheckpointError(f"{f}: not among the weight files {SPARSITY_FILE} records")
        if file_sha256(f) != recorded[f.name]:
            raise CheckpointError(f"{f}: SHA-256 differs from the one recorded in {SPARSITY_FILE}: the file was "
                                  "changed or damaged after saving (load_sparse(..., verify=False) skips the check)")
