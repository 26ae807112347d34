"""Build the model a recipe names, sized for its data, and check that it runs on that data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..text import first_line
from .registry import MODEL_REGISTRY

if TYPE_CHECKING:
    from ..data import DataBundle

#: Loads a saved checkpoint folder stored in a non-dense format (path, revision) -> model, or None.
StoredLoader = Callable[[str, "str | None"], "nn.Module | None"]

_DEFAULT_AUTO_CLASS = {
    "image-classification": "AutoModelForImageClassification",
    "audio-classification": "AutoModelForAudioClassification",
    "ctc": "AutoModelForCTC",
}


class TimmClassifier(nn.Module):
    """Lets a timm model train under ``transformers.Trainer``.

    timm models take a positional tensor and return bare logits; Trainer passes keyword inputs
    and wants a loss. The timm model itself is ``.model`` (exported on its own, loadable by timm).
    """

    accepts_loss_kwargs = False  # a mean loss: Trainer must scale it for gradient accumulation

    def __init__(self, model: nn.Module, timm_name: str):
        super().__init__()
        self.model = model
        self.timm_name = timm_name

    def forward(self, pixel_values, labels=None, **kwargs) -> ImageClassifierOutput:
        logits = self.model(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def timm_channel_stats(model: nn.Module, in_chans: int) -> dict[str, tuple[float, ...]]:
    """The pretrained config's mean/std refitted to ``in_chans`` channels (their average, repeated).

    timm keeps ImageNet's three values for a 1-channel model and warns each time it resolves
    them (on every export); refitting once says the same thing quietly.
    """
    out = {}
    for key in ("mean", "std"):
        value = model.pretrained_cfg.get(key)
        if isinstance(value, (list, tuple)) and len(value) not in (1, in_chans):
            out[key] = (sum(value) / len(value),) * in_chans
    return out


def _build_timm(cfg, data: DataBundle) -> nn.Module:
    import timm

    from ..data.resize import adopt_timm_preprocessing

    name, overlay, pretrained = _timm_source(cfg)
    in_chans = data.info.get("num_channels", 3)
    kwargs = {"num_classes": data.num_labels, "in_chans": in_chans, **cfg.kwargs}
    if overlay:
        kwargs["pretrained_cfg_overlay"] = {**overlay, **kwargs.get("pretrained_cfg_overlay", {})}
    # timm drops the checkpoint's classifier when num_classes differs and adapts the stem to in_chans
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, **timm_channel_stats(model, kwargs["in_chans"])}
    if data.label_names:  # saved as the checkpoint's label_names: pipelines and timm name the classes
        model.pretrained_cfg["label_names"] = list(data.label_names)
    adopt_timm_preprocessing(data, model, pretrained)
    return TimmClassifier(model, model.pretrained_cfg.get("architecture") or name)


#: Weight files timm reads through ``pretrained_cfg_overlay={"file": ...}``.
TIMM_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _timm_source(cfg) -> tuple[str, dict, bool]:
    """(name for ``timm.create_model``, ``pretrained_cfg`` overlay, whether weights are loaded).

    ``model.path`` is a folder written by ``save_for_hf``/``push_to_hf_hub`` (read as timm's
    ``local-dir:``) or one weights file for ``model.name``'s architecture. Weights named by the
    Hub (``pretrained: true``, ``hf-hub:``) are looked up in the local cache, then the Hub is asked
    once: without it the run stops at once with a message naming ``model.path``.
    """
    import timm
    from timm.models import parse_model_name

    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise PretrainedError(f"{path} holds no config.json: a timm folder is what timm's save_for_hf "
                                      "writes (config.json + model.safetensors)", "path")
            return f"local-dir:{path.resolve()}", {}, True
        if not path.is_file():
            raise PretrainedError(f"{path} does not exist (a timm folder or a weights file)", "path")
        if not path.name.endswith(TIMM_WEIGHT_SUFFIXES):
            raise PretrainedError(f"{path.name}: timm reads weight files ending in "
                                  f"{', '.join(TIMM_WEIGHT_SUFFIXES)}", "path")
        if not cfg.name or not timm.is_model(parse_model_name(cfg.name)[1]):
            raise PretrainedError(f"a weights file needs model.name to say its timm architecture, got {cfg.name!r}",
                                  "name")
        return cfg.name, {"file": str(path.resolve()), **_file_head(path, cfg.name)}, True
    try:
        source, model_id = parse_model_name(cfg.name)
    except ValueError as e:
        raise PretrainedError(str(e), "name") from None
    if source == "local-dir":
        if not (Path(model_id).expanduser() / "config.json").is_file():
            raise PretrainedError(f"{model_id} holds no config.json (timm's save_for_hf writes one)", "name")
        return f"local-dir:{Path(model_id).expanduser().resolve()}", {}, True
    if source == "hf-hub":
        _require_hub(model_id.partition("@")[0], "config.json", "name")
        return cfg.name, {}, True
    if not timm.is_model(model_id):
        raise PretrainedError(f"unknown timm model {cfg.name!r}", "name")
    if cfg.pretrained:
        hub_id = timm.models.get_pretrained_cfg(model_id)
        hub_id = getattr(hub_id, "hf_hub_id", None)
        if hub_id:
            _require_hub(hub_id, "model.safetensors", "pretrained", also="pytorch_model.bin")
    return cfg.name, {}, cfg.pretrained


def _file_head(path: Path, name: str) -> dict:
    """``num_classes`` of the classifier stored in a weights file, so timm keeps a head that fits the
    data instead of dropping it as a mismatch against the registry's default (1000 for ImageNet)."""
    import timm

    classifier = timm.models.get_pretrained_cfg(timm.models.parse_model_name(name)[1].split(".")[0])
    classifier = getattr(classifier, "classifier", None) if classifier else None
    if not isinstance(classifier, str):
        return {}
    try:
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                shape = f.get_slice(f"{classifier}.weight").get_shape() if f"{classifier}.weight" in f.keys() else None
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else {}
            weight = state.get(f"{classifier}.weight")
            shape = list(weight.shape) if weight is not None else None
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's to fix, said plainly
        raise PretrainedError(f"{path}: not a readable weights file ({first_line(e)})", "path") from None
    return {"num_classes": int(shape[0])} if shape else {}


