"""``hf-sparse compare``: bad input, and a real grid interrupted with SIGINT and finished by a rerun."""

from __future__ import annotations

import csv
import json
import math
import signal
import statistics
import time
from pathlib import Path

import pytest
from PIL import Image

from hf_sparse.cli import main
from hf_sparse.compare.grid import family_prefix, method_label, plan_grid, run_is_complete
from hf_sparse.config.recipe import RecipeError
from tests.helpers import ForkedCLI

_SPARSITY = {
    "dense": "  method: none\n",
    "gmp": "  method: gmp\n  target_density: 0.5\n  params: {start_step: 2, end_step: 8, frequency: 2}\n",
    "dns": "  method: dns\n  target_density: 0.5\n"
           "  params: {start_iter: 2, iter_stop: 8, gamma: 0.01, recalibrate_every: 2}\n",
}


def tiny_family(folder: Path) -> dict[str, Path]:
    """A LeNet-300-100 family on 256 real Fashion-MNIST images, 10 steps per run."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, sparsity in _SPARSITY.items():
        paths[name] = folder / f"tiny_lenet_{name}.yaml"
        paths[name].write_text(
            "model: {source: hf_sparse, name: lenet300_100}\n"
            "data: {name: fashion_mnist, max_train_samples: 256, max_eval_samples: 128}\n"
            "training: {max_steps: 10, per_device_train_batch_size: 32, per_device_eval_batch_size: 128,\n"
            "           learning_rate: 0.001, seed: 0, logging_steps: 5, disable_tqdm: true}\n"
            f"sparsity:\n{sparsity}")
    return paths


def test_family_and_labels(tmp_path):
    paths = tiny_family(tmp_path / "recipes")
    assert family_prefix(paths["gmp"]) == "tiny_lenet"
    assert method_label(paths["gmp"], "tiny_lenet") == "gmp"
    grid = plan_grid([paths["dense"], paths["gmp"]], [0.5, 0.1], [0, 1], tmp_path / "out")
    assert [(r.label, r.density, r.seed) for r in grid] == [
        ("dense", None, 0), ("gmp", 0.5, 0), ("gmp", 0.1, 0),
        ("dense", None, 1), ("gmp", 0.5, 1), ("gmp", 0.1, 1)]
    assert grid[2].run_dir == tmp_path / "out" / "gmp" / "d0.1" / "s0"
    assert grid[2].overrides() == ["sparsity.target_density=0.1", "training.seed=0"]
    (tmp_path / "other").mkdir()
    stray = tmp_path / "other" / "x_gmp.yaml"
    stray.write_text(paths["gmp"].read_text())
    with pytest.raises(RecipeError, match="dense reference"):
        plan_grid([paths["gmp"], stray], [0.5], [0], tmp_path / "out")


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    paths = tiny_family(tmp_path / "recipes")
    out = tmp_path / "out"
    assert main(["compare", str(paths["gmp"]), "--methods", "nope", "--out", str(out)]) == 2
    assert "--methods" in capsys.readouterr().err
    bad = paths["gmp"].parent / "tiny_lenet_bad.yaml"
    bad.write_text(paths["gmp"].read_text().replace("frequency: 2", "frequency: 0"))
    assert main(["compare", str(paths["gmp"]), str(bad), "--density", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny_lenet_bad.yaml:" in err[0] and "frequency" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["compare", str(paths["gmp"]), "--density", "0.5,2", "--out", str(out)])
    assert e.value.code == 2
    assert not out.exists()


def _children_of_out(out: Path) -> list[int]:
    """Processes whose command line names a run directory under ``out``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and " train " in cmdline and str(out) in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.dist  # trains three runs in subprocesses, interrupts the grid with SIGINT and reruns it
def test_interrupt_then_rerun_finishes_without_redoing(tmp_path):
    paths = tiny_family(tmp_path / "recipes")
    out = tmp_path / "out"
    cmd = ["compare", *map(str, paths.values()), "--density", "0.5", "--seeds", "0", "--methods", "gmp,dns",
           "--out", str(out), "--jobs"]
    runs = [out / "dense" / "s0", out / "gmp" / "d0.5" / "s0", out / "dns" / "d0.5" / "s0"]

    # one job at a time: interrupted while the second run trains
    first = ForkedCLI([*cmd, "1"])
    deadline = time.monotonic() + 240
    while not any(run_is_complete(r) for r in runs) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert _children_of_out(out) == []  # every child was stopped
    done = {r: (r / "results.json").stat().st_mtime_ns for r in runs if run_is_complete(r)}
    assert 1 <= len(done) < len(runs)
    assert not (out / "summary.md").exists()

    # a folder in the same layout written by another tool (bench/bench_vs_torch_ao.py) becomes a row
    peer = out / "peer" / "d0.5" / "s0"
    peer.mkdir(parents=True)
    (peer / "results.json").write_text((next(iter(done)) / "results.json").read_text())

    second = ForkedCLI([*cmd, "2"])
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-3000:]
    assert f"{len(runs) - len(done)} trained, {len(done)} already complete, 0 failed" in stdout
    assert all(run_is_complete(r) for r in runs)
    assert {r: (r / "results.json").stat().st_mtime_ns for r in done} == done  # not redone

    # summary.csv agrees with the runs, summary.md with summary.csv, the picture with both
    rows = {(row["method"], row["target_density"]): row for row in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {("dense", ""), ("gmp", "0.5"), ("dns", "0.5"), ("peer", "0.5")}
    acc = {k: json.loads(((out / k[0] / f"d{k[1]}" if k[1] else out / k[0]) / "s0" / "results.json")
                         .read_text())["eval"]["accuracy"] for k in rows}
    for key, row in rows.items():
        assert row["metric"] == "accuracy" and row["n_seeds"] == "1" and row["sd"] == ""
        assert math.isclose(float(row["mean"]), acc[key])
    md = (out / "summary.md").read_text()
    for d in ("0.5",):
        best = max(("gmp", "dns", "peer"), key=lambda m: float(rows[(m, d)]["mean"]))
        cells = {m: next(line for line in md.splitlines() if line.startswith(f"| {m} |")).split(" | ")
                 for m in ("gmp", "dns", "peer")}
        for m in ("gmp", "dns", "peer"):
            text = f"{100 * float(rows[(m, d)]['mean']):.2f}"
            assert cells[m][1].strip(" |") == (f"**{text}**" if m == best else text)
    series = json.loads(Image.open(out / "pareto.png").text["hf_sparse_series"])
    for m in ("gmp", "dns", "peer"):
        plotted = {p[0]: p[1] for p in series["lines"][m]}
        assert plotted == pytest.approx({0.5: 100 * float(rows[(m, "0.5")]["mean"])})
    assert series["dense"][0] == pytest.approx(100 * float(rows[("dense", "")]["mean"]))
    readme = (out / "README.md").read_text()
    assert md.split("\n\n")[0] in readme and "pareto.png" in readme
    assert statistics.fmean([float(rows[(m, "0.5")]["achieved_density_mean"]) for m in ("gmp", "dns")]) \
        == pytest.approx(0.5, abs=0.01)
