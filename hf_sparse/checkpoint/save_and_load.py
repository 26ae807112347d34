"""The sparse checkpoint: one folder that plain transformers/timm, hf_sparse and the Hub all understand.

A checkpoint folder holds what ``save_pretrained`` (transformers) or ``timm.models.save_for_hf``
(timm) writes, plus ``sparsity.json`` (the sparsity facts and the storage format), the headline
figures in the safetensors header, ``recipe.yaml`` and a ``README.md`` model card. Three storage
formats:

- ``dense``: the weights with zeros where pruned; loads in plain transformers/timm.
- ``bitmask``: each targeted tensor as a packed bit mask (``np.packbits`` order) plus its nonzero
  values, in ``model.bitmask.safetensors``; lossless, several times smaller. The file has another
  name than ``model.safetensors`` on purpose: plain ``from_pretrained`` then fails loudly instead
  of building a randomly initialised model.
- ``purged``: for structured sparsity, removed units/channels are physically gone and the config
  describes the smaller shapes, so ``from_pretrained`` builds the small model directly.

``load_sparse`` reads any of them (from a folder or a Hub repo) and recomputes the densities from
the tensors to check them against ``sparsity.json``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

if TYPE_CHECKING:  # torch is imported where tensors are built: `hf-sparse inspect` reads files with numpy only
    import torch
    from torch import nn

FORMATS = ("dense", "bitmask", "purged", "onnx")  # onnx: purged/dense weights plus model.onnx (onnx_export.py)
RUNTIMES = ("dense", "sparse", "onnx")  # load_sparse(runtime=...): as saved, on the sparse kernels, on ONNX Runtime
SPARSITY_FILE = "sparsity.json"
DENSE_WEIGHTS = "model.safetensors"
BITMASK_WEIGHTS = "model.bitmask.safetensors"
DENSITY_PLOT = "density.png"
#: Prefix of hf_sparse's keys in the safetensors header metadata.
META_PREFIX = "hf_sparse."
_MASK, _VALUES = "::mask", "::values"  # ':' never occurs in a state-dict key (it is not a valid attribute)
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


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


# -- the model's kind -------------------------------------------------------------------------------


def _is_transformers_model(model: nn.Module) -> bool:
    import sys

    if "transformers" not in sys.modules:  # a model of that library cannot exist without it being imported
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _unwrap(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(model to save, library, prefix its parameter names carry in the engine's report).

    Any other ``nn.Module`` is library ``torch``: its state dict is saved and the user rebuilds
    the module to load it (``load_sparse(path, model=module)``).
    """
    from torch import nn

    if _is_transformers_model(model):
        return model, "transformers", ""
    inner, name = getattr(model, "model", None), getattr(model, "timm_name", None)
    if isinstance(inner, nn.Module) and isinstance(name, str):  # hf_sparse.models.build.TimmClassifier
        return inner, "timm", "model."
    if isinstance(getattr(model, "pretrained_cfg", None), dict) and "architecture" in model.pretrained_cfg:
        return model, "timm", ""
    return model, "torch", ""


def saved_names(model: nn.Module) -> dict[str, str]:
    """In-memory state-dict name -> the name the saved file uses.

    transformers 5 renames weights on ``save_pretrained`` (ViT's ``layers.0.attention.q_proj`` is
    written as ``encoder.layer.0.attention.attention.query``) through its conversion mapping; this
    runs that same mapping and pairs names by tensor identity, so ``sparsity.json`` and the bitmask
    encoding use the names on disk. Names that a converter merges or splits have no partner and
    are left out; timm and plain modules save names unchanged.
    """
    state = model.state_dict()
    if not _is_transformers_model(model):
        return {k: k for k in state}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 saves the in-memory names
        return {k: k for k in state}
    reverted = revert_weight_conversion(model, dict(state))
    by_tensor: dict[tuple, list[str]] = {}
    for name, t in reverted.items():
        by_tensor.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(name)
    out = {}
    for name, t in state.items():
        partners = by_tensor.get((t.data_ptr(), tuple(t.shape), t.dtype), [])
        if name in partners or len(partners) == 1:
            out[name] = name if name in partners else partners[0]
    return out


def _timm_in_chans(model: nn.Module) -> int | None:
    import torch

    first = model.pretrained_cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    try:
        weight = model.get_submodule(first).weight if first else None
    except AttributeError:
        return None
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 4 else None


