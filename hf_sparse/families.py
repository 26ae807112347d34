"""What hf_sparse knows about each model family, in one place: which library a model comes from
(hf_sparse's own models and transformers' ``PreTrainedModel``, timm, or plain torch), how to reach
the model inside hf_sparse's Trainer wrapper of a timm model, an input each family accepts, and
which attention modules have heads that can be grouped and removed.

A top-level module (duck-typed, importing no model library): the channel groups, the purge, the
runtime's speed measurement and the checkpoint all read it, so a new family is taught here once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is looked at: `hf-sparse inspect` and the CLI parser need none
    import torch
    from torch import nn


def is_transformers_model(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # a model of that library cannot exist without it being imported
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def unwrap(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(the library's own model, its library, the prefix its parameter names carry in ``model``).

    hf_sparse's Trainer wrapper of a timm model (``hf_sparse.models.build.TimmClassifier``: a
    ``timm_name`` and the timm model as ``.model``) unwraps to the timm model under ``"model."``. Any
    other ``nn.Module`` is library ``torch``.
    """
    from torch import nn

    if is_transformers_model(model):
        return model, "transformers", ""
    inner, name = getattr(model, "model", None), getattr(model, "timm_name", None)
    if isinstance(inner, nn.Module) and isinstance(name, str):
        return inner, "timm", "model."
    if isinstance(getattr(model, "pretrained_cfg", None), dict) and "architecture" in model.pretrained_cfg:
        return model, "timm", ""
    return model, "torch", ""


def example_inputs(model: nn.Module, frames: int = 50) -> torch.Tensor | dict[str, torch.Tensor]:
    """One small batch-1 input the model accepts: for tracing its groups, counting MACs and timing it.

    timm: ``(1, in_chans, H, W)`` at the model's fixed image size (ViT-like, or ``pretrained_cfg``'s
    ``fixed_input_size``), else 64x64 (a CNN takes
    any size; removing channels never changes output positions, so MAC fractions do not depend on
    it much); a timm model whose first layer is no conv (CSATv2's DCT stem) gets ``pretrained_cfg``'s
    channels. transformers vision models: ``pixel_values`` at ``config.image_size`` (packed patches with
    their mask and grid where the vision config counts patches instead: SigLIP2); speech models:
    ``frames`` frames of ``num_mel_bins`` features.
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    model = unwrap(model)[0]  # hf_sparse's Trainer wrapper of a timm model: the same positional input
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_mel_bins"):
        return {"input_features": torch.randn(1, frames, int(config.num_mel_bins), generator=gen)}
    vision = getattr(config, "vision_config", None) or config
    if getattr(vision, "num_patches", None) and getattr(vision, "patch_size", None) and not getattr(vision, "image_size", None):
        # packed patches (SigLIP2): (batch, patches, channels * patch * patch), a mask and the patch grid
        side, patch = int(int(vision.num_patches) ** 0.5), int(vision.patch_size)
        return {"pixel_values": torch.randn(1, side * side, int(getattr(vision, "num_channels", 3)) * patch * patch,
                                            generator=gen),
                "pixel_attention_mask": torch.ones(1, side * side, dtype=torch.long),
                "spatial_shapes": torch.tensor([[side, side]])}
    if config is not None and not hasattr(config, "image_size") and hasattr(getattr(config, "vision_config", None),
                                                                           "image_size"):
        config = config.vision_config  # a vision tower's classifier (CLIP, SigLIP): its tower's input
    if config is not None and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(1, int(getattr(config, "num_channels", 3)), int(size), int(size),
                                            generator=gen)}
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = first.in_channels if first is not None else 3
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is not None and getattr(model.patch_embed, "strict_img_size", True):
        h, w = (size, size) if isinstance(size, int) else size
    elif cfg.get("fixed_input_size") and len(cfg.get("input_size") or ()) == 3:  # timm: this size only
        h, w = cfg["input_size"][1:]
    elif len(cfg.get("input_size") or ()) == 3 and not _runs(model, torch.zeros(1, chans, 64, 64)):
        h, w = cfg["input_size"][1:]  # too small for its downsampling (Inception's stem): its own size
        if not _runs(model, torch.zeros(1, chans, h, w)):  # a first layer that is no conv (CSATv2's DCT stem)
            chans = int(cfg["input_size"][0])
    else:
        h = w = 64
    return torch.randn(1, chans, int(h), int(w), generator=gen)


#: ``config.model_type`` of hf_sparse's own speech models (features in, per-utterance lengths).
SPEECH_MODEL_TYPE = "hf_sparse_speech_rnn"


@dataclass(frozen=True)
class GraphSignature:
    """What an exported graph (ONNX) of the model takes and gives: the model's own keyword names,
    whether it is called with keywords, and which axes vary (batch always)."""

    inputs: list[str]
    outputs: list[str]
    keywords: bool
    dynamic_axes: dict[str, dict[int, str]]


def _is_speech(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == SPEECH_MODEL_TYPE


def graph_signature(model: nn.Module) -> GraphSignature:
    """Speech models: features and ``attention_mask`` over a dynamic number of frames, so padded
    batches give each utterance its own result; CTC heads also return ``output_lengths``. Vision
    models: ``pixel_values``, of any height and width for a timm CNN (a checkpoint trained at 28x28
    still names its pretrained 224)."""
    if _is_speech(model):
        ctc = hasattr(model, "lm_head")
        inputs, outputs = ["input_features", "attention_mask"], ["logits", "output_lengths"] if ctc else ["logits"]
        axes = {name: {0: "batch"} for name in inputs + outputs}
        axes["input_features"][1] = axes["attention_mask"][1] = "frames"
        if ctc:
            axes["logits"][1] = "output_frames"
        return GraphSignature(inputs, outputs, True, axes)
    axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and not cfg.get("fixed_input_size", True):
        axes["pixel_values"].update({2: "height", 3: "width"})
    return GraphSignature(["pixel_values"], ["logits"], False, axes)


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model was trained on, from its config or timm's pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"]
        first = next((m for m in model.modules() if hasattr(m, "in_channels")), None)
        return (int(first.in_channels) if first is not None else int(c)), int(h), int(w)
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if size is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__} (no config.image_size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(config, "num_channels", 1) or 1), int(h), int(w)


def example_batch(model: nn.Module, batch: int = 4, frames: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch of :func:`graph_signature`'s inputs, to export a graph and check it against the
    model: images at the size the model was trained on; speech padded (the lengths differ)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if _is_speech(model):
        feats = torch.randn(batch, frames, model.config.num_mel_bins, generator=g)
        lengths = torch.linspace(frames, max(frames // 3, 1), batch).round().long()
        mask = (torch.arange(frames)[None, :] < lengths[:, None]).long()
        return {"input_features": feats, "attention_mask": mask}
    return {"pixel_values": torch.randn(batch, *image_shape(model), generator=g)}


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` (in eval mode, without autograd) takes ``x``."""
    import torch

    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
        return True
    except Exception:  # noqa: BLE001 - any failure: the input does not fit
        return False
    finally:
        model.train(was_training)


