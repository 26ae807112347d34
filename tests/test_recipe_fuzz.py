"""Fuzzed recipes: every bundled recipe, mutated, through ``hf-sparse validate``.

Mutations: unknown keys, wrong types, out-of-range and non-finite values, deleted keys, target
patterns (invalid regular expressions among them), junk and truncated YAML, aliases, other
encodings, and ``--set`` forms. Each outcome must be exit 0 (the
mutation happened to be valid) or exit 2 with error lines (one per problem found) each naming the
file (or the ``--set`` argument) and a line, no traceback, and nothing written.

The default suite runs a few examples per recipe; ``-m fuzz`` runs ``HF_SPARSE_FUZZ_EXAMPLES``
(default 1000) per recipe and, with ``HF_SPARSE_FUZZ_LOG=FILE``, appends one JSON line per example;
``HF_SPARSE_FUZZ_KINDS`` picks mutation kinds (comma-separated).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_sparse.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
LOCATED = re.compile(r"^hf-sparse: error: (?P<where>.+?)(:\d+:\d+| \(--set .*?\)): ")

SCALARS = st.one_of(
    st.integers(-10**25, 10**25), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["1e-4", ".nan", "-.inf", "0x10", "0o7", "010", "yes", "~", "[", "{a: 1"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=6)
#: Target patterns, invalid regular expressions among them (``re:(`` used to raise re.error).
PATTERNS = st.sampled_from(["re:(", "re:[a", "re:*", "re:(?P<x", "re:a{2,1}", "re:fc\\d+", "re:.*weight$", "*", "fc1.*",
                            "nothing.matches", ""]) | st.text(max_size=8).map(lambda t: "re:" + t)
#: Keys added after the first fuzz rounds, and values that are close to valid for them.
NEW_KEYS = st.sampled_from([
    "distillation", "distillation.teacher", "distillation.alpha", "distillation.temperature", "distillation.loss",
    "distillation.hidden", "distillation.hidden_weight", "data.augment", "data.augment.time_masks",
    "data.augment.speed", "data.augment.noise_snr_db", "data.task", "data.eval_fraction", "data.max_duration_s",
    "data.audio_column", "data.text_column", "data.label_column", "data.config_name", "data.eval_split",
    "model.ignore_mismatched_sizes", "model.revision", "model.path", "export.license"])
NEW_VALUES = st.sampled_from(["self", "ctc", "audio-classification", 0.5, 2, -1, 1.5, [0.9, 1.1], [1.1, 0.9],
                              {"teacher": "self"}, {"teacher": "self", "alpha": 2}, {"teacher": "/nonexistent"},
                              {"teacher": "self", "hidden": {"fc1": "fc1"}}, {"time_masks": 2, "time_mask_width": 5},
                              {"nope": 1}, "kl", "mse", "nosuchloss"])
JUNK = st.sampled_from(["&a [*a]", "*nowhere", "!!python/object:os.system", "\x00", "\t", "[" * 60, "{", "]", ": :",
                        "- - -", "? [a]", "1: 2", "<<: 3", "!!binary zz", "%YAML 1.1", "---", "...", "\ufeff"])


ALL_KINDS = ["value", "unknown_key", "delete", "junk_text", "truncate", "encoding", "set", "set_junk", "alias",
             "targets", "new_keys"]
#: ``HF_SPARSE_FUZZ_KINDS=new_keys,targets`` fuzzes those mutations only (default: all).
KINDS = [k for k in os.environ.get("HF_SPARSE_FUZZ_KINDS", ",".join(ALL_KINDS)).split(",") if k in ALL_KINDS] or ALL_KINDS


def _paths(data, prefix=()):
    """Every key path of a parsed recipe."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _set(data, path, value):
    node = data
    for k in path[:-1]:
        node = node[k]
    if isinstance(node, (dict, list)):
        node[path[-1]] = value