def _save_model(model: nn.Module, library: str, folder: Path) -> None:
    if library == "transformers":
        model.save_pretrained(folder)
        return
    if library == "torch":  # the state dict alone; shared tensors are written once each, as copies
        from safetensors.torch import save_file

        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / DENSE_WEIGHTS), metadata={"format": "pt"})
        return
    from timm.models import save_for_hf

    args = {}
    in_chans = _timm_in_chans(model)
    if in_chans is not None:
        args["in_chans"] = in_chans  # plain `timm.create_model("hf-hub:...")` must build the same stem
    from ..models.build import timm_channel_stats

    data_config = timm_channel_stats(model, in_chans) if in_chans is not None else None
    labels = model.pretrained_cfg.get("label_names")
    save_for_hf(model, str(folder), model_args=args, data_config=data_config or None, safe_serialization=True,
                model_config={"label_names": list(labels)} if labels else None)
    # timm records num_classes in model_args too, which transformers' TimmWrapper passes to timm a second
    # time (beside num_labels from the root): keep it at the root only, where both libraries read it
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_args", {}).pop("num_classes", None) is not None:
        config_file.write_text(json.dumps(config, indent=2))


# -- bitmask encoding ---------------------------------------------------------------------------------


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


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files (checked to lie inside it)."""
    return _weight_files(Path(folder))


def _weight_files(folder: Path) -> list[Path]:
    if (folder / BITMASK_WEIGHTS).is_file():
        return [checked_file(folder, BITMASK_WEIGHTS)]
    index = folder / f"{DENSE_WEIGHTS}.index.json"
    if index.is_file():
        weight_map = _read_json(checked_file(folder, index.name)).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not a mapping of weight names to file names")
        shards = [checked_file(folder, s) for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} maps weights to {missing[0]!r}, which is not in the folder")
        return shards
    if (folder / DENSE_WEIGHTS).is_file():
        return [checked_file(folder, DENSE_WEIGHTS)]
    raise CheckpointError(f"{folder} holds no {DENSE_WEIGHTS} nor {BITMASK_WEIGHTS}")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; anything else is a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def _bitmask_layout(folder: Path, file: Path) -> dict[str, Any]:
    try:
        layout = json.loads(read_header_metadata(folder).get(f"{META_PREFIX}bitmask", "{}"))
    except ValueError:
        layout = None
    if not isinstance(layout, dict) or not all(isinstance(v, dict) for v in layout.values()):
        raise CheckpointError(f"{file}: the bitmask layout in its header is not a mapping of names to entries")
    return layout


def read_header_metadata(folder: str | Path) -> dict[str, str]:
    """The safetensors header metadata of the checkpoint's (first) weights file."""
    with safe_open(str(_weight_files(Path(folder))[0]), framework="numpy") as f:
        return dict(f.metadata() or {})


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full dense state dict of a checkpoint folder, whatever its storage format."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = _weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    if files[0].name != BITMASK_WEIGHTS:
        return tensors
    layout = _bitmask_layout(folder, files[0])
    out = {k: v for k, v in tensors.items() if not k.endswith((_MASK, _VALUES))}
    for name, info in layout.items():
        try:
            out[name] = unpack_tensor(tensors[name + _MASK], tensors[name + _VALUES], info["shape"])
        except KeyError as e:
            raise CheckpointError(f"{files[0]}: bitmask entry for {name!r} is incomplete ({e})") from None
        except CheckpointError as e:
            raise CheckpointError(f"{files[0]}: {name!r}: {e}") from None
    return out


# -- densities ----------------------------------------------------------------------------------------


def layer_stats(t: torch.Tensor | np.ndarray) -> dict[str, Any]:
    nonzero = int(np.count_nonzero(t) if isinstance(t, np.ndarray) else t.count_nonzero())
    numel = math.prod(t.shape)
    return {"shape": list(t.shape), "nonzero": nonzero, "numel": numel, "density": nonzero / max(numel, 1),
            "dtype": str(t.dtype).removeprefix("torch.")}