def join_name(*parts: str) -> str:
    """A dotted module or parameter name from its parts, the empty ones (the model's root) left out."""
    return ".".join(p for p in parts if p)


# -- attention blocks ----------------------------------------------------------------------------------------

#: The attention modules whose heads are grouped (``structure.groups``) and purged
#: (``structure.purge``), by ``"module:Class"``, with their layout: ``fused`` (timm: one ``qkv``
#: Linear of 3 x heads x head_dim rows and ``proj``) or ``separate`` (transformers: ``q_proj``,
#: ``k_proj``, ``v_proj`` and ``o_proj``). A class that cannot be imported (another library release)
#: is skipped. Teach a new attention here; both readers follow.
ATTENTION_CLASSES: dict[str, str] = {
    "timm.layers:Attention": "fused",
    "transformers.models.vit.modeling_vit:ViTAttention": "separate",
    "transformers.models.swin.modeling_swin:SwinAttention": "separate",
}

#: Modules inside an attention block that hold a per-head parameter besides the projections, by
#: ``"module:Class"``: (the parameter's name, the dimension that counts heads). Swin's relative-position
#: bias table is (positions, heads); its lookups view the heads as ``-1``, so slicing the column is the
#: whole purge.
PER_HEAD_HOLDERS: dict[str, tuple[str, int]] = {
    "transformers.models.swin.modeling_swin:SwinRelativePositionBias": ("relative_position_bias_table", 1),
}


@dataclass(frozen=True)
class AttentionBlock:
    """One attention module's head layout, with names relative to the model."""

    qkv: tuple[str, ...]  # the projections computing q, k and v: one fused Linear or three
    proj: str  # the output projection, reading heads x head_dim columns
    heads: int
    head_dim: int
    per_head: tuple[tuple[str, int], ...] = ()  # other parameters with a head dimension: (name, dim)


def _import_classes(table: dict[str, object]) -> list[tuple[type, object]]:
    """``(class, value)`` of each importable ``"module:Class"`` key of ``table``."""
    import importlib

    found = []
    for path, value in table.items():
        module, _, name = path.partition(":")
        try:
            found.append((getattr(importlib.import_module(module), name), value))
        except (ImportError, AttributeError):  # pragma: no cover - a release without it
            continue
    return found


def attention_classes() -> list[tuple[type, str]]:
    """``(class, layout)`` of each importable entry of :data:`ATTENTION_CLASSES`."""
    return _import_classes(ATTENTION_CLASSES)


def per_head_holders() -> list[tuple[type, tuple[str, int]]]:
    """``(class, (parameter, head dim))`` of each importable entry of :data:`PER_HEAD_HOLDERS`."""
    return _import_classes(PER_HEAD_HOLDERS)


def attention_blocks(model: nn.Module) -> dict[str, AttentionBlock]:
    """Every attention module of :data:`ATTENTION_CLASSES` in ``model``, by its name."""
    from torch import nn

    classes, holders = attention_classes(), per_head_holders()
    found: dict[str, AttentionBlock] = {}
    for name, m in model.named_modules():
        layout = next((lay for cls, lay in classes if isinstance(m, cls)), None)
        if layout == "fused" and isinstance(getattr(m, "qkv", None), nn.Linear):
            qkv, proj = (join_name(name, "qkv"),), join_name(name, "proj")
            heads, head_dim = int(m.num_heads), int(m.head_dim)
        elif layout == "separate" and all(isinstance(getattr(m, a, None), nn.Linear)
                                          for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            head_dim = int(m.head_dim)
            qkv = tuple(join_name(name, a) for a in ("q_proj", "k_proj", "v_proj"))
            proj, heads = join_name(name, "o_proj"), m.q_proj.out_features // head_dim
        else:
            continue
        per_head = tuple((join_name(name, sub, tensor), dim) for sub, inner in m.named_modules()
                         for cls, (tensor, dim) in holders if isinstance(inner, cls))
        found[name] = AttentionBlock(qkv, proj, heads, head_dim, per_head)
    return found
