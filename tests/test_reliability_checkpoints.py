"""Hostile and damaged checkpoints (the corpus in ``tests/hostile``) through ``load_sparse``,
``hf-sparse inspect`` and ``hf-sparse export``: each is refused with one line naming the file and
what is wrong, never a traceback; export touches only files it wrote."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_sparse.checkpoint.save_and_load import CheckpointError, load_sparse, save_sparse_checkpoint
from hf_sparse.cli import main
from tests.hostile import CASES, build_corpus, timm_with_checkpoint_path
from tests.test_export import X_MNIST, folder_hashes, logits, sparse_lenet, sparse_timm

IDS = [f"{c.name}/{k}" for c in CASES for k in c.kinds]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model, report = sparse_lenet(density=0.1)
    return {kind: save_sparse_checkpoint(model, root / kind, report=report, format=kind)
            for kind in ("dense", "bitmask")}


@pytest.fixture(scope="module")
def corpus(sources, tmp_path_factory):
    return build_corpus(sources, tmp_path_factory.mktemp("hostile"))


def one_error_line(err: str, command: str) -> str:
    """The one message line (progress bars of the libraries aside)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hf-sparse")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"hf-sparse {command}: error: "), err
    return lines[0]


def test_the_sources_are_sound(sources):
    for folder in sources.values():
        load_sparse(folder)
        assert main(["inspect", str(folder)]) == 0


@pytest.mark.parametrize("case_id", IDS)
def test_load_sparse_refuses(corpus, case_id):
    folder, case = corpus[case_id]
    with pytest.raises(CheckpointError, match=case.load_error) as refused:
        load_sparse(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("case_id", IDS)
def test_inspect_and_export_end_in_one_line(corpus, case_id, tmp_path, capsys):
    folder, _ = corpus[case_id]
    status = main(["inspect", str(folder)])
    captured = capsys.readouterr()
    assert status in (0, 1, 2) and "Traceback" not in captured.err
    if status == 2:
        one_error_line(captured.err, "inspect")
    out = tmp_path / "exported"
    assert main(["export", str(folder), "--format", "dense", "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "export")
    assert not out.exists() and os.listdir(tmp_path) == []  # no staging folder left behind


def test_inspect_flags_density_lies(corpus, capsys):
    for case_id in ("achieved_density_lie/dense", "dense_weights_per_layer_removed/dense"):
        assert main(["inspect", str(corpus[case_id][0])]) == 1, case_id
        assert "the tensors disagree with sparsity.json" in capsys.readouterr().err


def test_timm_config_cannot_name_a_file_to_open(tmp_path):
    wrapper, report = sparse_timm()
    folder = save_sparse_checkpoint(wrapper, tmp_path / "ck", report=report)
    target = tmp_path / "planted.pth"
    torch.save({"x": torch.zeros(1)}, target)
    timm_with_checkpoint_path(folder, target)
    with pytest.raises(CheckpointError, match=r"model_args.checkpoint_path would make timm read files"):
        load_sparse(folder, verify=False)


def test_plain_folders_load_with_an_unverified_warning(tmp_path):
    wrapper, report = sparse_timm()
    plain = save_sparse_checkpoint(wrapper, tmp_path / "plain", report=report)
    (plain / "sparsity.json").unlink()  # what timm's save_for_hf alone writes
    with pytest.warns(UserWarning, match="loaded unverified"):
        loaded = load_sparse(plain)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(logits(loaded, x), logits(wrapper.model, x))


# -- export: only its own files, only loadable checkpoints -------------------------------------------


def test_export_refuses_a_folder_with_user_files(sources, tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    (out / "model_v1.safetensors").write_text("1")
    (out / "pytorch_model_backup.bin").write_text("2")
    (out / "notes.txt").write_text("3")
    assert main(["export", str(sources["dense"]), "--format", "bitmask", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "export")
    assert "is not empty (model_v1.safetensors, notes.txt, pytorch_model_backup.bin)" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["model_v1.safetensors", "notes.txt", "pytorch_model_backup.bin"]
    assert (out / "model_v1.safetensors").read_text() == "1"
    # asked to, it replaces the checkpoint files and keeps the rest
    assert main(["export", str(sources["dense"]), "--format", "bitmask", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "3" and (out / "model.bitmask.safetensors").is_file()
    assert not list(out.glob(".X.*"))


def test_export_into_a_new_folder_loads_and_carries_no_pickles(sources, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sources["dense"], src)
    for planted in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        torch.save({"x": torch.zeros(1)}, src / planted)
    (src / "preprocessor_config.json").write_text("{}")
    out = tmp_path / "new" / "nested"
    assert main(["export", str(src), "--format", "bitmask", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {"pytorch_model.bin", "model.pt", "training_args.bin"}
    assert "preprocessor_config.json" in names
    model, _ = sparse_lenet(density=0.1)
    assert torch.equal(logits(load_sparse(out), X_MNIST), logits(model, X_MNIST))
    assert folder_hashes(src).keys() >= {"sparsity.json", "model.safetensors"}


def test_purging_a_purged_checkpoint_is_refused(tmp_path, capsys):
    model, report = sparse_lenet(density=0.1, structured=0.5)
    purged = save_sparse_checkpoint(model, tmp_path / "p", report=report, format="purged")
    assert main(["export", str(purged), "--format", "purged", "--out", str(tmp_path / "again")]) == 2
    assert "already purged" in one_error_line(capsys.readouterr().err, "export")
    assert not (tmp_path / "again").exists()


def test_inspect_into_a_closed_pipe_is_quiet(sources, tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO, launch_env

    proc = subprocess.run(f"{sys.executable} -m hf_sparse inspect {sources['dense']} | head -1", shell=True,
                          capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=120)
    assert proc.stdout.startswith("checkpoint:") and "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipeError" not in proc.stderr


def test_a_link_inside_the_folder_is_fine(sources, tmp_path):
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(sources["dense"], folder)
    (folder / "model.safetensors").rename(folder / "weights.bin.safetensors")
    os.symlink("weights.bin.safetensors", folder / "model.safetensors")
    sparsity = json.loads((folder / "sparsity.json").read_text())
    assert "model.safetensors" in sparsity["sha256"]
    load_sparse(folder)
