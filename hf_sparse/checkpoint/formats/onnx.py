"""``onnx``: the purged (structured runs) or dense checkpoint, plus ``model.onnx`` exported from it
and checked against it (``quantize="int8"``: also ``model.int8.onnx``); ``sparsity.json`` records
the storage format of the weights. The graph export itself is :mod:`hf_sparse.checkpoint.onnx_export`."""

from __future__ import annotations

from pathlib import Path

from . import CHECKPOINT_FORMATS, CheckpointFormat, SaveJob, register_format


@register_format
class Onnx(CheckpointFormat):
    name = "onnx"
    quantizes = True

    def check(self, job: SaveJob) -> None:
        from ..onnx_export import require_onnx

        require_onnx()

    def storage(self, job: SaveJob) -> CheckpointFormat:
        from ..onnx_export import is_structured

        return CHECKPOINT_FORMATS["purged" if is_structured(job.report) else "dense"]

    def finish(self, folder: Path, job: SaveJob) -> None:
        from ..onnx_export import add_onnx

        add_onnx(folder, quantize=job.quantize, recipe_yaml=job.recipe_yaml)