def read_layer_stats(folder: str | Path) -> dict[str, dict[str, Any]]:
    """:func:`layer_stats` of every tensor in a checkpoint folder, read with numpy (no torch import).

    A bitmask entry is counted from its stored values and recorded shape, without unpacking;
    a file numpy cannot read (bfloat16) falls back to torch.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    stats: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            from safetensors.numpy import load_file

            arrays = load_file(str(f))
        except (TypeError, ValueError):
            return {k: layer_stats(v) for k, v in read_state_dict(folder).items()}
        stats.update({k: layer_stats(v) for k, v in arrays.items()})
    if files[0].name != BITMASK_WEIGHTS:
        return stats
    layout = _bitmask_layout(folder, files[0])
    for name, info in layout.items():
        values = stats.pop(name + _VALUES, None)
        mask = stats.pop(name + _MASK, None)
        if values is None or mask is None:
            raise CheckpointError(f"{files[0]}: bitmask entry for {name!r} is incomplete")
        try:
            numel = _declared_numel(info.get("shape"), mask["numel"], name)
        except CheckpointError as e:
            raise CheckpointError(f"{files[0]}: {e}") from None
        stats[name] = {"shape": list(info["shape"]), "nonzero": values["nonzero"], "numel": numel,
                       "density": values["nonzero"] / max(numel, 1), "dtype": values["dtype"]}
    return stats


def _report_layers(report: dict, prefix: str, state: dict[str, torch.Tensor],
                   rename: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The report's per-layer facts under the saved weights' names (the report is trusted, not recomputed).

    ``state`` is keyed by saved names; ``rename`` maps in-memory names to them. A report may use
    either (a re-export reads its names from ``sparsity.json``).
    """
    layers = {}
    for name, info in (report.get("per_layer") or {}).items():
        key = name[len(prefix):] if prefix and name.startswith(prefix) else name
        key = key if key in state else (rename or {}).get(key, key)
        if key not in state:
            raise CheckpointError(f"the report names {name!r}, which is not among the saved weights")
        if not isinstance(info, dict):  # results.json style: name -> density
            info = {"density": float(info)}
        entry = dict(info)
        for k, v in layer_stats(state[key]).items():
            entry.setdefault(k, v)  # fill what the report left out
        layers[key] = entry
    return layers


# -- saving ---------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "null" if x is None else repr(float(x))


def _rewrite_weights(folder: Path, fmt: str, headline: dict[str, str], targets: list[str]) -> None:
    """Add the headline metadata to the weights file(s); encode the targets for ``bitmask``."""
    from safetensors.torch import load_file, save_file

    files = _weight_files(folder)
    index = folder / f"{DENSE_WEIGHTS}.index.json"
    if fmt != "bitmask":
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                meta = dict(h.metadata() or {})
            save_file(load_file(str(f)), str(f), metadata={"format": "pt", **meta, **headline})
        return
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    layout, out = {}, {}
    for name, t in tensors.items():
        if name in targets:
            out[name + _MASK], out[name + _VALUES] = pack_tensor(t)
            layout[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            out[name] = t
    meta = {"format": "pt", **headline, f"{META_PREFIX}bitmask": json.dumps(layout, separators=(",", ":"))}
    save_file(out, str(folder / BITMASK_WEIGHTS), metadata=meta)
    for f in files:
        f.unlink()
    index.unlink(missing_ok=True)


def clear_stale_weights(out: Path) -> None:
    """Remove weights of an earlier export into the same folder: two weight files would contradict each other."""
    for pattern in ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "model*.onnx",
                    DENSITY_PLOT):
        for f in out.glob(pattern):
            f.unlink()


def _task_of(model: nn.Module, library: str) -> str | None:
    if library == "timm":
        return "image-classification"
    name = type(model).__name__
    for suffix, task in (("ForImageClassification", "image-classification"),
                         ("ForAudioClassification", "audio-classification"),
                         ("ForCTC", "automatic-speech-recognition"),
                         ("ForSequenceClassification", "text-classification")):
        if suffix == "ForSequenceClassification" and getattr(model, "main_input_name", "") == "input_features":
            task = "audio-classification"
        if name.endswith(suffix):
            return task
    return None


