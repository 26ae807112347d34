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
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "401" in err
    assert run_cli(["push", str(tmp_path / "nothing"), "carol/lenet"]) == 2
