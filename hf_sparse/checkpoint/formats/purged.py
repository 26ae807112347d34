"""``purged``: for structured sparsity, the removed units and channels are physically gone and the
config describes the smaller shapes, so ``from_pretrained`` builds the small model directly.

A model whose config cannot describe the smaller shapes (timm, most transformers vision models)
records the shapes in ``sparsity.json`` (``purged.plan``); the loader builds the dense model and
resizes it to them before the weights go in.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ..files import CheckpointError, layer_stats
from . import CheckpointFormat, SaveJob, register_format

if TYPE_CHECKING:
    from torch import nn


@register_format
class Purged(CheckpointFormat):
    name = "purged"
    card_note = ("removed units/channels are physically gone, so the model is smaller and faster with the same "
                 "outputs (how it loads: see below).")

    def load_note(self, sparsity: dict[str, Any]) -> tuple[str | None, str]:
        purged = sparsity.get("purged") or {}
        if not purged.get("plan"):
            return None, ""
        if purged.get("config") is None:
            return "hf_sparse", (
                "The architecture's own config cannot express the purged widths (per layer, or at all): "
                "`config.json` describes the dense model and the purge plan in `sparsity.json` the smaller shapes, "
                "so load it with `hf_sparse.load_sparse` (it builds the model from the config, resizes it to the "
                "plan and loads the weights; nothing of hf_sparse stays in the forward pass). Plain "
                "`from_pretrained` / `timm.create_model` refuses the weights (shape mismatch) rather than building "
                "a wrong model.")
        fields = ", ".join(f"`{k}={v}`" for k, v in purged["config"].items())
        return None, f"Every layer kept the same width, so `config.json` expresses the purged shapes ({fields}). "

    def prepare(self, job: SaveJob) -> nn.Module:
        from ...structure.budget import count_params
        from ...structure.purge import PURGE_HINT_FRACTION, purge_for_export, purge_summary
        from ..model_io import saved_names

        inner = job.model
        wanted = job.structure if job.structure is not None else job.report.get("structure")
        if wanted and job.prefix:
            wanted = {k.removeprefix(job.prefix): v for k, v in wanted.items()}
        try:
            small, kept, extra = purge_for_export(inner, wanted)
        except ValueError as e:
            raise CheckpointError(f"cannot purge {type(inner).__name__}: {e}") from None
        small_rename = saved_names(small)
        small_state = {small_rename[k]: v for k, v in small.state_dict().items() if k in small_rename}
        if not extra:
            kept = {small_rename.get(k, job.rename.get(k, k)): v for k, v in kept.items()}
        info: dict[str, Any] = {"kept": kept, **extra,
                                "per_layer": {k: layer_stats(small_state[k]) for k in job.layers if k in small_state}}
        if "params" not in info:  # a self-purging model: count what went
            dense_params, purged_params = count_params(inner), count_params(small)
            info["params"] = {"dense": dense_params, "purged": purged_params,
                              "fraction": purged_params / max(dense_params, 1)}
        if info["params"]["fraction"] > 1 - PURGE_HINT_FRACTION:
            warnings.warn(purge_summary(info["params"]), stacklevel=3)
        job.extra["purged"] = info
        return small

    def resize_plan(self, sparsity: dict[str, Any]) -> dict | None:
        return (sparsity.get("purged") or {}).get("plan")