def save_sparse_checkpoint(model: nn.Module, out_dir: str | Path, *, report: dict, recipe_yaml: str | None = None,
                           format: str = "dense", eval_metrics: dict | None = None,
                           dense_reference: dict | None = None, structure: dict[str, list[int]] | None = None,
                           processor: Any = None, dataset: str | None = None, task: str | None = None,
                           measure_speed: bool = False, quantize: str | None = None) -> Path:
    """Write the sparse checkpoint folder ``out_dir`` and return its path.

    ``report`` is the engine's sparsity report (method, densities, ``per_layer`` keyed by parameter
    name); the weights already hold zeros where pruned. ``structure`` (target name -> kept output
    units; default ``report["structure"]``) drives ``purged``; without it every unit whose removal
    cannot change the outputs goes. ``dataset`` (a Hub dataset id or name) and ``task`` feed the
    model card; by default they come from the recipe and the model class. ``measure_speed=True``
    (``hf-sparse export`` asks for it) times the batch-1 CPU latency of the sparse runtime vs dense
    (about 0.3 s, only when some layer is sparse enough for the runtime) and records it as
    ``runtime_speed`` in sparsity.json and the card's Speed section; off by default, the card has none. ``format="onnx"`` writes the purged (structured runs) or dense checkpoint plus
    ``model.onnx`` checked against it (``quantize="int8"``: also ``model.int8.onnx``); see
    :mod:`hf_sparse.checkpoint.onnx_export`.
    """
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize is not None and format != "onnx":
        raise CheckpointError("quantize applies to format='onnx' only")
    if format == "onnx":
        from .onnx_export import add_onnx, is_structured, require_onnx

        require_onnx()  # before anything is written
        folder = save_sparse_checkpoint(
            model, out_dir, report=report, recipe_yaml=recipe_yaml, format="purged" if is_structured(report) else "dense",
            eval_metrics=eval_metrics, dense_reference=dense_reference, structure=structure, processor=processor,
            dataset=dataset, task=task, measure_speed=measure_speed)
        add_onnx(folder, quantize=quantize, recipe_yaml=recipe_yaml)
        return folder
    inner, library, prefix = _unwrap(model)

    rename = saved_names(inner)
    memory_state = inner.state_dict()
    state = {rename[k]: v.detach() for k, v in memory_state.items() if k in rename}
    layers = _report_layers(report, prefix, state, rename)
    stale = [f"{k}: report {v['nonzero']}, weights {layer_stats(state[k])['nonzero']}" for k, v in layers.items()
             if "nonzero" in v and int(v["nonzero"]) != layer_stats(state[k])["nonzero"]]
    if stale:
        warnings.warn("nonzero counts of the weights differ from the report (were the final masks applied?): "
                      + "; ".join(stale[:5]), stacklevel=2)
    purge_info = None
    to_save = inner
    if format == "purged":
        from ..structure.purge import purge_for_export

        wanted = structure if structure is not None else report.get("structure")
        if wanted and prefix:
            wanted = {k.removeprefix(prefix): v for k, v in wanted.items()}
        try:
            to_save, kept, extra = purge_for_export(inner, wanted)
        except ValueError as e:
            raise CheckpointError(f"cannot purge {type(inner).__name__}: {e}") from None
        small_rename = saved_names(to_save)
        small_state = {small_rename[k]: v for k, v in to_save.state_dict().items() if k in small_rename}
        if not extra:
            kept = {small_rename.get(k, rename.get(k, k)): v for k, v in kept.items()}
        purge_info = {"kept": kept, "per_layer": {k: layer_stats(small_state[k]) for k in layers if k in small_state},
                      **extra}
        if "params" not in purge_info:  # a self-purging model: count what went
            from ..structure.budget import count_params

            dense_params, purged_params = count_params(inner), count_params(to_save)
            purge_info["params"] = {"dense": dense_params, "purged": purged_params,
                                    "fraction": purged_params / max(dense_params, 1)}
        from ..structure.purge import PURGE_HINT_FRACTION, purge_summary

        if purge_info["params"]["fraction"] > 1 - PURGE_HINT_FRACTION:
            warnings.warn(purge_summary(purge_info["params"]), stacklevel=2)

    # everything that can fail on bad input has run; only now touch the output folder
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_weights(out)
    _save_model(to_save, library, out)
    achieved, target = report.get("achieved_density"), report.get("target_density")
    headline = {f"{META_PREFIX}{k}": v for k, v in {
        "method": str(report.get("method", "none")), "format": format, "target_density": _fmt(target),
        "achieved_density": _fmt(achieved), "version": report.get("hf_sparse_version") or hf_sparse_version(),
    }.items()}
    _rewrite_weights(out, format, headline, list(layers) if format == "bitmask" else [])

    from ..runtime.speed import checkpoint_speed

    runtime_speed = checkpoint_speed(to_save) if measure_speed else None
    sparsity = {
        "format": format,
        "library": library,
        "model_class": f"{type(to_save).__module__}.{type(to_save).__qualname__}",
        "timm_name": to_save.pretrained_cfg.get("architecture") if library == "timm" else None,
        "weights_file": BITMASK_WEIGHTS if format == "bitmask" else DENSE_WEIGHTS,
        "method": report.get("method", "none"),
        "target_density": target,
        "target_unit": report.get("target_unit") or "weights",
        "achieved_density": achieved,
        "model_density": report.get("model_density"),
        "granularity": report.get("granularity", "unstructured"),
        "per_layer": layers,
        "method_metrics": report.get("method_metrics") or {},
        "purged": purge_info,
        "eval": dict(eval_metrics) if eval_metrics else None,
        "dense_reference": dict(dense_reference) if dense_reference else None,
        "hf_sparse_version": report.get("hf_sparse_version") or hf_sparse_version(),
        "runtime_speed": runtime_speed,
    }
    sparsity["sha256"] = weight_digests(out)
    (out / SPARSITY_FILE).write_text(json.dumps(sparsity, indent=2))
    if recipe_yaml is not None:
        (out / "recipe.yaml").write_text(recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n")
    if processor is not None:
        processor.save_pretrained(out)
        if library == "timm" and hasattr(processor, "save_into_timm_config"):
            processor.save_into_timm_config(out)  # transformers reads a timm checkpoint's processor from there

    from .model_card import write_model_card

    write_model_card(out, sparsity, recipe_yaml=recipe_yaml, dataset=dataset,
                     task=task or _task_of(to_save, library))
    return out


# -- loading --------------------------------------------------------------------------------------------


def resolve_checkpoint(path_or_repo_id: str | Path, *, revision: str | None = None, **hub_kwargs) -> Path:
    """A local checkpoint folder, or the snapshot of a Hub repo downloaded into the cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{path} is a local folder; 'revision' applies to Hub repos only")
        return path
    text = str(path_or_repo_id)
    if path.exists() or not _REPO_ID.match(text) or text.startswith("."):
        raise CheckpointError(f"{text!r} is neither a checkpoint folder nor a Hub repo id")
    from .hub import HubError, pull_from_hub

    try:
        return pull_from_hub(text, revision=revision, **hub_kwargs)
    except HubError as e:
        raise CheckpointError(f"{text!r} is not a local folder, and {e}") from None


def read_sparsity(folder: str | Path) -> dict[str, Any]:
    """``sparsity.json`` of a checkpoint folder ({} for a plain transformers/timm folder).

    Its fields are checked for the types the loader relies on; a file that is not JSON, not an
    object, or holds a wrong type is a CheckpointError naming the file and the field.
    """
    folder = Path(folder)
    f = folder / SPARSITY_FILE
    if not f.is_file():
        return {}
    sparsity = _read_json(checked_file(folder, SPARSITY_FILE))
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


def _read_config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder} has no config.json, so the model cannot be built")
    return _read_json(checked_file(folder, "config.json"))


def _transformers_class(sparsity: dict, config: dict) -> type:
    """The model class: the recorded one (only from transformers or hf_sparse), else the config's architecture."""
    import transformers

    from .. import models  # noqa: F401  (registers hf_sparse's models with the Auto classes)

    def model_class(obj: Any) -> bool:  # a recorded name must lead to a model class, never to a function
        return isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)

    qualname = sparsity.get("model_class") or ""
    module, _, cls = qualname.rpartition(".")
    if module.split(".")[0] in ("transformers", "hf_sparse"):
        try:
            found = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            found = None
        if model_class(found):
            return found
    architectures = config.get("architectures") or []
    for arch in architectures if isinstance(architectures, list) else []:
        if isinstance(arch, str) and model_class(getattr(transformers, arch, None)):
            return getattr(transformers, arch)
    raise CheckpointError(f"cannot tell which model class to build (model_class={qualname!r}, "
                          f"architectures={config.get('architectures')})")


