"""Hub faults that used to hang or leak: a Hub that never answers, one that sends a byte a second, a
connection dropped mid-body, a symlink pushed as its target, a sharded checkpoint pulled through
the cache's links. Each push and pull ends within its deadline with one HubError/CheckpointError
line, and the local checkpoint is untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from hf_sparse.checkpoint.hub import HubError, hub_deadline, push_to_hub
from hf_sparse.checkpoint.save_and_load import CheckpointError, save_sparse_checkpoint
from tests.conftest import HUB_TOKEN
from tests.helpers import REPO, launch_env
from tests.test_export import X_MNIST, folder_hashes, logits, sparse_lenet
from tests.test_hub import pull

TIMEOUT_S = 1.0

FAULTS = {"silent": {"silent": True}, "one byte per second": {"drip": 1.0},
          "dropped mid-body": {"drop_mid_body": True}}


@pytest.fixture()
def checkpoint(tmp_path):
    model, report = sparse_lenet(density=0.1)
    return model, save_sparse_checkpoint(model, tmp_path / "ck", report=report, format="bitmask")


def _inject(hub, fault: str) -> None:
    for key, value in FAULTS[fault].items():
        setattr(hub, key, value)


def _bound(folder) -> float:
    """The deadline of a push of ``folder`` plus a margin for a busy machine."""
    return hub_deadline(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())) + 5


@pytest.mark.parametrize("fault", list(FAULTS))
def test_push_ends_within_its_deadline(hub, checkpoint, monkeypatch, fault):
    _, folder = checkpoint
    monkeypatch.setenv("HF_SPARSE_HUB_TIMEOUT", str(TIMEOUT_S))
    before = folder_hashes(folder)
    _inject(hub, fault)
    started = time.perf_counter()
    with pytest.raises(HubError, match=r"push of .* to alice/faulty failed: ") as failed:
        push_to_hub(folder, "alice/faulty", token=HUB_TOKEN, endpoint=hub.url)
    assert time.perf_counter() - started < _bound(folder)
    assert "\n" not in str(failed.value)
    assert folder_hashes(folder) == before


@pytest.mark.parametrize("fault", list(FAULTS))
def test_pull_ends_within_its_deadline(hub, checkpoint, tmp_path, monkeypatch, fault):
    model, folder = checkpoint
    push_to_hub(folder, "alice/lenet", token=HUB_TOKEN, endpoint=hub.url)
    monkeypatch.setenv("HF_SPARSE_HUB_TIMEOUT", str(TIMEOUT_S))
    _inject(hub, fault)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="alice/lenet") as failed:
        pull(hub, "alice/lenet", tmp_path)
    assert time.perf_counter() - started < _bound(folder)
    assert "\n" not in str(failed.value)
    hub.heal()
    assert torch.equal(logits(pull(hub, "alice/lenet", tmp_path), X_MNIST), logits(model, X_MNIST))


def test_cli_inspect_and_push_against_a_silent_hub(hub, checkpoint, tmp_path):
    """The CLI as a user runs it, in a fresh process: push exits 1, inspect exits 2, both in time."""
    _, folder = checkpoint
    hub.silent = True
    env = {**launch_env(), "HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN, "HF_SPARSE_HUB_TIMEOUT": "2",
           "HF_HOME": str(tmp_path / "hf-home")}
    for args, status in ((["push", str(folder), "alice/silent"], 1), (["inspect", "alice/silent"], 2)):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hf_sparse", *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120)
        took = time.perf_counter() - started
        assert proc.returncode == status, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "did not finish within" in proc.stderr.splitlines()[-1]
        assert took < 45, took  # 4-5 s of deadline; the rest is the interpreter importing the libraries


def test_a_bad_timeout_setting_is_an_error(checkpoint, monkeypatch, hub):
    _, folder = checkpoint
    monkeypatch.setenv("HF_SPARSE_HUB_TIMEOUT", "abc")
    with pytest.raises(HubError, match=r"HF_SPARSE_HUB_TIMEOUT='abc' is not a positive number of seconds"):
        push_to_hub(folder, "alice/x", token=HUB_TOKEN, endpoint=hub.url)


def test_push_refuses_a_link_to_a_file_outside(hub, checkpoint, tmp_path):
    _, folder = checkpoint
    secret = tmp_path / "secret.txt"
    secret.write_text("my password\n")
    os.symlink(secret, folder / "notes.txt")
    with pytest.raises(HubError, match=r"notes.txt is a link to .*secret.txt, outside the checkpoint folder"):
        push_to_hub(folder, "alice/leak", token=HUB_TOKEN, endpoint=hub.url)
    assert "alice/leak" not in hub.repos
    assert not any(b"my password" in c for r in hub.repos.values() for cm in r.commits.values()
                   for c in cm.files.values())


def test_a_sharded_checkpoint_round_trips_through_the_cache(hub, tmp_path):
    """The Hub cache stores snapshot files as links into blobs/: they are inside, by name and by target."""
    from safetensors.torch import load_file, save_file

    from hf_sparse.checkpoint.formats import weight_digests

    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sparsity = json.loads((folder / "sparsity.json").read_text())
    sparsity["sha256"] = weight_digests(folder)
    (folder / "sparsity.json").write_text(json.dumps(sparsity))
    push_to_hub(folder, "alice/sharded", token=HUB_TOKEN, endpoint=hub.url)
    loaded = pull(hub, "alice/sharded", tmp_path)
    assert torch.equal(logits(loaded, X_MNIST), logits(model, X_MNIST))
