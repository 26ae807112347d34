"""``hf-sparse train`` end to end on a tiny recipe: the run directory of the run contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sparse import load_sparse
from hf_sparse.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_train_samples=512", "data.max_eval_samples=256", "training.num_train_epochs=1",
        "training.per_device_train_batch_size=32", "training.disable_tqdm=true"]
RESULT_KEYS = {"method", "target_density", "achieved_density", "model_density", "per_layer", "eval",
               "train_runtime_s", "train_steps", "world_size", "hf_sparse_version", "method_metrics"}


def test_train_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(REPO / "recipes/quickstart.yaml"), "--output-dir", str(out), "--set", *TINY,
                 "--set", "sparsity.params.start_fraction=0.0", "--set", "sparsity.params.end_fraction=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "achieved density  0.1000" in printed and "accuracy" in printed
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["method"] == "gmp" and results["target_density"] == 0.1
    assert results["achieved_density"] == pytest.approx(0.1, abs=1e-4)
    assert set(results["per_layer"]) == {"fc1.weight", "fc2.weight", "classifier.weight"}
    assert results["train_steps"] == 16 and results["world_size"] == 1
    assert 0 < results["eval"]["accuracy"] <= 1 and "loss" in results["eval"]
    assert results["model_density"] < 0.2
    # the saved model loads with one call and is as sparse as reported
    model = load_sparse(str(out / "model"))
    weight = model.fc1.weight
    assert float((weight != 0).float().mean()) == pytest.approx(results["per_layer"]["fc1.weight"])
    assert (out / "model" / "sparsity.json").exists() and (out / "model" / "README.md").exists()


def test_dense_recipe_reports_density_one(tmp_path):
    out = tmp_path / "dense"
    assert main(["train", str(REPO / "recipes/fmnist_lenet300_dense.yaml"), "--output-dir", str(out), "--set", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "none" and results["target_density"] is None
    assert results["achieved_density"] == 1.0 and results["model_density"] == 1.0


def test_resume_flag_continues_from_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["train", str(REPO / "recipes/fmnist_lenet300_gradual.yaml"), "--output-dir", str(out), "--set", *TINY,
              "training.save_strategy=steps", "training.save_steps=8"]
    assert main(common) == 0
    first = json.loads((out / "results.json").read_text())
    weights = load_sparse(str(out / "model")).state_dict()
    assert main([*common, "--resume", str(out / "checkpoint-8")]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["achieved_density"] == first["achieved_density"]
    for k, v in load_sparse(str(out / "model")).state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_python_module_entry_point_and_validate(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_sparse", "validate", str(REPO / "recipes/fmnist_lenet300_dns.yaml"),
                           "--set", "sparsity.target_density=0.2"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "hf_sparse", "validate", str(REPO / "recipes/fmnist_lenet300_dns.yaml"),
                          "--set", "sparsity.target_density=1.2"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "target_density" in bad.stderr and list(tmp_path.iterdir()) == []