def _build_timm(config: dict, state: dict[str, torch.Tensor], plan: dict | None = None,
                folder: Path = Path("the checkpoint")) -> nn.Module:
    import timm

    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise CheckpointError("config.json: model_args is not a mapping")
    unsafe = sorted(k for k in model_args if k in _UNSAFE_TIMM_ARGS or not isinstance(k, str)
                    or k.endswith(("_path", "_file", "_dir", "_url")))
    if unsafe:  # e.g. checkpoint_path: timm would open any file it names
        raise CheckpointError(f"config.json: model_args.{unsafe[0]} would make timm read files or download "
                              "weights named by the checkpoint; refusing it")
    if not isinstance(config.get("architecture"), str):
        raise CheckpointError("config.json: architecture is not a timm model name")
    kwargs = {"num_classes": config.get("num_classes"), **model_args}
    model = timm.create_model(config["architecture"], pretrained=False, **kwargs)
    if plan:  # a purged checkpoint of a model without a purge-aware config: the recorded shapes
        _resize(model, plan)
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) == 1:  # saved in one precision (bf16...): build in it, as transformers does from its config
        model.to(floats.pop())
    _check_dtypes(folder, model, state)  # before load_state_dict, which would cast
    model.load_state_dict(state, strict=True)
    return model


