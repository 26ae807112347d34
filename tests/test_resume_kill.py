"""``kill -9`` at any moment of ``hf-sparse train``, then ``--resume``: the run ends bit-identical to an
uninterrupted one, or says that nothing is left to do.

The fast tests build the states a kill leaves behind (a checkpoint folder cut short, a run killed
during its final save) from a real run; the slow test really kills a run's process (tests.helpers.ForkedCLI) at three moments,
found by watching the run directory: during a training step, while a checkpoint is being written,
and while the final ``model/`` is being written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_sparse.cli import main
from hf_sparse.training.trainer import CHECKPOINT_COMPLETE
from tests.helpers import ForkedCLI

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
TINY = ["data.max_train_samples=256", "data.max_eval_samples=128", "training.per_device_train_batch_size=32",
        "training.disable_tqdm=true", "training.save_strategy=steps", "training.logging_steps=4",
        "sparsity.params.start_fraction=0.0", "sparsity.params.end_fraction=0.5", "sparsity.params.frequency=4"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def comparable(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("train_runtime_s",):
        results.pop(key)
    results["eval"] = {k: v for k, v in results["eval"].items() if "runtime" not in k and "per_second" not in k}
    return results


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable(a) == comparable(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def train(out: Path, *extra: str) -> int:
    return main(["train", RECIPE, "--output-dir", str(out), "--set", *TINY, *extra])


# -- fast: the states a kill leaves, made from a real run ---------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert train(out, "training.max_steps=20", "training.save_steps=10") == 0
    return out


def test_checkpoints_carry_a_completion_marker_and_results_come_last(finished_run):
    for step in (10, 20):
        assert (finished_run / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).is_file()
    assert not list(finished_run.glob("*.partial")) and not list(finished_run.glob("*.old"))
    assert json.loads((finished_run / "results.json").read_text())["train_steps"] == 20


def test_resume_skips_a_checkpoint_cut_short(finished_run, tmp_path, capsys):
    """A kill while writing checkpoint-20 (only part of its files there), before the final save."""
    run = tmp_path / "killed"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "model")
    (run / "results.json").unlink()
    cut = run / "checkpoint-20"
    (cut / CHECKPOINT_COMPLETE).unlink()
    (cut / "trainer_state.json").write_text("")  # 0 bytes: the write had just begun
    (cut / "optimizer.pt").unlink()
    assert train(run, "training.max_steps=20", "training.save_steps=10", "--resume") == 0
    err = capsys.readouterr().err
    assert f"skipping {cut}: incomplete" in err and f"resuming from {run / 'checkpoint-10'}" in err
    assert_same_run(run, finished_run)


def test_resume_from_a_named_incomplete_checkpoint_is_refused(finished_run, tmp_path, capsys):
    run = tmp_path / "named"
    shutil.copytree(finished_run / "checkpoint-10", run / "checkpoint-10")
    (run / "checkpoint-10" / CHECKPOINT_COMPLETE).unlink()
    assert train(run, "training.max_steps=20", "--resume", str(run / "checkpoint-10")) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume: " in err and "is incomplete" in err and err.count("\n") == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10"]


def test_resume_of_a_finished_run_is_a_no_op(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    assert train(finished_run, "training.max_steps=20", "training.save_steps=10", "--resume") == 0
    out = capsys.readouterr().out
    assert "finished run" in out and "nothing to resume" in out
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before


def test_resume_after_a_kill_during_the_final_save(finished_run, tmp_path):
    """model.partial half written, model/ absent, no results.json: the run is not finished.

    Step 20 is mid-epoch (8 steps per epoch): Trainer alone would train a 21st step here.
    """
    run = tmp_path / "final"
    shutil.copytree(finished_run, run)
    (run / "results.json").unlink()
    (run / "model").rename(run / "model.partial")
    (run / "model.partial" / "sparsity.json").unlink()
    assert train(run, "training.max_steps=20", "training.save_steps=10", "--resume") == 0
    assert not (run / "model.partial").exists()
    assert_same_run(run, finished_run)


# -- slow: real kill -9 of a subprocess at three moments ---------------------------------------------


def _start(out: Path, resume: bool) -> ForkedCLI:
    return ForkedCLI(["train", RECIPE, "--output-dir", str(out), "--set", *TINY, "training.max_steps=90",
                      "training.save_steps=30", *(["--resume"] if resume else [])])


def _kill_when(proc: ForkedCLI, moment, timeout: float = 300) -> None:
    """Poll the filesystem; SIGKILL the process the moment ``moment()`` is true."""
    deadline = time.monotonic() + timeout
    while not moment():
        assert proc.poll() is None, f"the run ended before the moment came: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


@pytest.mark.slow
def test_kill_9_at_three_moments_then_resume(tmp_path):
    whole = tmp_path / "whole"
    proc = _start(whole, resume=False)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    run = tmp_path / "killed"
    # 1. during a step: checkpoint-30 is complete, training goes on
    proc = _start(run, resume=False)
    _kill_when(proc, lambda: (run / "checkpoint-30" / CHECKPOINT_COMPLETE).exists())
    assert not (run / "checkpoint-60").exists() and not (run / "results.json").exists()

    # 2. while checkpoint-60 is being written (the folder exists, its marker does not yet)
    proc = _start(run, resume=True)
    _kill_when(proc, lambda: (run / "checkpoint-60").exists())
    assert not (run / "checkpoint-60" / CHECKPOINT_COMPLETE).exists(), "the write finished before the kill"

    # 3. while the final model/ is being written
    proc = _start(run, resume=True)
    _kill_when(proc, lambda: (run / "model.partial").exists())
    assert not (run / "results.json").exists() and not (run / "model").exists()

    proc = _start(run, resume=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err and "checkpoint-90" in err
    assert_same_run(run, whole)

    proc = _start(run, resume=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "nothing to resume" in out, err[-3000:]
