"""The sparsity report: one typed record of what a run's sparsity came to.

``Sparsifier.report`` builds it at the end of training. ``results.json`` takes its headline fields
(:meth:`SparsityReport.results_fields`), ``sparsity.json`` stores it whole next to the weights
(:meth:`SparsityReport.to_dict`), and ``hf-sparse inspect`` and the model card read it back from
there (:meth:`SparsityReport.from_dict`), so the four agree on names and types.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__


class LayerReport(BaseModel):
    """One targeted weight: kept entries, size and shape."""

    model_config = ConfigDict(extra="allow")  # checkpoints may add facts (e.g. the purged shape)

    density: float
    nonzero: int
    numel: int
    shape: list[int] = Field(default_factory=list)
    layer_type: str | None = None


class SparsityReport(BaseModel):
    """What the sparsity method achieved; ``achieved_density`` always counts targeted weights."""

    method: str = "none"
    target_density: float | None = None
    target_unit: str = Field("weights", description="what target_density counts: weights, or gates (L0 count: gates)")
    achieved_density: float = 1.0
    model_density: float | None = Field(None, description="nonzero fraction of all parameters")
    granularity: str = "unstructured"
    per_layer: dict[str, LayerReport] = Field(default_factory=dict)
    structure: dict[str, list[int]] | None = Field(None, description="channel granularity: kept units per target")
    method_metrics: dict[str, float] = Field(default_factory=dict, description="the method's own final state")
    hf_sparse_version: str = __version__

    def results_fields(self) -> dict[str, Any]:
        """The sparsity part of ``results.json`` (per-layer figures as plain densities)."""
        return {"method": self.method, "target_density": self.target_density, "target_unit": self.target_unit,
                "achieved_density": self.achieved_density, "model_density": self.model_density,
                "granularity": self.granularity,
                "per_layer": {name: v.density for name, v in self.per_layer.items()},
                "method_metrics": self.method_metrics}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``sparsity.json`` stores)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityReport:
        """Read the report's fields out of a ``sparsity.json`` (or any dict holding them)."""
        return cls.model_validate({k: data[k] for k in cls.model_fields if data.get(k) is not None})
