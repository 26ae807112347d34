"""SparseTrainer through Accelerate's FSDP2 path (Trainer's optimizer swap, sharded model, DCP
checkpoints) on two CPU processes against one process: identical masks after every step, exact
resume from a Trainer checkpoint, per-rank method state a shard, and an export that loads on one
process. See tests/fsdp_trainer_worker.py for how the FSDP plugin reaches Accelerate on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hf_sparse.checkpoint.save_and_load import load_sparse
from tests.fsdp_trainer_worker import BATCHNORM, CONFIGS, RESUME_AT, STEPS
from tests.helpers import REPO, accelerate_launch, assert_ranks_resume_exactly, launch_env

pytestmark = pytest.mark.dist  # every test reads the two-process launch

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer")
    worker = str(REPO / "tests" / "fsdp_trainer_worker.py")
    # the one-process reference runs beside the two-rank launch (its own output files; logs to files,
    # so that neither waits on a full pipe)
    procs = {}
    for label, cmd in (("ref", [sys.executable, worker, str(out)]), ("launch", accelerate_launch(worker, str(out)))):
        with open(out / f"{label}.log", "w") as log:
            procs[label] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=launch_env(), cwd=REPO)
    for label, proc in procs.items():
        assert proc.wait(timeout=900) == 0, (out / f"{label}.log").read_text()[-3000:]
    return out, [json.loads((out / f"{t}.json").read_text()) for t in ("ref", "rank0", "rank1")]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trainer_fsdp2_matches_one_process(runs, name):
    _, (ref, a, b) = runs
    assert len(ref[name]["masks"]) == STEPS
    assert a[name]["masks"] == b[name]["masks"]  # whole masks, after every step
    assert a[name]["density"] == b[name]["density"] < 1.0
    if name in BATCHNORM:  # per-rank batch statistics: not the one-process run (see the worker)
        assert a[name]["density"] == pytest.approx(ref[name]["density"], abs=1e-3)
        return
    assert a[name]["masks"] == ref[name]["masks"] and a[name]["density"] == ref[name]["density"]
    assert set(a[name]["sharded"]) == {"DTensor"} and set(ref[name]["sharded"]) == {"Parameter"}
    for r in (a, b):  # each rank holds half of the method state (plus a few replicated scalars)
        assert r[name]["state_bytes"] <= ref[name]["state_bytes"] / 2 + 64
    for k, v in ref[name]["metrics"].items():
        if not k.startswith(("purged_", "dense_")):  # the purged-cost model is not built on shards
            assert a[name]["metrics"][k] == b[name]["metrics"][k] == pytest.approx(v, rel=1e-5), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trainer_fsdp2_resume_equals_uninterrupted(runs, name):
    _, (_, a, b) = runs
    assert_ranks_resume_exactly([a, b], name, RESUME_AT)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trainer_fsdp2_export_loads_on_one_process(runs, name):
    out, _ = runs
    slug = name.replace("/", "-").replace("+", "-")
    sharded, single = load_sparse(out / f"fsdp-{slug}" / "model"), load_sparse(out / f"ref-{slug}" / "model")
    assert not any(type(p).__name__ == "DTensor" for p in sharded.parameters())
    if name in BATCHNORM:
        return  # trained differently (per-rank batch statistics); loading is what is checked
    for (n, p), (_, q) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(p != 0, q != 0), n
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_fsdp_on_cpu_warns_that_it_runs_data_parallel(runs):
    _, (_, a, b) = runs
    for r in (a, b):
        assert len(r["cpu_warning"]) == 1 and "MULTI_CPU" in r["cpu_warning"][0]


def test_group_granularity_is_refused_under_fsdp2(runs):
    _, (_, a, b) = runs
    for r in (a, b):
        assert "granularity group is not supported with FSDP2" in r["group_error"]


def test_hf_sparse_train_run_under_fsdp2_exports_once(runs):
    out, (_, a, b) = runs
    assert a["cli"] == b["cli"] and a["cli"]["world_size"] == 2
    results = json.loads((out / "cli" / "results.json").read_text())  # written by rank 0 only
    assert results["achieved_density"] == pytest.approx(0.1, abs=1e-3) == a["cli"]["achieved_density"]
    model = load_sparse(out / "cli" / "model")
    assert float((model.fc1.weight != 0).float().mean()) == pytest.approx(results["per_layer"]["fc1.weight"])
