"""``dense``: the weights with zeros where pruned, in plain ``model.safetensors``; loads in plain
transformers/timm. Every default of :class:`~hf_sparse.checkpoint.formats.CheckpointFormat`."""

from __future__ import annotations

from . import CheckpointFormat, register_format


@register_format
class Dense(CheckpointFormat):
    name = "dense"
