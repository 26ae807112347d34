"""Recipe validation: every kind of bad input gets one message with file, line, key and what is allowed."""

from __future__ import annotations

import glob
import re
import textwrap
import time
from pathlib import Path

import pytest

from hf_sparse.cli import main
from hf_sparse.config.recipe import RecipeError, load_recipe, recipe_from_text

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
    path = write(tmp_path, GOOD.replace('exclude: ["classifier.*"]', 'include: ["head.*"]'))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:13:" in err and "sparsity.targets.include.0: pattern 'head.*' matches no weight" in err
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


# -- hostile YAML: bounded time and memory, one located line --------------------------------------

LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{a}: &{a} [{', '.join([f'*{p}'] * 9)}]\n" for p, a in zip("abcdef", "bcdefg"))  # 9**7 strings


@pytest.mark.parametrize("text,where,words", [
    ("zz: &r [*r]\n", "r.yaml:1:5:", "alias refers to a node that contains it"),
    ("[" * 20000, "r.yaml:1:51:", "nested more than 50 levels"),
    (LAUGHS, "r.yaml:", "expands to more than 10000 values"),
    ("", "r.yaml:1:1:", "the recipe is empty"),
    ("# only a comment\n", "r.yaml:1:1:", "the recipe is empty"),
    (GOOD + "\x00", "r.yaml:16:1:", "NUL"),
    (GOOD + "1: 2\n", "r.yaml:16:1:", "keys must be strings"),
    ("model: !!binary aGk=\n", "r.yaml:1:8:", "YAML tag"),
], ids=["self-alias", "deep", "billion-laughs", "empty", "comment-only", "nul", "int-key", "tag"])
def test_hostile_yaml_is_located_and_bounded(tmp_path, capsys, text, where, words):
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode())
    started = time.perf_counter()
    with pytest.raises(RecipeError):
        load_recipe(path)
    assert time.perf_counter() - started < 5  # the billion laughs took 70 s and 4.3 GB before
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:" in err and where.removeprefix("r.yaml") in err and words in err, err


def test_encodings(tmp_path, capsys):
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(GOOD.encode("utf-16"))  # with a byte-order mark: YAML allows it
    assert load_recipe(utf16).model.name == "lenet300_100"
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"model:\n  name: \xff\xfe\x80\n")
    assert main(["validate", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{junk}:2:9: not UTF-8 text" in err and err.count("\n") == 0
    bare16 = tmp_path / "bare16.yaml"
    bare16.write_bytes(GOOD.encode("utf-16-le"))
    with pytest.raises(RecipeError, match=r"bare16.yaml:1:2: .*NUL bytes"):
        load_recipe(bare16)


def test_set_values_follow_yaml_1_2_numbers(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["training.learning_rate=1e-4", "training.seed=010",
                                            "training.logging_steps=0x10", "data.max_train_samples=0o17"])
    assert r.training["learning_rate"] == 1e-4 and r.training["seed"] == 10
    assert r.training["logging_steps"] == 16 and r.data.max_train_samples == 15
    r = load_recipe(write(tmp_path, GOOD.replace("learning_rate: 0.001", "learning_rate: 1e-3")))
    assert r.training["learning_rate"] == 1e-3


@pytest.mark.parametrize("arg", ["=\r", "=\x85", "model.name=a\nb: c", "zz\u2028=1"])
def test_line_breaks_in_set_arguments_stay_on_one_line(tmp_path, capsys, arg):
    """Found by the fuzzer: a --set argument with a line break made the message two lines."""
    assert main(["validate", str(write(tmp_path, GOOD)), "--set", arg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-sparse: error: ") and "(--set " in err, err


def test_set_of_an_unknown_section_blames_the_argument(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml \(--set zz.bar=1\): zz: unknown key"):
        load_recipe(write(tmp_path, GOOD), ["zz.bar=1"])


@pytest.mark.parametrize("sets,key,words", [
    (["training.learning_rate=.nan"], "training.learning_rate", "finite"),
    (["sparsity.method=l0", "sparsity.params={gate_lr: .inf}"], "sparsity.params.gate_lr", "finite"),
    (["sparsity.params.start_fraction=0.9", "sparsity.params.end_fraction=0.1"], "sparsity.params.start_fraction",
     "reversed"),
    (["sparsity.method=none"], "sparsity.target_density", "method 'none' trains dense"),
])
def test_meaningless_values_fail_at_load(tmp_path, sets, key, words):
    with pytest.raises(RecipeError, match=rf"(\(--set [^)]*\)|r.yaml:\d+:\d+): {re.escape(key)}: .*{words}"):
        load_recipe(write(tmp_path, GOOD), sets)


# -- validate does every check train does, before anything is written ----------------------------

QUICK = str(REPO / "recipes" / "quickstart.yaml")
SPEECH = str(REPO / "recipes" / "fsdd_gru_gradual.yaml")


@pytest.mark.parametrize("recipe,sets,key,words", [
    (QUICK, ["model.config.hidden_sizes=abc"], "model.config.hidden_sizes", "TypeError"),
    (QUICK, ["model.config.hidden_sizes=[-5,10]"], "model.config.hidden_sizes", "RuntimeError"),
    (SPEECH, ["model.config.hidden_size=big"], "model.config.hidden_size", "cannot build the model"),
    (QUICK, ["model.config.zz_unknown=1"], "model.config.zz_unknown", "not a field of LeNetConfig"),
    (str(REPO / "recipes" / "fmnist_resnet10t_dense.yaml"), ["model.kwargs={no_such_kwarg: 1}"],
     "model.kwargs.no_such_kwarg", "unexpected keyword"),
    (QUICK, ["training.learning_rate=-0.1"], "training.learning_rate", "positive"),
    (QUICK, ["training.per_device_train_batch_size=0"], "training.per_device_train_batch_size", "[1, "),
    (QUICK, ["training.per_device_train_batch_size=-4"], "training.per_device_train_batch_size", "[1, "),
    (QUICK, ["training.per_device_train_batch_size=1e20"], "training.per_device_train_batch_size", "expected int"),
    (QUICK, ["training.num_train_epochs=0"], "training.num_train_epochs", "positive"),
    (QUICK, ["training.num_train_epochs=-3"], "training.num_train_epochs", "positive"),
    (QUICK, ["training.max_steps=1e20"], "training.max_steps", "expected int"),
    (QUICK, ["training.max_steps=100000000000000000000"], "training.max_steps", "in [1, 1000000000]"),
    (QUICK, ["sparsity.targets.exclude=['*']"], "sparsity.targets.exclude", "selects no weight"),
    (QUICK, ["sparsity.target_density=1e-6"], "sparsity.target_density", "keeps no weight of fc1.weight"),
], ids=lambda v: v if isinstance(v, str) and "." in v and "/" not in v else None)
def test_validate_catches_what_train_would_hit(tmp_path, capsys, recipe, sets, key, words):
    out = tmp_path / "run"
    for command in (["validate", recipe], ["train", recipe, "--output-dir", str(out)]):
        assert main([*command, "--set", *sets]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"(--set {sets[0]}" in err and f"{key}: " in err and words in err, err
    assert not out.exists()