def _resize(model: nn.Module, plan: dict) -> nn.Module:
    from ..structure.purge import PurgeError, resize_to_plan

    try:
        return resize_to_plan(model, plan)
    except PurgeError as e:
        raise CheckpointError(f"the purge plan in {SPARSITY_FILE} does not fit {type(model).__name__}: {e}") from None


#: timm ``create_model`` arguments that read files or fetch weights: a checkpoint's config never passes them.
_UNSAFE_TIMM_ARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                               "cache_dir", "pretrained_strict"})
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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "the checkpoint") -> nn.Module:
    """Copy a saved state dict (names as on disk) into ``model`` in place; every tensor must fit.

    ``model`` may be the module that was saved or hf_sparse's timm wrapper around it.
    """
    inner = _unwrap(model)[0]
    on_disk = {saved: memory for memory, saved in saved_names(inner).items()}
    converted = {on_disk.get(k, k): v for k, v in state.items()}
    try:
        result = inner.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # shapes differ
        raise CheckpointError(f"{source}: the weights do not fit {type(inner).__name__}: "
                              f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if k not in _tied_keys(inner)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source}: the weights do not fit {type(inner).__name__}: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (a file may store them once)."""
    seen, tied = set(), set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def _checkpoint_errors(fn):
    """Any failure while reading a checkpoint (a damaged safetensors file, transformers refusing the
    weights...) becomes one CheckpointError naming the checkpoint, never a traceback."""
    @functools.wraps(fn)
    def wrapper(path_or_repo_id, *args, **kwargs):
        try:
            return fn(path_or_repo_id, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged or hostile input
            text = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{path_or_repo_id}: not a readable checkpoint: {type(e).__name__}"
                                  f"{': ' + text if text else ''}") from None
    return wrapper


@_checkpoint_errors
def load_sparse(path_or_repo_id: str | Path, *, model: nn.Module | None = None, revision: str | None = None,
                verify: bool = True, runtime: str = "dense", batch_sizes: tuple[int, ...] = (1,),
                decisions: dict | str | Path | None = None, **hub_kwargs) -> nn.Module:
    """Load a sparse checkpoint (any format) from a folder or a Hub repo id, in eval mode.

    transformers models come back as their ``PreTrainedModel`` class; timm models as the plain timm
    model. A plain ``nn.Module`` checkpoint holds only the state dict: pass ``model=`` (a fresh
    instance of the saved module), which is filled in place and returned; any checkpoint can be
    loaded into a given module that way. ``hub_kwargs`` (``endpoint``, ``token``, ``cache_dir``...)
    go to the Hub download.

    With ``verify`` (the default) every weight file must match the SHA-256 recorded in
    ``sparsity.json`` and the recomputed densities must match the recorded ones; a mismatch is a
    CheckpointError naming the file or layer. A ``config.json`` with ``auto_map`` (custom model code)
    is always refused: no code from a checkpoint is ever run.

    ``runtime="sparse"`` returns the model converted by :func:`hf_sparse.runtime.to_sparse_runtime`
    (inference only: sparse Linear/GRU/LSTM layers on CSR/BSR kernels; each layer converted only where,
    timed whole, it is faster than dense at every size in ``batch_sizes``, or as ``decisions`` say
    without timing); ``"dense"`` (the default)
    returns it as saved. ``runtime="onnx"`` returns an :class:`~hf_sparse.checkpoint.onnx_export.OnnxModel`
    running the folder's ``model.onnx`` on ONNX Runtime (a callable with the model's keyword inputs).
    """
    if runtime not in RUNTIMES:
        raise CheckpointError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    folder = resolve_checkpoint(path_or_repo_id, revision=revision, **hub_kwargs)
    sparsity = read_sparsity(folder)
    if verify:
        verify_digests(folder, sparsity)
    if runtime == "onnx":
        from .onnx_export import load_onnx

        return load_onnx(folder, digests=sparsity.get("sha256") if verify else None)
    config_file = folder / "config.json"
    if config_file.is_file() and "auto_map" in _read_config(folder):
        raise CheckpointError(f"{config_file} has an auto_map: the checkpoint wants to run its own Python code, "
                              "which load_sparse never does (trust_remote_code is always False)")
    state = read_state_dict(folder)
    if model is not None or sparsity.get("library") == "torch":
        if model is None:
            raise CheckpointError(f"{folder} holds the state dict of a plain {sparsity.get('model_class')}: build "
                                  "that module and pass it as load_sparse(path, model=module)")
        _check_dtypes(folder, model, state)  # before load_into, which would cast
        loaded = load_into(model, state, folder)
        _check_densities(folder, sparsity, state, verify)
        return _with_runtime(loaded.eval(), runtime, batch_sizes, decisions)
    config = _read_config(folder)
    library = sparsity.get("library") or ("timm" if "architecture" in config else "transformers")
    plan = (sparsity.get("purged") or {}).get("plan") if sparsity.get("format") == "purged" else None
    if library == "timm":
        model = _build_timm(config, state, plan, folder)
    else:
        cls = _transformers_class(sparsity, config)
        if plan and (sparsity.get("purged") or {}).get("config") is None:  # the config holds the dense widths
            model = _resize(cls._from_config(cls.config_class.from_pretrained(folder)), plan)
            info = {}
            load_into(model, state, folder)
        elif (folder / BITMASK_WEIGHTS).is_file():
            cfg = cls.config_class.from_pretrained(folder)
            model, info = cls.from_pretrained(None, config=cfg, state_dict=state, output_loading_info=True)
        else:
            try:
                model, info = cls.from_pretrained(folder, output_loading_info=True)
            except RuntimeError as e:
                if "mismatched_sizes" not in str(e):
                    raise
                _raise_shape_mismatch(folder, cls._from_config(cls.config_class.from_pretrained(folder)), state)
                raise
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys", "unexpected_keys")}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            raise CheckpointError(f"{folder}: the weights do not fit {cls.__name__}: {bad}")
    _check_dtypes(folder, model, state)
    _check_densities(folder, sparsity, state, verify)
    return _with_runtime(model.eval(), runtime, batch_sizes, decisions)


def _raise_shape_mismatch(folder: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Name the first stored tensor whose shape differs from the model's (transformers' own error names none)."""
    memory = model.state_dict()
    for name, saved in saved_names(model).items():
        if saved in state and tuple(state[saved].shape) != tuple(memory[name].shape):
            raise CheckpointError(f"{folder}: {saved} has shape {list(state[saved].shape)} in the weights, the model "
                                  f"built from config.json expects {list(memory[name].shape)}")


