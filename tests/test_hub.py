"""Push and pull sparse checkpoints with the real huggingface_hub client against the loopback Hub."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download

from hf_sparse.checkpoint.hub import HubError, push_to_hub
from hf_sparse.checkpoint.save_and_load import CheckpointError, load_sparse, save_sparse_checkpoint
from tests.conftest import HUB_TOKEN
from tests.hub_server import closed_endpoint
from tests.test_export import RECIPE, X_MNIST, folder_hashes, logits, sparse_lenet, sparse_timm


def pull(hub, repo_id, tmp_path, **kwargs):
    """load_sparse through the Hub into a fresh cache, as a new machine would."""
    cache = tmp_path / f"cache-{len(list(tmp_path.glob('cache-*')))}"
    return load_sparse(repo_id, endpoint=hub.url, token=HUB_TOKEN, cache_dir=cache, **kwargs)


@pytest.mark.parametrize("fmt", ["dense", "bitmask", "purged"])
def test_push_pull_lenet(hub, tmp_path, fmt):
    model, report = sparse_lenet(density=0.2, structured=0.6 if fmt == "purged" else 0.0)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report, format=fmt, recipe_yaml=RECIPE,
                                    eval_metrics={"accuracy": 0.8})
    before = folder_hashes(folder)
    url = push_to_hub(folder, "alice/lenet-sparse", token=HUB_TOKEN, endpoint=hub.url)
    assert url.startswith(f"{hub.url}/alice/lenet-sparse/commit/")
    assert folder_hashes(folder) == before  # the local folder is only read

    remote = hub.files("alice/lenet-sparse")
    assert set(before) <= set(remote)
    assert all(remote[name] == (folder / name).read_bytes() for name in before if name != "README.md")
    assert "<repo_id>" not in remote["README.md"].decode()
    assert 'load_sparse("alice/lenet-sparse")' in remote["README.md"].decode()

    loaded = pull(hub, "alice/lenet-sparse", tmp_path)
    if fmt == "purged":
        torch.testing.assert_close(logits(loaded, X_MNIST), logits(model, X_MNIST), rtol=1e-5, atol=1e-5)
        assert loaded.config.hidden_sizes[0] < 300
    else:
        assert torch.equal(logits(loaded, X_MNIST), logits(model, X_MNIST))
    # the client only used plain HTTP endpoints (no LFS batch, no Xet)
    assert {m for m, _ in hub.requests} <= {"GET", "HEAD", "POST"}
    assert not any("xet" in p or ".git/info/lfs" in p for _, p in hub.requests)


@pytest.mark.parametrize("fmt", ["dense", "bitmask"])
def test_push_pull_timm(hub, tmp_path, fmt):
    wrapper, report = sparse_timm()
    folder = save_sparse_checkpoint(wrapper, tmp_path / "ck", report=report, format=fmt)
    push_to_hub(folder, "bob/resnet-sparse", private=True, token=HUB_TOKEN, endpoint=hub.url)
    assert hub.repos["bob/resnet-sparse"].private
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(logits(pull(hub, "bob/resnet-sparse", tmp_path), x), logits(wrapper.model, x))


def test_revision_branch_and_snapshot(hub, tmp_path):
    model, report = sparse_lenet(density=0.1)
    v1 = save_sparse_checkpoint(model, tmp_path / "v1", report=report, format="bitmask")
    push_to_hub(v1, "alice/lenet", token=HUB_TOKEN, endpoint=hub.url)
    other, report2 = sparse_lenet(density=0.05, seed=1)
    v2 = save_sparse_checkpoint(other, tmp_path / "v2", report=report2, format="bitmask")
    push_to_hub(v2, "alice/lenet", revision="experiment", token=HUB_TOKEN, endpoint=hub.url)
    assert torch.equal(logits(pull(hub, "alice/lenet", tmp_path), X_MNIST), logits(model, X_MNIST))
    branch = pull(hub, "alice/lenet", tmp_path, revision="experiment")
    assert torch.equal(logits(branch, X_MNIST), logits(other, X_MNIST))
    # plain snapshot_download sees the same files
    snap = snapshot_download("alice/lenet", revision="experiment", endpoint=hub.url, token=HUB_TOKEN,
                             cache_dir=tmp_path / "snap")
    assert folder_hashes(v2).keys() - {"README.md"} <= folder_hashes(type(v2)(snap)).keys()


def test_push_faults_then_retry(hub, tmp_path):
    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report, format="bitmask")
    before = folder_hashes(folder)

    with pytest.raises(HubError, match=r"alice/lenet.*cannot reach the Hub") as down:
        push_to_hub(folder, "alice/lenet", token=HUB_TOKEN, endpoint=closed_endpoint())
    assert "\n" not in str(down.value)

    with pytest.raises(HubError, match=r"alice/lenet.*401"):
        push_to_hub(folder, "alice/lenet", token="hf_wrong_token", endpoint=hub.url)
    assert "alice/lenet" not in hub.repos

    hub.fail_next_commit = True
    with pytest.raises(HubError, match=r"alice/lenet.*HTTP 500"):
        push_to_hub(folder, "alice/lenet", token=HUB_TOKEN, endpoint=hub.url)
    assert set(hub.files("alice/lenet")) == {".gitattributes"}  # nothing half-committed
    assert folder_hashes(folder) == before

    push_to_hub(folder, "alice/lenet", token=HUB_TOKEN, endpoint=hub.url)  # the retry goes through
    assert folder_hashes(folder) == before
    assert torch.equal(logits(pull(hub, "alice/lenet", tmp_path), X_MNIST), logits(model, X_MNIST))


def test_pull_faults(hub, tmp_path):
    with pytest.raises(CheckpointError, match="cannot reach the Hub"):
        load_sparse("alice/lenet", endpoint=closed_endpoint(), token=HUB_TOKEN, cache_dir=tmp_path / "c1")
    with pytest.raises(CheckpointError, match="alice/missing"):
        load_sparse("alice/missing", endpoint=hub.url, token=HUB_TOKEN, cache_dir=tmp_path / "c2")
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a Hub repo id"):
        load_sparse(str(tmp_path / "not" / "there"))


def test_model_card_validates_on_the_hub(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report, recipe_yaml=RECIPE,
                                    eval_metrics={"accuracy": 0.8}, dataset="zalando-datasets/fashion_mnist")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # ModelCard.validate posts to the global endpoint
    card = ModelCard.load(folder / "README.md")
    card.validate()
    assert ("POST", "/api/validate-yaml") in hub.requests

    # a model-index metric without "type": the client's own parser refuses it, and so does the Hub
    broken = card.content.replace("    - type: accuracy\n", "    - kind: accuracy\n")
    assert broken != card.content
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "README.md").write_text(broken)
    with pytest.raises(HubError, match="model card"):
        push_to_hub(tmp_path / "bad", "alice/bad", token=HUB_TOKEN, endpoint=hub.url)
    assert set(hub.files("alice/bad")) == {".gitattributes"}


def test_cli_push(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from tests.test_export import run_cli

    model, report = sparse_lenet(density=0.1)
    run_dir = tmp_path / "run"
    save_sparse_checkpoint(model, run_dir / "model", report=report)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    assert run_cli(["push", str(run_dir), "carol/lenet", "--private", "--revision", "v1"]) == 0
    assert "carol/lenet" in capsys.readouterr().out
    assert hub.repos["carol/lenet"].private and "v1" in hub.repos["carol/lenet"].branches
    assert "sparsity.json" in hub.files("carol/lenet", "v1")

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert run_cli(["push", str(run_dir), "carol/lenet"]) == 1
    err = capsys.readouterr().err.splitlines()  # a progress line, then the one error line
    assert err[0].startswith("uploading 5 files") and len(err) == 2 and "401" in err[1]
    assert run_cli(["push", str(tmp_path / "nothing"), "carol/lenet"]) == 2


# -- fault injection: slow, truncated, tampered; unsafe checkpoints ------------------------------------


def test_a_slow_hub_times_out_with_a_clear_error(hub, tmp_path, monkeypatch):
    import time

    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    monkeypatch.setenv("HF_SPARSE_HUB_TIMEOUT", "0.5")
    hub.delay = 2.0
    started = time.perf_counter()
    with pytest.raises(HubError, match=r"alice/slow.*did not answer within 0.5 s") as slow:
        push_to_hub(folder, "alice/slow", token=HUB_TOKEN, endpoint=hub.url)
    assert time.perf_counter() - started < 60 and "\n" not in str(slow.value)
    hub.delay = 0.0
    push_to_hub(folder, "alice/slow", token=HUB_TOKEN, endpoint=hub.url)  # the Hub is back: it goes through
    hub.delay = 2.0
    with pytest.raises(CheckpointError, match=r"alice/slow"):
        pull(hub, "alice/slow", tmp_path)


def test_truncated_and_tampered_downloads_are_refused(hub, tmp_path):
    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    push_to_hub(folder, "alice/lenet", token=HUB_TOKEN, endpoint=hub.url)
    hub.truncate_downloads = True
    with pytest.raises(CheckpointError, match="alice/lenet"):
        pull(hub, "alice/lenet", tmp_path)
    hub.truncate_downloads, hub.tamper = False, True
    with pytest.raises(CheckpointError, match=r"model.safetensors: SHA-256 differs"):
        pull(hub, "alice/lenet", tmp_path)
    tampered = pull(hub, "alice/lenet", tmp_path, verify=False)  # the caller's choice, on purpose
    theirs, ours = tampered.state_dict(), model.state_dict()
    assert [k for k in ours if not torch.equal(theirs[k], ours[k])] == ["fc2.weight"]  # last tensor of the file
    hub.tamper = False
    assert torch.equal(logits(pull(hub, "alice/lenet", tmp_path), X_MNIST), logits(model, X_MNIST))


def test_weight_files_outside_the_checkpoint_are_refused(tmp_path):
    import json
    import shutil

    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    (tmp_path / "outside").mkdir()
    shutil.move(folder / "model.safetensors", tmp_path / "outside" / "x.safetensors")
    index = {"metadata": {}, "weight_map": {"fc1.weight": "../outside/x.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'../outside/x.safetensors', outside the checkpoint folder"):
        load_sparse(folder, verify=False)


def test_remote_code_is_never_run(tmp_path):
    import json

    model, report = sparse_lenet(density=0.1)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="auto_map.*never does"):
        load_sparse(folder)
    assert not marker.exists()
