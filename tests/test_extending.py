"""Adding a data source, a model, a sparsity method and a checkpoint format is one registration each,
in the user's own code: this test registers a toy of each, trains them from a recipe with
``hf-sparse train`` (in-process) and loads the checkpoint back, as docs/architecture.md describes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_sparse.checkpoint.files import layer_stats
from hf_sparse.checkpoint.formats import (
    CHECKPOINT_FORMATS,
    CheckpointFormat,
    read_state_dict,
    register_format,
)
from hf_sparse.cli import main
from hf_sparse.data import DATA_SOURCES, register_data
from hf_sparse.data.idx import image_bundle, images_to_dataset
from hf_sparse.grids import GRANULARITIES, Granularity, check_mask_rule, register_granularity
from hf_sparse.grids.tilings import mixes
from hf_sparse.methods import METHODS, register_method
from hf_sparse.methods.base import MaskedMethod, MethodConfig
from hf_sparse.methods.schedules import one_shot
from hf_sparse.models import MODEL_REGISTRY, register_model


class Stripes(nn.Module):
    """A two-layer classifier of 8x8 grey images."""

    def __init__(self, classes: int):
        super().__init__()
        self.hidden, self.head = nn.Linear(64, 32), nn.Linear(32, classes)

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.head(torch.relu(self.hidden(pixel_values.flatten(1))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class OneShotConfig(MethodConfig):
    pass


class OneShotMagnitude(MaskedMethod):
    """Keep the largest weights once, at the start, and hold the rest at zero."""

    name = "toy_one_shot"
    Config = OneShotConfig
    target_density_mode = "required"

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        with torch.no_grad():
            one_shot(self, self.target_density, "mean")
            self.zero_masked()

    def after_backward(self, step: int) -> None:
        self.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        self.zero_masked()


class Coordinates(CheckpointFormat):
    """Each targeted tensor as the flat indices and values of its nonzeros (COO), in its own file."""

    name = "toy_coo"
    weights_file = "model.coo.safetensors"

    def encode(self, folder, headline, job):
        from safetensors.torch import load_file, save_file

        dense = folder / "model.safetensors"
        out, shapes = {}, {}
        for name, t in load_file(str(dense)).items():
            if name in job.layers:
                flat = t.reshape(-1)
                index = flat.nonzero().squeeze(1)
                out[name + "::index"], out[name + "::values"] = index.to(torch.int32), flat[index]
                shapes[name] = list(t.shape)
            else:
                out[name] = t
        save_file(out, str(folder / self.weights_file), metadata={**headline, "shapes": json.dumps(shapes)})
        dense.unlink()

    def decode(self, folder, file, tensors):
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
        out = {k: v for k, v in tensors.items() if "::" not in k}
        for name, shape in shapes.items():
            t = torch.zeros(int(np.prod(shape)), dtype=tensors[name + "::values"].dtype)
            t[tensors[name + "::index"].long()] = tensors[name + "::values"]
            out[name] = t.reshape(shape)
        return out

    def stats(self, folder, file, stats):
        return {k: layer_stats(v) for k, v in read_state_dict(folder).items()}


def stripes_source(cfg):
    """Horizontal (label 0) or vertical (label 1) stripes with noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    lines = (np.arange(8) % 2 == 0).astype(np.float32)
    images = [np.outer(lines, np.ones(8)) if y == 0 else np.outer(np.ones(8), lines) for y in labels]
    pixels = np.clip(np.stack(images) * 200 + rng.normal(0, 20, (256, 8, 8)), 0, 255).astype(np.uint8)[:, None]
    import datasets

    dd = datasets.DatasetDict(train=images_to_dataset(pixels[:192], labels[:192]),
                              test=images_to_dataset(pixels[192:], labels[192:]))
    return image_bundle(dd, ["horizontal", "vertical"], "stripes", (1, 8, 8))


