"""Per-layer densities in recipes, and ``hf-sparse sensitivity`` end to end."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from hf_sparse.compare.sensitivity import Row, allocate
from hf_sparse.config.recipe import RecipeError, recipe_from_text
from tests.helpers import fast_sparsity, launch_env, make_trainer

TINY = ("model: {name: lenet300_100, config: {hidden_sizes: [32, 16]}}\n"
        "data: {max_train_samples: 256, max_eval_samples: 128}\n"
        "training: {max_steps: 30, per_device_train_batch_size: 32, learning_rate: 0.005, use_cpu: true}\n")


@pytest.mark.parametrize("method", ["gmp", "gradual", "dns"])
def test_per_layer_densities_reach_each_layer(fmnist_small, tmp_path, method):
    sparsity = fast_sparsity(method)
    sparsity["targets"] = {"density": {"fc1.*": 0.1}}
    trainer = make_trainer(fmnist_small, tmp_path, sparsity, max_steps=20)
    trainer.train()
    layers = trainer.sparsifier.per_layer()
    assert layers["fc1.weight"]["density"] == pytest.approx(0.1, abs=0.002)
    assert layers["fc2.weight"]["density"] == pytest.approx(0.3, abs=0.002)  # target_density for the rest


def test_per_layer_density_errors():
    base = "model: {name: lenet300_100}\nsparsity:\n  method: %s\n  target_density: 0.1\n  targets: {density: %s}\n"
    with pytest.raises(RecipeError, match=r"r.yaml:5:\d+: sparsity.targets.density: method 'l0' has no per-layer"):
        recipe_from_text(base % ("l0", "{fc1.weight: 0.05}"), "r.yaml")
    with pytest.raises(RecipeError, match=r"sparsity.targets.density.fc1.weight: a density must lie in \(0, 1\]"):
        recipe_from_text(base % ("gmp", "{fc1.weight: 1.5}"), "r.yaml")
    with pytest.raises(RecipeError, match="sparsity.params.scope: per-layer densities"):
        recipe_from_text(base % ("gmp", "{fc1.weight: 0.05}") + "  params: {scope: global}\n", "r.yaml")
    recipe = recipe_from_text(base % ("gmp", "{fc9.weight: 0.05}"), "r.yaml")
    assert "density" not in recipe.sparsity.targets.model_dump()  # the selection rules only ...
    assert recipe_from_text(recipe.to_yaml()).sparsity.targets.density == {"fc9.weight": 0.05}  # ... saved whole
    from hf_sparse.training.run import prepare_run

    with pytest.raises(RecipeError, match="pattern 'fc9.weight' matches no targeted weight"):
        prepare_run(recipe, "/tmp/unused")


def test_allocate_finds_the_least_predicted_loss_within_the_budget():
    rows = [Row("a", 800, ["a.w"], 0.5, 0, 0.01), Row("a", 800, ["a.w"], 0.1, 0, 0.05),
            Row("b", 200, ["b.w"], 0.5, 0, 0.20), Row("b", 200, ["b.w"], 0.1, 0, 0.60)]
    choice, loss, overall = allocate(rows, 0.3)  # 300 weights: a at 0.1 (80) and b whole (200) fit
    assert choice == {"a": 0.1, "b": 1.0} and loss == pytest.approx(0.05) and overall == pytest.approx(0.28)
    choice, loss, overall = allocate(rows, 0.1)  # only the uniform choice fits
    assert choice == {"a": 0.1, "b": 0.1} and overall == pytest.approx(0.1)
    with pytest.raises(ValueError, match="measure a density of 0.05 or lower"):
        allocate(rows, 0.05)


def test_measure_keeps_what_was_measured_when_interrupted(fmnist_small, tmp_path):
    from hf_sparse.compare.sensitivity import measure
    from hf_sparse.grids import Granularity, TargetSpec, build_grids, resolve_targets

    trainer = make_trainer(fmnist_small, tmp_path, None, max_steps=10)
    trainer.train()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    grids = build_grids(resolve_targets(trainer.model, TargetSpec()), Granularity.parse("unstructured", None))

    class CtrlC:  # Ctrl-C arrives right after the third evaluation
        n = 0

        def update(self, k):
            self.n += k
            if self.n == 3:
                raise KeyboardInterrupt

    rows = []
    with pytest.raises(KeyboardInterrupt):
        measure(trainer, grids, [0.5, 0.1], "mean", rows, CtrlC())
    assert [(r.layer, r.density) for r in rows] == [("fc1.weight", 0.5), ("fc1.weight", 0.1), ("fc2.weight", 0.5)]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n  # every layer restored


@pytest.mark.slow  # trains the recipe dense, then nine evaluations, in a subprocess: about a minute
def test_cli_writes_csv_heatmap_and_a_fragment_recipes_accept(tmp_path):
    recipe = tmp_path / "tiny_gmp.yaml"
    recipe.write_text(TINY + "sparsity: {method: gmp, target_density: 0.2, params: {start_step: 2, end_step: 20, "
                             "frequency: 2}, targets: {include_head: true}}\n")
    out = tmp_path / "sens"
    proc = subprocess.run([sys.executable, "-m", "hf_sparse", "sensitivity", str(recipe), "--densities", "0.5,0.1",
                           "--out", str(out)], capture_output=True, text=True, env=launch_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "dense" / "results.json").is_file()  # no model.path: the recipe was trained dense first
    rows = list(csv.DictReader(open(out / "sensitivity.csv")))
    assert rows[0]["layer"] == "(none)" and len(rows) == 1 + 3 * 3  # 3 layers x (0.5, 0.2 target, 0.1)
    assert {r["layer"] for r in rows[1:]} == {"fc1.weight", "fc2.weight", "classifier.weight"}
    for r in rows[1:]:
        assert float(r["drop"]) == pytest.approx(float(rows[0]["value"]) - float(r["value"]))
    assert Image.open(out / "sensitivity.png").size[0] > 100
    fragment = yaml.safe_load((out / "suggested_densities.yaml").read_text())
    densities = fragment["sparsity"]["targets"]["density"]
    assert set(densities) == {"fc1.weight", "fc2.weight", "classifier.weight"}
    sizes = {"fc1.weight": 784 * 32, "fc2.weight": 32 * 16, "classifier.weight": 16 * 10}
    assert sum(round(densities[n] * s) for n, s in sizes.items()) <= 0.2 * sum(sizes.values())
    # the fragment is a valid per-layer target for the recipe's own method
    from hf_sparse.config.recipe import load_recipe

    value = yaml.safe_dump(densities, default_flow_style=True).strip()
    again = load_recipe(recipe, [f"sparsity.targets.density={value}"])
    assert again.sparsity.targets.density == densities
