"""``hf-sparse train`` end to end on a tiny recipe: the run directory of the run contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sparse import load_sparse
from hf_sparse.cli import main
from tests.helpers import accelerate_launch

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
    assert set(results["per_layer"]) == {"fc1.weight", "fc2.weight"}  # the classifier head stays dense by default
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


def test_fsdp_in_one_process_is_a_located_error(tmp_path, capsys):
    out = tmp_path / "run"
    fsdp = ["training.fsdp=true", "training.fsdp_config={fsdp_version: 2}"]
    assert main(["validate", str(REPO / "recipes/quickstart.yaml"), "--set", *fsdp]) == 0  # a launch away
    assert main(["train", str(REPO / "recipes/quickstart.yaml"), "--output-dir", str(out), "--set", *TINY, *fsdp]) == 2
    err = capsys.readouterr().err
    assert "training.fsdp" in err and "accelerate launch" in err and err.count("\n") == 1
    assert not out.exists()


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


def test_python_module_entry_point(tmp_path):
    """``python -m hf_sparse`` in a fresh process: its exit status is main's, its output the command's."""
    proc = subprocess.run([sys.executable, "-m", "hf_sparse", "validate", str(REPO / "recipes/fmnist_lenet300_dns.yaml"),
                           "--set", "sparsity.target_density=1.2"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "target_density" in proc.stderr and list(tmp_path.iterdir()) == []


def test_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = str(REPO / "recipes/fmnist_lenet300_dns.yaml")
    assert main(["validate", recipe, "--set", "sparsity.target_density=0.2"]) == 0
    assert capsys.readouterr().out.strip() == f"{recipe}: ok"
    assert main(["validate", recipe, "--set", "sparsity.target_density=1.2"]) == 2
    assert "target_density" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_divergence_stops_the_run_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", str(REPO / "recipes/quickstart.yaml"), "--output-dir", str(out), "--set", *TINY,
                 "training.learning_rate=1000", "training.optim=sgd", "training.max_grad_norm=0",
                 "training.logging_steps=5"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged" in err and "NaN" in err and "no model was saved" in err, err
    assert not (out / "model").exists() and not (out / "results.json").exists()


def test_layers_that_end_empty_are_warned_about(fmnist_small):
    from hf_sparse.config.recipe import SparsityConfig
    from hf_sparse.training.run import warn_empty_layers
    from hf_sparse.training.sparsifier import Sparsifier
    from tests.helpers import tiny_lenet

    model = tiny_lenet()
    sparsifier = Sparsifier(model, SparsityConfig(method="gmp", target_density=0.5), seed=0)
    report = sparsifier.report(model)
    assert warn_empty_layers(report) == []
    report.per_layer["fc2.weight"] = report.per_layer["fc2.weight"].model_copy(update={"nonzero": 0, "density": 0.0})
    with pytest.warns(UserWarning, match=r"1 targeted layer\(s\) end with no nonzero weight \(fc2.weight\)"):
        assert warn_empty_layers(report) == ["fc2.weight"]


def _launch_two(out: Path, *sets: str) -> subprocess.CompletedProcess:
    """The README's command: ``accelerate launch --multi_gpu --num_processes 2 ... -m hf_sparse train``."""
    cmd = accelerate_launch("-m", "hf_sparse", "train", str(REPO / "recipes/quickstart.yaml"), "--output-dir", str(out),
                            "--set", *TINY, *sets)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel(tmp_path):
    out = tmp_path / "ddp"
    proc = _launch_two(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["train_steps"] == 8  # 512 samples / (2 x 32)
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in out.iterdir()) == ["model", "results.json"]

    not_ddp = _launch_two(tmp_path / "alone", "training.use_cpu=false", "training.ddp_backend=gloo")
    assert not_ddp.returncode != 0  # each rank exits 2; the launcher reports the failed rank with its own code
    assert "training: 2 processes were launched but the model would not be trained data-parallel" in not_ddp.stderr
    assert not (tmp_path / "alone").exists()
