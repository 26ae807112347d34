"""FSDP2 (fully_shard, two CPU processes over gloo) against one process: identical masks after every
step, exact resume, per-rank method state a shard, export from the full state dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_sparse.checkpoint.save_and_load import load_sparse
from tests.fsdp_worker import CONFIGS, EXPORTED, RESUME_AT
from tests.helpers import REPO, assert_ranks_resume_exactly


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fsdp_worker.py"), str(out)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads((out / f"{t}.json").read_text()) for t in ("ref", "rank0", "rank1")]


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_matches_one_process(runs, name):
    _, (ref, a, b) = runs
    assert len(ref[name]["masks"]) == 16
    assert a[name]["masks"] == b[name]["masks"] == ref[name]["masks"]  # whole masks, after every step
    assert a[name]["density"] == b[name]["density"] == ref[name]["density"] < 1.0
    assert a[name]["metrics"] == b[name]["metrics"]  # reduced statistics: bit-identical on both ranks
    for k, v in ref[name]["metrics"].items():
        assert a[name]["metrics"][k] == pytest.approx(v, rel=1e-5), k
    for r in (a, b):  # each rank holds half of the method state (plus a few replicated scalars)
        assert r[name]["state_bytes"] <= ref[name]["state_bytes"] / 2 + 64
    assert a[name]["state_bytes"] + b[name]["state_bytes"] >= ref[name]["state_bytes"]


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_resume_equals_uninterrupted(runs, name):
    _, (_, a, b) = runs
    assert_ranks_resume_exactly([a, b], name, RESUME_AT)


@pytest.mark.dist
@pytest.mark.parametrize("name", EXPORTED)
def test_fsdp2_export_loads_on_one_process(runs, name):
    out, _ = runs
    slug = name.replace("/", "-")
    sharded, single = load_sparse(out / f"export-{slug}"), load_sparse(out / f"ref-export-{slug}")
    for (n, p), (_, q) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(p != 0, q != 0), n
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_sharded_state_refuses_another_world_size():
    from hf_sparse.config.recipe import SparsityConfig
    from hf_sparse.training.sparsifier import Sparsifier
    from tests.helpers import tiny_lenet

    sp = Sparsifier(tiny_lenet(), SparsityConfig(method="gmp", target_density=0.5), seed=0)
    state = {**sp.state_dict(), "shard": [0, 2]}
    assert sp.state_file() == "sparsity_state.pt"
    with pytest.raises(ValueError, match="same FSDP2 world size"):
        sp.load_state_dict(state)
