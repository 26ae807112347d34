"""Adding a data source, a model and a sparsity method is one registration each, in the user's own
code: this test registers a toy of each and trains them from a recipe with ``hf-sparse train``
(in-process), as docs/architecture.md describes."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_sparse.cli import main
from hf_sparse.data import DATA_SOURCES, register_data
from hf_sparse.data.idx import image_bundle, images_to_dataset
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
    try:
        recipe = tmp_path / "toy.yaml"
        recipe.write_text(
            "model: {source: hf_sparse, name: toy_stripes_linear}\n"
            "data: {name: toy_stripes}\n"
            "training: {max_steps: 30, per_device_train_batch_size: 32, learning_rate: 0.05, seed: 0}\n"
            "sparsity: {method: toy_one_shot, target_density: 0.25, targets: {include: ['hidden.weight']}}\n")
        out = tmp_path / "run"
        assert main(["train", str(recipe), "--output-dir", str(out)]) == 0, capsys.readouterr().err
        results = json.loads((out / "results.json").read_text())
        assert results["eval"]["accuracy"] >= 0.9  # stripes are easy even with a quarter of the weights
        sparsity = json.loads((out / "model" / "sparsity.json").read_text())
        assert sparsity["method"] == "toy_one_shot" and abs(sparsity["achieved_density"] - 0.25) < 1e-9
    finally:
        for registry, name in ((DATA_SOURCES, "toy_stripes"), (MODEL_REGISTRY, "toy_stripes_linear"),
                               (METHODS, "toy_one_shot")):
            registry.pop(name, None)
