"""Saving and loading a sparse checkpoint: one folder that plain transformers/timm, hf_sparse and
the Hub all understand.

A checkpoint folder holds what ``save_pretrained`` (transformers) or ``timm.models.save_for_hf``
(timm) writes, in one of the storage formats of :mod:`hf_sparse.checkpoint.formats` (``dense``,
``bitmask``, ``purged``, ``onnx``), plus ``sparsity.json`` (the sparsity facts and the storage
format), the headline figures in the safetensors header, ``recipe.yaml`` and a ``README.md`` model
card. ``load_sparse`` reads any of them (from a folder or a Hub repo) and recomputes the densities
from the tensors to check them against ``sparsity.json``.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import (
    DENSE_WEIGHTS,
    SPARSITY_FILE,
    CheckpointError,
    clear_stale_weights,
    hf_sparse_version,
    layer_stats,
)
from .formats import (
    SaveJob,
    get_format,
    read_layer_stats,
    read_state_dict,
    stored_format,
    weight_digests,
    weight_files,
)
from .model_io import (
    build_timm,
    check_dtypes,
    load_into,
    raise_shape_mismatch,
    read_config,
    resize,
    save_model,
    saved_names,
    task_of,
    transformers_class,
    unwrap,
)
from .verify import read_sparsity, verify_densities, verify_digests

if TYPE_CHECKING:  # torch is imported where tensors are built: `hf-sparse inspect` reads files with numpy only
    import torch
    from torch import nn

RUNTIMES = ("dense", "sparse", "onnx")  # load_sparse(runtime=...): as saved, on the sparse kernels, on ONNX Runtime
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


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


def save_sparse_checkpoint(model: nn.Module, out_dir: str | Path, *, report: dict, recipe_yaml: str | None = None,
                           format: str = "dense", eval_metrics: dict | None = None,
                           dense_reference: dict | None = None, structure: dict[str, list[int]] | None = None,
                           processor: Any = None, dataset: str | None = None, task: str | None = None,
                           measure_speed: bool = False, quantize: str | None = None) -> Path:
    """Write the sparse checkpoint folder ``out_dir`` and return its path.

    ``report`` is the engine's sparsity report (method, densities, ``per_layer`` keyed by parameter
    name); the weights already hold zeros where pruned. ``format`` names a storage format of
    :mod:`hf_sparse.checkpoint.formats`. ``structure`` (target name -> kept output units; default
    ``report["structure"]``) drives ``purged``; without it every unit whose removal cannot change the
    outputs goes. ``dataset`` (a Hub dataset id or name) and ``task`` feed the model card; by default
    they come from the recipe and the model class. ``measure_speed=True`` (``hf-sparse train`` and
    ``export`` ask for it) times the batch-1 CPU latency of the sparse runtime vs dense (about 0.3 s,
    only when some layer is sparse enough for the runtime) and records it as ``runtime_speed`` in
    sparsity.json and the card's Speed section; off by default, the card has none. ``quantize`` applies
    to the formats that export a graph (``onnx``: ``"int8"`` adds ``model.int8.onnx``).
    """
    fmt = get_format(format)
    inner, library, prefix = unwrap(model)
    rename = saved_names(inner)
    state = {rename[k]: v.detach() for k, v in inner.state_dict().items() if k in rename}
    layers = _report_layers(report, prefix, state, rename)
    stale = [f"{k}: report {v['nonzero']}, weights {layer_stats(state[k])['nonzero']}" for k, v in layers.items()
             if "nonzero" in v and int(v["nonzero"]) != layer_stats(state[k])["nonzero"]]
    if stale:
        warnings.warn("nonzero counts of the weights differ from the report (were the final masks applied?): "
                      + "; ".join(stale[:5]), stacklevel=2)
    job = SaveJob(model=inner, library=library, prefix=prefix, report=report, layers=layers, rename=rename,
                  structure=structure, quantize=quantize, recipe_yaml=recipe_yaml)
    fmt.check(job)
    store = fmt.storage(job)
    to_save = store.prepare(job)

    # everything that can fail on bad input has run; only now touch the output folder
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_weights(out)
    save_model(to_save, library, out)
    achieved, target = report.get("achieved_density"), report.get("target_density")
    version = report.get("hf_sparse_version") or hf_sparse_version()
    headline = {f"hf_sparse.{k}": v for k, v in {
        "method": str(report.get("method", "none")), "format": store.name, "target_density": _fmt(target),
        "achieved_density": _fmt(achieved), "version": version}.items()}
    store.encode(out, headline, job)

    from ..runtime.speed import checkpoint_speed

    sparsity = {
        "format": store.name,
        "library": library,
        "model_class": f"{type(to_save).__module__}.{type(to_save).__qualname__}",
        "timm_name": to_save.pretrained_cfg.get("architecture") if library == "timm" else None,
        "weights_file": store.weights_file,
        "method": report.get("method", "none"),
        "target_density": target,
        "target_unit": report.get("target_unit") or "weights",
        "achieved_density": achieved,
        "model_density": report.get("model_density"),
        "granularity": report.get("granularity", "unstructured"),
        "per_layer": layers,
        "method_metrics": report.get("method_metrics") or {},
        "purged": None,
        "eval": dict(eval_metrics) if eval_metrics else None,
        "dense_reference": dict(dense_reference) if dense_reference else None,
        "hf_sparse_version": version,
        "runtime_speed": checkpoint_speed(to_save) if measure_speed else None,
        **job.extra,
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

    write_model_card(out, sparsity, recipe_yaml=recipe_yaml, dataset=dataset, task=task or task_of(to_save, library))
    fmt.finish(out, job)
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
                decisions: dict | str | Path | None = None, dtype: str = "float32", **hub_kwargs) -> nn.Module:
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
    without timing; ``dtype="int8"`` stores the sparse weights as int8); ``"dense"`` (the default)
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
    if config_file.is_file() and "auto_map" in read_config(folder):
        raise CheckpointError(f"{config_file} has an auto_map: the checkpoint wants to run its own Python code, "
                              "which load_sparse never does (trust_remote_code is always False)")
    state = read_state_dict(folder)
    if model is not None or sparsity.get("library") == "torch":
        if model is None:
            raise CheckpointError(f"{folder} holds the state dict of a plain {sparsity.get('model_class')}: build "
                                  "that module and pass it as load_sparse(path, model=module)")
        check_dtypes(folder, model, state)  # before load_into, which would cast
        loaded = load_into(model, state, folder)
        _check_densities(folder, sparsity, state, verify)
        return _with_runtime(loaded.eval(), runtime, batch_sizes, decisions, dtype)
    config = read_config(folder)
    library = sparsity.get("library") or ("timm" if "architecture" in config else "transformers")
    plan = get_format(sparsity["format"]).resize_plan(sparsity) if sparsity.get("format") else None
    if library == "timm":
        model = build_timm(config, state, plan, folder)
    else:
        cls = transformers_class(sparsity, config)
        if plan and (sparsity.get("purged") or {}).get("config") is None:  # the config holds the dense widths
            model = resize(cls._from_config(cls.config_class.from_pretrained(folder)), plan)
            info = {}
            load_into(model, state, folder)
        elif stored_format(folder).weights_file != DENSE_WEIGHTS:  # a file from_pretrained cannot read
            cfg = cls.config_class.from_pretrained(folder)
            model, info = cls.from_pretrained(None, config=cfg, state_dict=state, output_loading_info=True)
        else:
            try:
                model, info = cls.from_pretrained(folder, output_loading_info=True)
            except RuntimeError as e:
                if "mismatched_sizes" not in str(e):
                    raise
                raise_shape_mismatch(folder, cls._from_config(cls.config_class.from_pretrained(folder)), state)
                raise
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys", "unexpected_keys")}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            raise CheckpointError(f"{folder}: the weights do not fit {cls.__name__}: {bad}")
    check_dtypes(folder, model, state)
    _check_densities(folder, sparsity, state, verify)
    return _with_runtime(model.eval(), runtime, batch_sizes, decisions, dtype)


def load_stored_sparse(path: str, revision: str | None = None) -> nn.Module | None:
    """A local hf_sparse checkpoint folder stored in a format of its own (bitmask, purged), loaded as saved;
    None for a dense one, which the model's Auto class builds so its head can be replaced
    (``model.path`` of a recipe; :func:`hf_sparse.models.build_model` takes it as ``load_stored``)."""
    folder = Path(path).expanduser()
    if not (folder / SPARSITY_FILE).is_file() or read_sparsity(folder).get("format", "dense") == "dense":
        return None
    return load_sparse(path, revision=revision)


def _with_runtime(model: nn.Module, runtime: str, batch_sizes: tuple[int, ...] = (1,),
                  decisions: dict | str | Path | None = None, dtype: str = "float32") -> nn.Module:
    if runtime == "dense":
        return model
    from ..runtime import to_sparse_runtime

    return to_sparse_runtime(model, inplace=True, batch_sizes=batch_sizes, decisions=decisions, dtype=dtype)


def _check_densities(folder: Path, sparsity: dict, state: dict[str, torch.Tensor], strict: bool) -> None:
    """Densities recomputed from the tensors must match ``sparsity.json`` (an error; a warning without ``strict``)."""
    problems = verify_densities(sparsity, state)
    if problems:
        message = f"{folder}: densities differ from {SPARSITY_FILE}: " + "; ".join(problems[:5])
        if strict:
            raise CheckpointError(message + " (load_sparse(..., verify=False) loads it anyway)")
        warnings.warn(message, stacklevel=3)


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
    files = {p.name: p.stat().st_size for p in weight_files(folder)}
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


__all__ = ["RUNTIMES", "CheckpointError", "inspect_checkpoint", "load_sparse", "read_sparsity", "resolve_checkpoint",
           "save_sparse_checkpoint"]