def test_a_registered_data_source_model_and_method_train_from_a_recipe(tmp_path, capsys):
    register_data("toy_stripes")(stripes_source)
    register_model("toy_stripes_linear")(lambda config, data: Stripes(data.num_labels))
    register_method(OneShotMagnitude)
    register_format(Coordinates)
    try:
        recipe = tmp_path / "toy.yaml"
        recipe.write_text(
            "model: {source: hf_sparse, name: toy_stripes_linear}\n"
            "data: {name: toy_stripes}\n"
            "training: {max_steps: 30, per_device_train_batch_size: 32, learning_rate: 0.05, seed: 0}\n"
            "sparsity: {method: toy_one_shot, target_density: 0.25, targets: {include: ['hidden.weight']}}\n"
            "export: {format: toy_coo}\n")
        out = tmp_path / "run"
        assert main(["train", str(recipe), "--output-dir", str(out)]) == 0, capsys.readouterr().err
        results = json.loads((out / "results.json").read_text())
        assert results["eval"]["accuracy"] >= 0.9  # stripes are easy even with a quarter of the weights
        sparsity = json.loads((out / "model" / "sparsity.json").read_text())
        assert sparsity["method"] == "toy_one_shot" and abs(sparsity["achieved_density"] - 0.25) < 1e-9
        assert sparsity["format"] == "toy_coo" and sorted(p.name for p in (out / "model").glob("*.safetensors")) \
            == ["model.coo.safetensors"]
        from hf_sparse import load_sparse

        loaded = load_sparse(out / "model", model=Stripes(2))  # digests and densities verified
        hidden = loaded.hidden.weight
        assert hidden.count_nonzero().item() == hidden.numel() // 4
        assert main(["inspect", str(out / "model")]) == 0
        assert "hidden.weight" in capsys.readouterr().out
    finally:
        for registry, name in ((DATA_SOURCES, "toy_stripes"), (MODEL_REGISTRY, "toy_stripes_linear"),
                               (METHODS, "toy_one_shot"), (CHECKPOINT_FORMATS, "toy_coo")):
            registry.pop(name, None)


class _Columns:
    """Input columns of a 2-D weight: column ``j`` (every row of it) is group ``j``."""

    entrywise = False

    def __init__(self, shape: torch.Size):
        self.group_shape = (shape[1],)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x.sum(0) if op == "sum" else x.amax(0)

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        return g.view(1, -1)


@dataclass(frozen=True)
class InputColumns(Granularity):
    """A toy granularity, all in one class: a Linear's input column is kept or removed whole."""

    name = "toy_columns"

    def tiling(self, shape):
        return _Columns(shape)

    def target_problem(self, target):
        return None if target.param.dim() == 2 else f"toy columns need 2-D weights; {target.name} is not"

    def mask_problem(self, weight, units=None):
        return "a column mixes kept and pruned weights" if mixes(weight, self.tiling(weight.shape)) else None

    def shard_rows(self, grid, chunks):
        raise ValueError("a column spans every row, which FSDP2's dim-0 shards split")


def test_a_registered_granularity_trains_with_an_existing_method(tmp_path, capsys):
    """One class registered from the user's code is a ``sparsity.granularity`` every grid method takes:
    gmp prunes whole input columns through ``hf-sparse train``."""
    register_data("toy_stripes_columns")(stripes_source)
    register_model("toy_stripes_columns")(lambda config, data: Stripes(data.num_labels))
    register_granularity(InputColumns)
    try:
        assert Granularity.parse("toy_columns") == InputColumns()
        sparsity = {"method": "gmp", "target_density": 0.25, "granularity": "toy_columns",
                    "targets": {"include": ["hidden.weight"]},
                    "params": {"frequency": 2, "start_fraction": 0.1, "end_fraction": 0.5}}
        recipe = tmp_path / "columns.yaml"  # JSON is YAML
        recipe.write_text(json.dumps({"model": {"source": "hf_sparse", "name": "toy_stripes_columns"},
                                      "data": {"name": "toy_stripes_columns"}, "sparsity": sparsity,
                                      "training": {"max_steps": 20, "per_device_train_batch_size": 32,
                                                   "learning_rate": 0.05, "seed": 0}}))
        out = tmp_path / "columns"
        assert main(["train", str(recipe), "--output-dir", str(out)]) == 0, capsys.readouterr().err
        sparsity = json.loads((out / "model" / "sparsity.json").read_text())
        assert sparsity["granularity"] == "toy_columns" and abs(sparsity["achieved_density"] - 0.25) < 1e-9
        from hf_sparse import load_sparse

        hidden = load_sparse(out / "model", model=Stripes(2)).hidden.weight.detach()
        assert check_mask_rule(hidden, InputColumns()) is None  # whole columns kept or pruned
        assert int((hidden != 0).any(0).sum()) == 64 // 4
    finally:
        for registry, name in ((DATA_SOURCES, "toy_stripes_columns"), (MODEL_REGISTRY, "toy_stripes_columns"),
                               (GRANULARITIES, "toy_columns")):
            registry.pop(name, None)
