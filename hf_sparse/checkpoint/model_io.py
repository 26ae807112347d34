"""What the checkpoint needs to know about each model family (transformers, timm, plain torch):
how to tell them apart, save them, name their weights on disk, and build them back from a folder."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..families import is_transformers_model, unwrap
from .files import DENSE_WEIGHTS, SPARSITY_FILE, CheckpointError, checked_file, read_json

if TYPE_CHECKING:
    import torch
    from torch import nn


def saved_names(model: nn.Module) -> dict[str, str]:
    """In-memory state-dict name -> the name the saved file uses.

    transformers 5 renames weights on ``save_pretrained`` (ViT's ``layers.0.attention.q_proj`` is
    written as ``encoder.layer.0.attention.attention.query``) through its conversion mapping; this
    runs that same mapping and pairs names by tensor identity, so ``sparsity.json`` and the bitmask
    encoding use the names on disk. Names that a converter merges or splits have no partner and
    are left out; timm and plain modules save names unchanged.
    """
    state = model.state_dict()
    if not is_transformers_model(model):
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


def save_model(model: nn.Module, library: str, folder: Path) -> None:
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


def task_of(model: nn.Module, library: str) -> str | None:
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


def read_config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder} has no config.json, so the model cannot be built")
    return read_json(checked_file(folder, "config.json"))


def transformers_class(sparsity: dict, config: dict) -> type:
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


def build_timm(config: dict, state: dict[str, torch.Tensor], plan: dict | None = None,
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
        resize(model, plan)
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) == 1:  # saved in one precision (bf16...): build in it, as transformers does from its config
        model.to(floats.pop())
    check_dtypes(folder, model, state)  # before load_state_dict, which would cast
    model.load_state_dict(state, strict=True)
    return model


def resize(model: nn.Module, plan: dict) -> nn.Module:
    from ..structure.purge import PurgeError, resize_to_plan

    try:
        return resize_to_plan(model, plan)
    except PurgeError as e:
        raise CheckpointError(f"the purge plan in {SPARSITY_FILE} does not fit {type(model).__name__}: {e}") from None


#: timm ``create_model`` arguments that read files or fetch weights: a checkpoint's config never passes them.
_UNSAFE_TIMM_ARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                               "cache_dir", "pretrained_strict"})


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "the checkpoint") -> nn.Module:
    """Copy a saved state dict (names as on disk) into ``model`` in place; every tensor must fit.

    ``model`` may be the module that was saved or hf_sparse's timm wrapper around it.
    """
    inner = unwrap(model)[0]
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


def raise_shape_mismatch(folder: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Name the first stored tensor whose shape differs from the model's (transformers' own error names none)."""
    memory = model.state_dict()
    for name, saved in saved_names(model).items():
        if saved in state and tuple(state[saved].shape) != tuple(memory[name].shape):
            raise CheckpointError(f"{folder}: {saved} has shape {list(state[saved].shape)} in the weights, the model "
                                  f"built from config.json expects {list(memory[name].shape)}")


def check_dtypes(folder: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every stored tensor must have the dtype of the model tensor it fills: loading casts silently,
    which would pass off replaced weights (int8 or float16 where the model holds float32)."""
    inner = unwrap(model)[0]
    memory = inner.state_dict()
    for name, saved in saved_names(inner).items():
        if saved in state and state[saved].dtype != memory[name].dtype:
            raise CheckpointError(f"{folder}: {saved} is stored as {str(state[saved].dtype).removeprefix('torch.')}, "
                                  f"but the model holds {str(memory[name].dtype).removeprefix('torch.')}; the "
                                  "weights were not written with this model")