class PretrainedError(ValueError):
    """Pretrained weights that cannot be used; ``key`` is the ``model`` recipe key to fix."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def _require_hub(repo_id: str, filename: str, key: str, also: str | None = None, revision: str | None = None) -> None:
    """Weights of a Hub repo are in the local cache or the Hub answers; otherwise stop at once (the
    client's own retries take about a minute) with a message naming the local alternative."""
    from ..hub_probe import hub_problem

    problem = hub_problem(repo_id, cached_files=tuple(n for n in (filename, also) if n), revision=revision)
    if problem:
        raise PretrainedError(f"cannot get {repo_id!r} from the Hub ({problem}) and it is not in the local "
                              "cache: download the checkpoint where there is a connection and set model.path to "
                              "its folder (or file)", key)


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~"))


def _from_pretrained(auto, cfg, labels: dict, overrides: dict) -> nn.Module:
    """``auto.from_pretrained(model.path)`` with the recipe's labels; a head whose size differs is
    replaced only when ``model.ignore_mismatched_sizes`` says so (as transformers' own scripts do)."""
    if not _is_local(cfg.path):
        _require_hub(cfg.path, "config.json", "path", revision=cfg.revision)
    elif not Path(cfg.path).expanduser().is_dir():
        raise PretrainedError(f"{cfg.path} is not a checkpoint folder", "path")
    kwargs = {**labels, **overrides, "ignore_mismatched_sizes": cfg.ignore_mismatched_sizes}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        return auto.from_pretrained(cfg.path, **kwargs)
    except (RuntimeError, ValueError) as e:
        if "ignore_mismatched_sizes" in str(e) or "size mismatch" in str(e):
            raise PretrainedError(f"the checkpoint's weights do not fit the model for this data "
                                  f"({first_line(e)[:200]}); to replace the head with one for the data's "
                                  f"{labels.get('num_labels', '?')} labels, set model.ignore_mismatched_sizes: true",
                                  "ignore_mismatched_sizes") from None
        raise


def build_model(cfg, data: DataBundle, load_stored: StoredLoader | None = None) -> nn.Module:
    """``cfg`` is a ``recipe.ModelConfig``. Raises ValueError with a plain message on bad names.

    With ``cfg.path`` the model starts from pretrained weights (a transformers or hf_sparse checkpoint
    folder or Hub id, a timm folder or weights file); the data decides the head. ``load_stored(path,
    revision)`` loads an hf_sparse checkpoint folder whose weights are stored in a format of its own
    (None for a dense one); the checkpoint layer above supplies it.
    """
    if cfg.source == "timm":
        return _build_timm(cfg, data)
    labels = {"num_labels": data.num_labels}
    if data.label_names:
        labels["id2label"] = dict(enumerate(data.label_names))
        labels["label2id"] = {n: i for i, n in enumerate(data.label_names)}
    if cfg.source == "hf_sparse":
        if cfg.path:
            return _from_hf_sparse_checkpoint(cfg, data, labels, load_stored)
        if cfg.name not in MODEL_REGISTRY:
            raise ValueError(f"unknown hf_sparse model {cfg.name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
        return MODEL_REGISTRY[cfg.name](dict(cfg.config), data)
    import transformers

    auto = getattr(transformers, cfg.auto_class or _DEFAULT_AUTO_CLASS[data.task], None)
    if auto is None:
        raise ValueError(f"transformers has no class {cfg.auto_class!r}")
    if cfg.path:
        return _from_pretrained(auto, cfg, labels, dict(cfg.config))
    config_kwargs = dict(cfg.config)
    model_type = config_kwargs.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_kwargs, **labels)
    if data.task == "image-classification":
        for key in ("num_channels", "image_size"):
            if key in config.to_dict() and key in data.info and key not in config_kwargs:
                setattr(config, key, data.info[key])
    return auto.from_config(config)


def _from_hf_sparse_checkpoint(cfg, data: DataBundle, labels: dict, load_stored: StoredLoader | None) -> nn.Module:
    """A saved hf_sparse checkpoint as the starting point: "train dense, then sparsify it" is one recipe.
    Dense folders load through the model's Auto class, so a head for other labels is replaced as with
    transformers checkpoints; a folder stored in another format (bitmask, purged) is what ``load_stored``
    returns, loaded as saved."""
    import transformers

    folder = Path(cfg.path).expanduser()
    if not _is_local(cfg.path):
        _require_hub(cfg.path, "config.json", "path", revision=cfg.revision)
    elif not folder.is_dir():
        raise PretrainedError(f"{cfg.path} is not a checkpoint folder", "path")
    model = load_stored(cfg.path, cfg.revision) if load_stored is not None and folder.is_dir() else None
    if model is None:
        overrides = dict(cfg.config)
        if data.task == "ctc":  # the data's vocabulary sizes the CTC head
            overrides.setdefault("vocab_size", data.num_labels)
        return _from_pretrained(getattr(transformers, _DEFAULT_AUTO_CLASS[data.task]), cfg, labels, overrides)
    if cfg.config:
        raise PretrainedError("a sparse (bitmask or purged) checkpoint is loaded as saved; model.config cannot "
                              "change it", "config")
    saved = getattr(getattr(model, "config", None), "num_labels", None)
    if saved != labels["num_labels"] and data.task != "ctc":
        raise PretrainedError(f"the sparse checkpoint has {saved} labels and the data {labels['num_labels']}; "
                              "start from its dense export to replace the head", "path")
    return model


def forward_problem(model: nn.Module, data: DataBundle) -> str | None:
    """Run ``model`` once on two evaluation examples; a sentence on why it fails, or None.

    Catches what only shows at the first training step, such as images smaller than the
    network's downsampling (``Kernel size can't be greater than actual input size``). Eval mode
    and no gradients: no dropout draws, no BatchNorm statistics change, so training is unaffected.
    """
    rows = [data.eval[i] for i in range(min(2, len(data.eval)))]
    if not rows:
        return None
    batch = data.collator(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**batch)
    # TypeError: inputs the model does not take; AssertionError: torch._assert shape checks
    # (timm's fixed-size patch embeddings: "Input height (28) doesn't match model (224)")
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
        first = first_line(e)
        shape = tuple(batch["pixel_values"].shape[1:]) if "pixel_values" in batch else None
        where = f" on {'×'.join(map(str, shape))} inputs" if shape else ""
        return f"the model fails on a batch of the data{where} ({first}){_size_hint(model, shape)}"
    finally:
        model.train(was_training)
    return None


def _size_hint(model: nn.Module, shape: tuple[int, ...] | None) -> str:
    """What to change when images are the wrong size for the model."""
    if not shape or len(shape) != 3:
        return ""
    patch_embed = getattr(getattr(model, "model", None), "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if getattr(patch_embed, "strict_img_size", False) and size and tuple(size) != tuple(shape[1:]):
        # timm ViT-style models are built for one input size; img_size rebuilds them for another
        return (f"; the model is built for {'×'.join(map(str, size))} images: set data.image_size: {size[0]}, "
                f"or model.kwargs: {{img_size: {shape[-1]}}}")
    return "; set data.image_size to a larger size"
