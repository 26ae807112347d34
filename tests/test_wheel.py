"""hf_sparse installed from a wheel, not a clone: cards render, the CLI starts, data is found or explained.

The wheel is built from a copy of the package sources and installed (``pip install --no-deps``)
into a fresh virtual environment. Its dependencies (torch, transformers...) are this
environment's, reached through a ``.pth`` path entry, so no package index is needed; hf_sparse
itself exists only as the installed wheel there. Slow (a wheel build and several interpreter
starts): ``pytest -m slow tests/test_wheel.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

SOURCES = ("pyproject.toml", "setup.py", "README.md", "hf_sparse", "model_cards")


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A fresh venv with only the hf_sparse wheel installed; returns its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(src)], cwd=tmp)
    wheel = next((tmp / "dist").glob("hf_sparse-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "_hf_sparse_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], cwd=tmp)
    return python


def test_wheel_renders_a_model_card_and_starts_the_cli(wheel_env, tmp_path):
    code = """
import json, sys
import hf_sparse
from hf_sparse.checkpoint.model_card import TEMPLATE, render_model_card
sparsity = {"format": "dense", "library": "transformers", "model_class": "transformers.ViTForImageClassification",
            "method": "gmp", "target_density": 0.2, "achieved_density": 0.2,
            "per_layer": {"fc1.weight": {"shape": [4, 4], "density": 0.25, "nonzero": 4, "numel": 16}}}
card = render_model_card(sparsity, dataset="zalando-datasets/fashion_mnist", task="image-classification")
print(json.dumps({"package": hf_sparse.__file__, "template": str(TEMPLATE), "card": str(card)}))
"""
    out = json.loads(run([str(wheel_env), "-c", code], cwd=tmp_path).stdout.strip().splitlines()[-1])
    site_dir = str(wheel_env.parents[1])
    assert out["package"].startswith(site_dir) and out["template"].startswith(site_dir)  # the wheel, not the clone
    assert out["template"].endswith("hf_sparse/model_cards/sparse_model.md")
    assert "## Per-layer density" in out["card"] and "`fc1.weight`" in out["card"]
    assert "usage: hf-sparse" in run([str(wheel_env.parent / "hf-sparse"), "--help"], cwd=tmp_path).stdout


def test_wheel_trains_from_a_clone_and_explains_missing_data_elsewhere(wheel_env, tmp_path):
    cli = str(wheel_env.parent / "hf-sparse")
    quick = ["recipes/quickstart.yaml", "--set", "training.max_steps=3", "data.max_train_samples=64",
             "data.max_eval_samples=64"]
    done = run([cli, "train", *quick, "--output-dir", str(tmp_path / "run")], cwd=REPO)
    assert "achieved density" in done.stdout and (tmp_path / "run" / "model" / "README.md").is_file()

    shutil.copy2(REPO / "recipes" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    done = run([cli, "validate", str(tmp_path / "quickstart.yaml")], cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "data.hub_id" in message and "data/" in message
    assert not (tmp_path / "runs").exists()