@st.composite
def mutated(draw, recipe: Path):
    """(bytes of the recipe file, --set arguments, which mutation)."""
    text = recipe.read_text()
    data = yaml.safe_load(text)
    paths = _paths(data)
    kind = draw(st.sampled_from(KINDS))
    sets: list[str] = []
    if kind in ("value", "unknown_key", "delete"):
        path = draw(st.sampled_from(paths))
        if kind == "value":
            _set(data, path, draw(VALUES))
        elif kind == "unknown_key":
            parent = path[:-1]
            node = data
            for k in parent:
                node = node[k]
            if isinstance(node, dict):
                node[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        else:
            node = data
            for k in path[:-1]:
                node = node[k]
            if isinstance(node, dict):
                node.pop(path[-1], None)
        raw = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()
    elif kind == "junk_text":
        at = draw(st.integers(0, len(text)))
        raw = (text[:at] + draw(JUNK | st.text(max_size=8)) + text[at:]).encode("utf-8", "surrogatepass")
    elif kind == "truncate":
        raw = text[: draw(st.integers(0, len(text)))].encode()
    elif kind == "encoding":
        raw = draw(st.sampled_from([text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-32"),
                                    text.encode("latin-1", "replace") + b"\xff\xfe", draw(st.binary(max_size=64))]))
    elif kind == "alias":
        raw = (text + "\nzz: &x [*x]\n" if draw(st.booleans()) else
               "a: &a [1,2,3,4,5,6,7,8,9]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                                                      for p, c in zip("abcdef", "bcdefg")) + text).encode()
    elif kind == "new_keys":  # the distillation section, speech-data and pretrained-start keys
        raw = text.encode()
        value = draw(VALUES | NEW_VALUES)
        sets = [f"{draw(NEW_KEYS)}={json.dumps(value, allow_nan=True).replace('NaN', '.nan').replace('Infinity', '.inf')}"]
    elif kind == "targets":
        raw = text.encode()
        which = draw(st.sampled_from(["include", "exclude"]))
        sets = [f"sparsity.targets.{which}={json.dumps(draw(st.lists(PATTERNS, min_size=1, max_size=3)))}"]
    else:
        raw = text.encode()
        key = ".".join(map(str, draw(st.sampled_from(paths)))) if draw(st.booleans()) else draw(
            st.text(alphabet="abcxyz._=", min_size=0, max_size=12))
        value = (draw(st.text(max_size=10)) if kind == "set_junk"
                 else json.dumps(draw(VALUES), allow_nan=True).replace("NaN", ".nan").replace("Infinity", ".inf"))
        sets = [f"{key}={value}" if draw(st.integers(0, 9)) else key]
    return raw, sets, kind


def check_outcome(tmp_path: Path, raw: bytes, sets: list[str], kind: str) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(raw)
    before = set(tmp_path.rglob("*"))
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["validate", str(path), *(["--set", *sets] if sets else [])])
    finally:
        os.chdir(cwd)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("hf-sparse: error:")]
    record = {"kind": kind, "code": code, "message": lines[-1] if lines else None, "sets": sets}
    problem = None
    if set(tmp_path.rglob("*")) != before:
        problem = "validate wrote files"
    elif code not in (0, 2):
        problem = f"exit status {code}"
    elif code == 2 and (not lines or "Traceback" in err.getvalue()):
        problem = "no error line: " + err.getvalue()[-2000:]
    elif code == 2 and not all(LOCATED.match(line) and (str(path) in line or "--set" in line) for line in lines):
        problem = "unlocated"
    record["problem"] = problem
    assert problem is None, record
    return record


def _log(record: dict, recipe: Path) -> None:
    log = os.environ.get("HF_SPARSE_FUZZ_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"recipe": recipe.name, **record}) + "\n")


def _fuzz(recipe: Path, tmp_path_factory, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=examples <= 10, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated(recipe))
    def run(case):
        raw, sets, kind = case
        try:
            record = check_outcome(tmp_path_factory.mktemp("fuzz"), raw, sets, kind)
        except AssertionError as e:
            record = e.args[0] if e.args and isinstance(e.args[0], dict) else {"kind": kind, "problem": str(e)}
            _log({**record, "text": raw[:4000].decode("utf-8", "replace")}, recipe)
            raise
        _log(record, recipe)

    run()


# ViT and resnet build in seconds; the default suite fuzzes the recipes of every model family once.
DEFAULT = [r for r in RECIPES if r.name in ("quickstart.yaml", "fsdd_gru_gradual.yaml", "fmnist_lenet5_dns.yaml",
                                           "fmnist_lenet300_l0_constrained.yaml", "fmnist_resnet10t_dense.yaml")]


@pytest.mark.parametrize("recipe", DEFAULT, ids=lambda p: p.name)
def test_fuzzed_recipes_fail_cleanly(recipe, tmp_path_factory):
    _fuzz(recipe, tmp_path_factory, examples=6)


@pytest.mark.slow
@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_fuzzed_recipes_fail_cleanly_at_scale(recipe, tmp_path_factory):
    _fuzz(recipe, tmp_path_factory, examples=int(os.environ.get("HF_SPARSE_FUZZ_EXAMPLES", "1000")))
