"""``hf-sparse train`` against a careless or hostile user: nothing of theirs is lost, two runs never
share a run directory, checkpoint rotation never leaves nothing to resume from, a foreign
checkpoint cannot be resumed from, and every bad input or surrounding fault ends in one line."""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import Trainer

from hf_sparse.cli import main
from hf_sparse.cli.rundir import LOCK_FILE
from hf_sparse.training.trainer import CHECKPOINT_COMPLETE, rotate_complete_checkpoints
from tests.helpers import REPO, ForkedCLI, launch_env
from tests.test_resume_kill import RECIPE, TINY, assert_same_run

SHORT = ["training.max_steps=20", "training.save_steps=10"]


def train(out: Path, *extra: str) -> int:
    return main(["train", RECIPE, "--output-dir", str(out), "--set", *TINY, *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hf-sparse")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted run with save_total_limit 1 (what every interrupted one must end equal to)."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert train(out, *SHORT, "training.save_total_limit=1") == 0
    return out


# -- data loss ----------------------------------------------------------------------------------------


def test_a_fresh_run_keeps_what_the_output_dir_holds(tmp_path, capsys):
    out = tmp_path / "P"
    (out / "model").mkdir(parents=True)
    (out / "model" / "thesis.pt").write_text("years of work")
    (out / "notes.txt").write_text("keep me")
    assert train(out, "training.max_steps=2") == 2
    line = error_line(capsys)
    assert "--output-dir" in line and "is not empty (model, notes.txt)" in line and "--overwrite" in line
    assert (out / "model" / "thesis.pt").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["model", "notes.txt"]  # no lock left behind
    # --resume will not replace a model/ that hf_sparse did not write either
    assert train(out, "training.max_steps=2", "--resume", "last") == 2
    assert "no complete checkpoint" in error_line(capsys)
    # asked to, a run replaces the earlier run's outputs and nothing else
    assert train(out, "training.max_steps=2", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model" / "sparsity.json").is_file()
    assert not (out / "model" / "thesis.pt").exists()


def test_rotation_waits_for_the_new_checkpoint_to_be_complete(whole, tmp_path, monkeypatch):
    """A kill after Trainer wrote checkpoint-20 but before it was marked complete: with
    save_total_limit 1 checkpoint-10 must still be there, and --resume ends equal to the whole run."""
    run = tmp_path / "killed"
    original = Trainer._save_checkpoint

    def killed_after_writing(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step == 20:
            raise SystemExit("killed")

    monkeypatch.setattr(Trainer, "_save_checkpoint", killed_after_writing)
    with pytest.raises(SystemExit):
        train(run, *SHORT, "training.save_total_limit=1")
    monkeypatch.undo()
    assert (run / "checkpoint-10" / CHECKPOINT_COMPLETE).is_file()
    assert not (run / "checkpoint-20" / CHECKPOINT_COMPLETE).exists()
    assert train(run, *SHORT, "training.save_total_limit=1", "--resume") == 0
    assert_same_run(run, whole)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-20", "model", "results.json"]


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step, complete in ((10, True), (20, False), (30, True), (40, True), (50, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / CHECKPOINT_COMPLETE).write_text("{}")
    deleted = rotate_complete_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-40", "checkpoint-50"]
    assert rotate_complete_checkpoints(tmp_path, None) == []


def test_a_second_run_is_locked_out(tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}
        (out / LOCK_FILE).write_text(json.dumps(lock))
        assert train(out, "training.max_steps=2") == 2
        line = error_line(capsys)
        assert f"in use by another run (pid {holder.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock is taken over, with a warning
    assert train(out, "training.max_steps=2") == 0
    assert f"taking over the lock of {out} from pid {holder.pid}" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists() and (out / "results.json").is_file()


@pytest.mark.slow
def test_two_real_runs_into_one_directory(tmp_path):
    """Two processes started into one --output-dir: one trains, the other is refused before writing."""
    out = tmp_path / "both"
    cmd = [sys.executable, "-m", "hf_sparse", "train", RECIPE, "--output-dir", str(out), "--set", *TINY,
           "training.max_steps=200", "training.save_steps=50"]
    first = subprocess.Popen([*cmd, "training.seed=0"], env=launch_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / LOCK_FILE).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    second = subprocess.run([*cmd, "training.seed=1"], env=launch_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 200


# -- kill -9 at random moments, with save_total_limit 1 ----------------------------------------------


def _kill_sweep(tmp_path: Path, moments: int, seed: int) -> list[str]:
    """Kill a run at ``moments`` random times after it took its lock; after each, ``--resume``
    continues, or says there is no complete checkpoint (then the run starts over with --overwrite).
    The end must equal an uninterrupted run in a process of its own (same threads, same kernels)."""
    rng = random.Random(seed)
    run, whole = tmp_path / "run", tmp_path / "whole"
    base = ["train", RECIPE, "--output-dir", str(run), "--set", *TINY, *SHORT, "training.save_total_limit=1"]

    # how long a run takes from its lock to its end
    proc, t0 = ForkedCLI(base), None
    while proc.poll() is None:
        if t0 is None and (run / LOCK_FILE).exists():
            t0 = time.monotonic()
        time.sleep(0.002)
    _, err = proc.communicate()
    assert proc.returncode == 0 and t0 is not None, err[-2000:]
    span = time.monotonic() - t0
    run.rename(whole)

    outcomes, extra = [], ()
    for _ in range(moments):
        proc = ForkedCLI([*base, *extra])
        while not (run / LOCK_FILE).exists() and proc.poll() is None:
            time.sleep(0.002)
        if proc.poll() is None:
            time.sleep(rng.uniform(0, span))
        if proc.poll() is not None:  # it finished first (or found the run finished): start over next time
            _, err = proc.communicate()
            assert proc.returncode == 0, err[-2000:]
            outcomes.append("finished")
            extra = ("--overwrite",)
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        complete = [p for p in run.glob("checkpoint-*") if (p / CHECKPOINT_COMPLETE).exists()]
        outcomes.append(f"killed with {len(complete)} complete checkpoint(s)")
        if not complete:
            said = ForkedCLI([*base, "--resume"])
            _, err = said.communicate(timeout=600)
            assert said.returncode == 2 and "no complete checkpoint to resume from" in err, err
            extra = ("--overwrite",)
        else:
            extra = ("--resume",)
    proc = ForkedCLI([*base, *extra])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert_same_run(run, whole)
    return outcomes


@pytest.mark.dist  # four to five trainings in subprocesses
def test_kill_9_at_two_random_moments(tmp_path):
    _kill_sweep(tmp_path, moments=2, seed=0)


@pytest.mark.slow
def test_kill_9_at_ten_random_moments(tmp_path):
    outcomes = _kill_sweep(tmp_path, moments=10, seed=int(os.environ.get("HF_SPARSE_KILL_SEED", "1")))
    print(outcomes)


# -- --resume with a checkpoint that is not this run's ---------------------------------------------------


class _Payload:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _plant(folder: Path, name: str, marker: Path) -> None:
    with open(folder / name, "wb") as f:
        pickle.dump(_Payload(marker), f)


@pytest.mark.parametrize("damage", ["no_sparsity_state", "optimizer.pt", "scheduler.pt", "sparsity_state.pt",
                                    "rng_state.pth", "model.safetensors", "other_model", "trainer_state"])
def test_resume_from_a_foreign_checkpoint_is_one_line(whole, tmp_path, capsys, damage):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "foreign" / "checkpoint-20"
    shutil.copytree(whole / "checkpoint-20", ckpt)
    marker = tmp_path / "ran"
    if damage == "no_sparsity_state":
        (ckpt / "sparsity_state.pt").unlink()
    elif damage == "other_model":
        save_file({"fc1.weight": torch.zeros(3, 3)}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    elif damage == "trainer_state":
        (ckpt / "trainer_state.json").write_text("[]")
    else:
        _plant(ckpt, damage, marker)
    out = tmp_path / "run"
    assert train(out, "training.max_steps=30", "--resume", str(ckpt)) == 2  # steps left: every state is read
    line = error_line(capsys)
    assert line.startswith("hf-sparse: error: --resume: cannot resume from") and str(ckpt) in line, line
    assert not marker.exists()


def test_resume_from_another_methods_checkpoint(whole, tmp_path, capsys):
    dns = tmp_path / "dns"
    assert main(["train", str(REPO / "recipes/fmnist_lenet300_dns.yaml"), "--output-dir", str(dns), "--set",
                 *TINY[:4], "training.save_strategy=steps", *SHORT]) == 0
    assert train(tmp_path / "run", *SHORT, "--resume", str(dns / "checkpoint-20")) == 2
    line = error_line(capsys)
    assert "cannot resume from" in line and "dns" in line and "gmp" in line, line


def test_resume_from_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert train(tmp_path / "run", *SHORT, "--resume", "/etc") == 2
    line = error_line(capsys)
    assert "/etc is not a checkpoint folder (no trainer_state.json)" in line


# -- surroundings: output paths that cannot be, a full disk -------------------------------------------


@pytest.mark.parametrize("where", ["a_file", "below_a_file", "proc"])
def test_an_output_dir_that_cannot_be_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    out = {"a_file": tmp_path / "file", "below_a_file": tmp_path / "file" / "run",
           "proc": Path("/proc/hf-sparse-run")}[where]
    assert train(out, "training.max_steps=2") == 2
    assert "--output-dir: cannot use" in error_line(capsys)
    assert (tmp_path / "file").read_text() == "x"


def _mount_read_only_tmpfs(folder: Path) -> None:
    """In the calling (single-threaded, forked) process: a user and mount namespace of its own, as
    ``unshare -rm`` makes, with a read-only tmpfs over ``folder``; nothing outside the process sees it."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    for args in ((b"none", b"/", None, 0x4000 | 0x40000, None),  # MS_REC | MS_PRIVATE: no propagation out
                 (b"tmpfs", str(folder).encode(), b"tmpfs", 1, None)):  # MS_RDONLY
        if libc.mount(*args) != 0:
            raise OSError(ctypes.get_errno(), "mount")


@pytest.mark.dist
def test_a_read_only_filesystem_is_one_line(tmp_path):
    """A read-only tmpfs mounted in a mount namespace of the run's own: root ignores file
    permissions, not a read-only mount."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("unshare -rm (user and mount namespaces) is not available here")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = ForkedCLI(["train", RECIPE, "--output-dir", str(ro / "run"), "--set", *TINY, "training.max_steps=2"],
                     before=lambda: _mount_read_only_tmpfs(ro))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("hf-sparse: error: --output-dir: cannot use"), last
    assert "Read-only file system" in last
    (ro / "still-writable").write_text("x")  # the mount was the run's alone


@pytest.mark.dist
def test_a_full_disk_while_checkpointing_is_one_line(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail as on a full one."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    out = tmp_path / "full"
    proc = ForkedCLI(["train", RECIPE, "--output-dir", str(out), "--set", *TINY, *SHORT], before=limit)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("hf-sparse: error: writing into"), err[-3000:]
    assert "free space, then continue with --resume" in last
    assert not any((p / CHECKPOINT_COMPLETE).exists() for p in out.glob("checkpoint-*"))


# -- values validate used to pass and train refused ---------------------------------------------------


@pytest.mark.parametrize("settings, key", [
    (["training.report_to=[nosuchtracker]"], "training.report_to"),
    (["training.dataloader_num_workers=-2"], "training.dataloader_num_workers"),
    (["training.push_to_hub=true"], "training.push_to_hub"),
    (['sparsity.targets.include=["re:("]'], "sparsity.targets.include.0"),
    (["sparsity.granularity=block", "sparsity.block_shape=[512,1024]"], "sparsity.block_shape"),
    (["sparsity.params.start_step=100000000000000000000"], "sparsity.params.start_step"),
    (["sparsity.target_density=true"], "sparsity.target_density"),
    (["data.max_train_samples='10'"], "data.max_train_samples"),
])
def test_validate_catches_what_train_refused(tmp_path, capsys, settings, key):
    assert main(["validate", RECIPE, "--set", *settings]) == 2
    assert f": {key}: " in error_line(capsys)
    out = tmp_path / "run"
    assert train(out, "training.max_steps=2", *settings) == 2
    assert f": {key}: " in error_line(capsys) and not out.exists()


def test_a_misspelt_training_key_gets_a_suggestion(capsys):
    assert main(["validate", RECIPE, "--set", "training.learnig_rate=0.1"]) == 2
    assert "training.learnig_rate: not a transformers.TrainingArguments field; did you mean learning_rate?" in \
        error_line(capsys)


def test_validate_reports_every_problem_of_a_recipe_at_once(tmp_path, capsys):
    """Three typos in three sections: one run names all three, each located, each with its suggestion;
    and unknown data options are refused, not ignored."""
    recipe = tmp_path / "typos.yaml"
    recipe.write_text("model:\n  source: hf_sparse\n  name: lenet300_100\ndata:\n  nam: fashion_mnist\n"
                      "training:\n  learnig_rate: 0.001\nsparsity:\n  method: gmp\n  target_densty: 0.1\n")
    assert main(["validate", str(recipe)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-sparse: error:")]
    assert len(lines) == 3, lines
    assert f"{recipe}:5:3: data.nam: unknown key;" in lines[0] and lines[0].endswith("did you mean name?")
    assert f"{recipe}:7:3: training.learnig_rate:" in lines[1] and "did you mean learning_rate?" in lines[1]
    assert f"{recipe}:10:3: sparsity.target_densty: unknown key;" in lines[2]
    assert lines[2].endswith("did you mean target_density?")
    assert main(["validate", RECIPE, "--set", "data.options={colour: red}"]) == 2
    line = error_line(capsys)
    assert "data.options" in line and "colour" in line


def test_recipes_that_are_not_regular_files_or_too_big(tmp_path, capsys):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    for path, message in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                          (big, "a recipe is at most 1,048,576")):
        started = time.perf_counter()
        assert main(["validate", str(path)]) == 2
        assert message in error_line(capsys) and time.perf_counter() - started < 5


def test_a_resumed_run_says_how_many_steps_it_ran():
    from hf_sparse.training.run import summary_table

    results = {"method": "gmp", "target_density": 0.1, "achieved_density": 0.1, "eval": {"accuracy": 0.5},
               "train_runtime_s": 0.8, "train_steps": 300}
    assert "0.8 s (300 steps)" in summary_table(results)
    assert "0.8 s (150 steps in this process, resumed at step 150 of 300)" in summary_table(results, resumed_from=150)


def test_a_script_launched_twice_without_ddp_is_refused(fmnist_small, tmp_path, monkeypatch):
    from tests.helpers import make_trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 processes were launched.*use_cpu=True, ddp_backend='gloo'"):
        make_trainer(fmnist_small, tmp_path, {"method": "gmp", "target_density": 0.3}, use_cpu=False)
