"""Recipe validation: every kind of bad input gets one message with file, line, key and what is allowed."""

from __future__ import annotations

import glob
import textwrap
from pathlib import Path

import pytest

from hf_sparse.cli import main
from hf_sparse.training.recipe import RecipeError, load_recipe, recipe_from_text

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  source: hf_sparse
  name: lenet300_100
data:
  name: fashion_mnist
training:
  num_train_epochs: 1
  learning_rate: 0.001
sparsity:
  method: gmp
  target_density: 0.1
  targets:
    exclude: ["classifier.*"]
  params:
    frequency: 10
"""


def write(tmp_path, text, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "recipes" / "*.yaml"))), ids=lambda p: Path(p).name)
def test_shipped_recipes_pass_the_schema(path):
    recipe = load_recipe(path)
    # the copy saved with a model (recipe.yaml) reads back as the same run
    assert recipe_from_text(recipe.to_yaml(), path).model_dump() == recipe.model_dump()
    if recipe.sparsity.method != "none":  # the method's own params and the granularity are valid too
        assert recipe.sparsity.method_config() is not None and recipe.sparsity.granularity_spec().kind


def test_good_recipe_and_overrides(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["sparsity.target_density=0.05", "training.seed=3",
                                            "data.path=/some/folder", "sparsity.method=dns", "sparsity.params={}",
                                            "training.num_train_epochs=2"])
    assert r.sparsity.target_density == 0.05 and r.sparsity.method == "dns"
    assert r.training == {"num_train_epochs": 2, "learning_rate": 0.001, "seed": 3}
    assert r.data.path == "/some/folder"
    assert r.sparsity.targets.exclude == ["classifier.*"]


BAD = [
    # (replace this, with this, expected line, expected key path, expected words)
    ("  name: lenet300_100\n", "  name: lenet300_100\n  colour: red\n", 4, "model.colour", "unknown key; allowed: source, name"),
    ("  target_density: 0.1", "  target_density: 1.5", 11, "sparsity.target_density", "less than or equal to 1"),
    ("  target_density: 0.1", "  target_density: 0", 11, "sparsity.target_density", "greater than 0"),
    ("  target_density: 0.1", "  target_density: lots", 11, "sparsity.target_density", "valid number"),
    ("  method: gmp", "  method: magic", 10, "sparsity.method", "unknown method 'magic'; allowed: none"),
    ("    frequency: 10", "    frequency: -1", 15, "sparsity.params.frequency", "greater than or equal to 1"),
    ("    frequency: 10", "    every: 10", 15, "sparsity.params.every", "unknown key"),
    ("  learning_rate: 0.001", "  learning_rat: 0.001", 8, "training.learning_rat", "not a transformers.TrainingArguments field"),
    ("  num_train_epochs: 1", "  num_train_epochs: many", 7, "training.num_train_epochs", "expected float/int"),
    ("  source: hf_sparse", "  source: keras", 2, "model.source", "'hf_sparse', 'timm' or 'transformers'"),
    ("data:\n", "datta:\n", 4, "datta", "unknown key; allowed: model, data, training, sparsity, export"),
    ('    exclude: ["classifier.*"]', '    layer_types: [Dense]', 13, "sparsity.targets.layer_types.0", "'Linear'"),
]


@pytest.mark.parametrize("old,new,line,key,words", BAD, ids=[b[3] for b in BAD])
def test_bad_recipe_names_file_line_key(tmp_path, capsys, old, new, line, key, words):
    path = write(tmp_path, GOOD.replace(old, new))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"{path}:{line}:" in err and f"{key}:" in err and words in err, err
    assert not out.exists()


def test_yaml_syntax_error_and_duplicate_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:3:\d+: invalid YAML"):
        load_recipe(write(tmp_path, "model:\n  name: [lenet\nsparsity: {}\n"))
    with pytest.raises(RecipeError, match=r"r.yaml:3:1: model: duplicate key 'model'"):
        load_recipe(write(tmp_path, "model:\n  name: a\nmodel:\n  name: b\n"))


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(RecipeError, match=r"<recipe>:1:8: model: YAML tag .*python/object/apply.* is not allowed"):
        recipe_from_text("model: !!python/object/apply:os.system ['echo pwned']\n")


def test_yes_no_on_off_stay_strings(tmp_path):
    """YAML 1.2 booleans: transformers' ``save_strategy: no`` must not become False."""
    r = load_recipe(write(tmp_path, GOOD.replace("  learning_rate: 0.001\n",
                                                 "  learning_rate: 0.001\n  save_strategy: no\n  bf16: false\n")),
                    ["training.eval_strategy=no", "training.use_cpu=true"])
    assert r.training["save_strategy"] == "no" and r.training["eval_strategy"] == "no"
    assert r.training["bf16"] is False and r.training["use_cpu"] is True


def test_bad_override_is_named_as_such(tmp_path):
    with pytest.raises(RecipeError, match=r"\(--set sparsity.target_density=2\): sparsity.target_density: .*less than or equal to 1"):
        load_recipe(write(tmp_path, GOOD), ["sparsity.target_density=2"])
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(write(tmp_path, GOOD), ["sparsity.target_density"])


def test_missing_requirements(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:1:1: model: required key is missing"):
        load_recipe(write(tmp_path, "data:\n  name: fashion_mnist\n"))
    with pytest.raises(RecipeError, match=r"sparsity.target_density: method 'gmp' needs a target_density"):
        load_recipe(write(tmp_path, GOOD.replace("  target_density: 0.1\n", "")))


def test_patterns_that_match_nothing_fail_before_any_work(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace('exclude: ["classifier.*"]', 'exclude: ["head.*"]'))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:13:" in err and "sparsity.targets.exclude.0: pattern 'head.*' matches no weight" in err
    assert not out.exists()


def test_bad_data_path_and_hub_id_are_clear(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("  name: fashion_mnist", f"  name: fashion_mnist\n  path: {tmp_path}/nowhere"))
    assert main(["validate", str(path)]) == 2
    assert "data.path: " in capsys.readouterr().err
    path = write(tmp_path, GOOD.replace("  name: fashion_mnist", "  hub_id: zalando-datasets/fashion_mnist"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.hub_id: " in err and "Traceback" not in err and err.count("\n") == 0


def test_method_cross_checks_are_located(tmp_path):
    text = GOOD.replace("  method: gmp", "  method: autoprune").replace("    frequency: 10", "    reg_coef: 1.0")
    with pytest.raises(RecipeError, match=r"r.yaml:15:5: sparsity.params.reg_coef: give either"):
        load_recipe(write(tmp_path, text))