def _check_dtypes(folder: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every stored tensor must have the dtype of the model tensor it fills: loading casts silently,
    which would pass off replaced weights (int8 or float16 where the model holds float32)."""
    inner = _unwrap(model)[0]
    memory = inner.state_dict()
    for name, saved in saved_names(inner).items():
        if saved in state and state[saved].dtype != memory[name].dtype:
            raise CheckpointError(f"{folder}: {saved} is stored as {str(state[saved].dtype).removeprefix('torch.')}, "
                                  f"but the model holds {str(memory[name].dtype).removeprefix('torch.')}; the "
                                  "weights were not written with this model")


def _with_runtime(model: nn.Module, runtime: str, batch_sizes: tuple[int, ...] = (1,),
                  decisions: dict | str | Path | None = None) -> nn.Module:
    if runtime == "dense":
        return model
    from ..runtime import to_sparse_runtime

    return to_sparse_runtime(model, inplace=True, batch_sizes=batch_sizes, decisions=decisions)


def _check_densities(folder: Path, sparsity: dict, state: dict[str, torch.Tensor], strict: bool) -> None:
    """Densities recomputed from the tensors must match ``sparsity.json`` (an error; a warning without ``strict``)."""
    problems = verify_densities(sparsity, state)
    if problems:
        message = f"{folder}: densities differ from {SPARSITY_FILE}: " + "; ".join(problems[:5])
        if strict:
            raise CheckpointError(message + " (load_sparse(..., verify=False) loads it anyway)")
        warnings.warn(message, stacklevel=3)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every weight file of a checkpoint folder, by file name (recorded in ``sparsity.json``)."""
    return {f.name: file_sha256(f) for f in _weight_files(folder)}


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
    for f in _weight_files(folder):
        if f.name not in recorded:
            raise CheckpointError(f"{f}: not among the weight files {SPARSITY_FILE} records")
        if file_sha256(f) != recorded[f.name]:
            raise CheckpointError(f"{f}: SHA-256 differs from the one recorded in {SPARSITY_FILE}: the file was "
                                  "changed or damaged after saving (load_sparse(..., verify=False) skips the check)")


@_checkpoint_errors
def inspect_checkpoint(path_or_repo_id: str | Path, *, revision: str | None = None, **hub_kwargs) -> dict[str, Any]:
    """Per-layer shapes and densities measured from the tensors, with the recorded headline figures.

    Layers are the targets listed in ``sparsity.json``; for a folder without it, every weight
    with two or more dimensions.
    """
    folder = resolve_checkpoint(path_or_repo_id, revision=revision, **hub_kwargs)
    sparsity = read_sparsity(folder)
    state = read_layer_stats(folder)
    names = list(sparsity.get("per_layer") or {}) or [k for k, v in state.items() if len(v["shape"]) >= 2]
    layers = [{"name": n, **state[n]} for n in names if n in state]
    nonzero, numel = sum(r["nonzero"] for r in layers), sum(r["numel"] for r in layers)
    files = {p.name: p.stat().st_size for p in _weight_files(folder)}
    return {
        "path": str(folder),
        "format": sparsity.get("format", "dense"),
        "method": sparsity.get("method"),
        "target_density": sparsity.get("target_density"),
        "target_unit": sparsity.get("target_unit") or "weights",
        "recorded_density": sparsity.get("achieved_density"),
        "recorded_gate_density": (sparsity.get("method_metrics") or {}).get("hard_density"),
        "measured_density": nonzero / numel if numel else None,
        "weights_bytes": files,
        "layers": layers,
        "problems": verify_densities(sparsity, state),
    }


#: Suffixes of the extra files a re-export carries over (processor, tokenizer and generation configs,
#: vocabularies); weights and pickles (.bin, .pt, .pth, .pkl...) never: they would sit outside the digests.
EXTRA_FILE_SUFFIXES = (".json", ".txt", ".model")


def copy_extra_files(src: Path, dst: Path) -> list[str]:
    """Copy files a checkpoint carries beyond what ``save_sparse_checkpoint`` writes (processor configs...).

    Only regular files (no links) with a suffix in :data:`EXTRA_FILE_SUFFIXES` that the new
    checkpoint does not hold already.
    """
    own = {SPARSITY_FILE, "README.md", "recipe.yaml", "config.json", DENSITY_PLOT, BITMASK_WEIGHTS,
           f"{DENSE_WEIGHTS}.index.json"}
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.name.endswith(EXTRA_FILE_SUFFIXES) or (dst / f.name).exists():
            continue
        if f.is_file() and f.name not in own and not f.name.endswith((".safetensors", ".onnx")) \
                and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


__all__ = ["BITMASK_WEIGHTS", "FORMATS", "SPARSITY_FILE", "CheckpointError", "inspect_checkpoint", "load_sparse",
           "pack_tensor", "read_sparsity", "read_state_dict", "resolve_checkpoint", "save_sparse_checkpoint",
           "unpack_tensor", "verify_densities"]
