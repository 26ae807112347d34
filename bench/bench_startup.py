"""Start-up time of the CLI, each command in a fresh process: ``--help``, ``inspect``, ``validate``.

    .venv/bin/python bench/bench_startup.py [--repeats 5]

Each round runs every command once, in a rotating order (the machine's load drifts), and the
median wall time per command is reported against the 2 s budget for ``--help`` and ``inspect``.
``validate`` builds the data and the model, so it pays for torch and transformers; its figure is
shown for reference. The inspected checkpoint is a LeNet-300-100 written into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "hf_sparse"]
BUDGET_S = 2.0


def tiny_checkpoint(folder: Path) -> Path:
    from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint
    from hf_sparse.models.lenet import LeNetConfig, LeNetForImageClassification

    model = LeNetForImageClassification(LeNetConfig(variant="300-100"))
    per_layer = {n: {"density": 1.0} for n in ("fc1.weight", "fc2.weight")}
    report = {"method": "none", "target_density": None, "achieved_density": 1.0, "per_layer": per_layer}
    return save_sparse_checkpoint(model, folder / "ckpt", report=report)


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp))
        commands = {
            "import hf_sparse": [sys.executable, "-c", "import hf_sparse"],
            "hf-sparse --help": [*CLI, "--help"],
            "hf-sparse inspect": [*CLI, "inspect", str(ckpt)],
            "hf-sparse validate": [*CLI, "validate", "recipes/quickstart.yaml"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        names = list(commands)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(timed(commands[name]))
    print(f"median of {args.repeats} fresh processes (OMP_NUM_THREADS=1), budget {BUDGET_S:.1f} s for --help/inspect")
    for name, values in times.items():
        median = statistics.median(values)
        verdict = "" if name == "hf-sparse validate" else ("  ok" if median < BUDGET_S else "  OVER BUDGET")
        print(f"{name:<20} {median:6.2f} s  (min {min(values):.2f}, max {max(values):.2f}){verdict}")


if __name__ == "__main__":
    main()
