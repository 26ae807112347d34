"""Two real processes through ``accelerate launch``: masks identical on both ranks after every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hf_sparse.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_masks_identical_on_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "dist_worker.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == set(METHODS)
    for method in METHODS:
        a, b = ranks[0][method], ranks[1][method]
        assert a["world_size"] == 2
        assert len(a["digests"]) == 12
        assert a["digests"] == b["digests"], method
        assert a["density"] == b["density"] and a["density"] < 1.0, method
