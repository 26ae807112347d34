"""Loaders return real ``datasets`` objects with the counts PROVENANCE.md states."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest

from hf_sparse.config.recipe import DataConfig
from hf_sparse.data import DataError, load_data
from hf_sparse.data.idx import IDX_FILES, read_idx


def test_fashion_mnist_matches_provenance(fmnist_full):
    assert len(fmnist_full.train) == 60_000 and len(fmnist_full.eval) == 10_000
    assert fmnist_full.train["labels"][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert fmnist_full.eval["labels"][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(fmnist_full.train["labels"][:]).tolist() == [6000] * 10  # one array, not 60,000 rows
    assert fmnist_full.num_labels == 10 and fmnist_full.label_names[9] == "Ankle boot"
    # PROVENANCE: pixel mean/255 = 0.2860, std/255 = 0.3530 over the training set (we estimate on 1000)
    assert fmnist_full.collator.mean == pytest.approx(0.2860, abs=0.01)
    batch = fmnist_full.collator(fmnist_full.train.__getitems__([0, 1, 2, 3]))
    assert batch["pixel_values"].shape == (4, 1, 28, 28) and batch["labels"].tolist() == [9, 0, 0, 3]


def write_idx(folder, n_train=40, n_test=10, side=8, classes=3):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        with gzip.open(folder / IDX_FILES[f"{split}_images"], "wb") as f:
            f.write(struct.pack(">HBB3I", 0, 8, 3, n, side, side) + images.tobytes())
        with gzip.open(folder / IDX_FILES[f"{split}_labels"], "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, n) + labels.tobytes())
    return folder


def test_idx_reader_roundtrip(tmp_path):
    folder = write_idx(tmp_path / "idx")
    images = read_idx(folder / IDX_FILES["train_images"])
    written = np.random.default_rng(0).integers(0, 256, size=(40, 8, 8), dtype=np.uint8)  # write_idx's first draw
    assert images.dtype == np.uint8 and np.array_equal(images, written)
    assert read_idx(folder / IDX_FILES["test_labels"]).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_data_path_points_at_another_idx_folder(tmp_path):
    folder = write_idx(tmp_path / "idx")
    bundle = load_data(DataConfig(name="fashion_mnist", path=str(folder)))
    assert len(bundle.train) == 40 and len(bundle.eval) == 10 and bundle.num_labels == 3
    batch = bundle.collator(bundle.train.__getitems__([0, 1]))
    assert batch["pixel_values"].shape == (2, 1, 8, 8) and bundle.info["image_size"] == 8


def test_idx_folder_missing_files(tmp_path):
    with pytest.raises(DataError, match="lacks the idx files"):
        load_data(DataConfig(name="idx", path=str(tmp_path)))


def test_subsampling_is_seeded(fmnist_full):
    cfg = DataConfig(name="fashion_mnist", max_train_samples=100, max_eval_samples=50, seed=1)
    a, b = load_data(cfg), load_data(cfg)
    assert len(a.train) == 100 and len(a.eval) == 50
    assert a.train["labels"][:].tolist() == b.train["labels"][:].tolist()


@pytest.mark.parametrize("damage,words", [
    (lambda f: f.write_bytes(b"this is not gzip at all"), "cannot decompress"),
    (lambda f: f.write_bytes(f.read_bytes()[:40]), "truncated"),
    (lambda f: f.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 99, 8, 8) + bytes(64))),
     "the header claims shape [99, 8, 8]"),
], ids=["junk", "truncated", "short-of-header"])
def test_corrupt_idx_is_a_located_data_error(tmp_path, capsys, damage, words):
    from hf_sparse.cli import main

    folder = write_idx(tmp_path / "idx")
    damage(folder / IDX_FILES["train_images"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: lenet300_100}}\ndata:\n  name: idx\n  path: {folder}\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{recipe}:4:" in err and "data.path: " in err and IDX_FILES["train_images"] in err and words in err, err
    assert err.count("\n") == 0 and not out.exists()


def test_idx_label_count_must_match(tmp_path):
    folder = write_idx(tmp_path / "idx")
    with gzip.open(folder / IDX_FILES["test_labels"], "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 7) + bytes(7))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: 7 labels for the 10 images"):
        load_data(DataConfig(name="idx", path=str(folder)))


def test_corrupt_fsdd_is_a_data_error(tmp_path):
    import io
    import tarfile

    folder = tmp_path / "fsdd"
    (folder / "recordings").mkdir(parents=True)
    (folder / "recordings" / "3_theo_1.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(DataError, match=r"3_theo_1.wav: not a readable WAV file"):
        load_data(DataConfig(name="fsdd", path=str(folder)))
    shutil.rmtree(folder / "recordings")
    with tarfile.open(folder / "fsdd.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("recordings/4_theo_2.wav")
        payload = b"plain text, not audio"
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match=r"fsdd.tar.gz:recordings/4_theo_2.wav: not a readable WAV file"):
        load_data(DataConfig(name="fsdd", path=str(folder)))
    (folder / "fsdd.tar.gz").write_bytes(b"\x1f\x8b junk")
    with pytest.raises(DataError, match=r"fsdd.tar.gz: not a readable tar.gz archive"):
        load_data(DataConfig(name="fsdd", path=str(folder)))


def test_a_rebuilt_source_is_reused_until_its_files_change(tmp_path):
    """The same process asking twice for unchanged data gets the same decoded splits (validate then
    train decode once); rewriting a file builds afresh; each caller's bundle is its own to change."""
    folder = write_idx(tmp_path / "idx")
    cfg = DataConfig(name="idx", path=str(folder))
    first, second = load_data(cfg), load_data(cfg)
    assert second.train is first.train and second is not first
    second.info["num_channels"] = 3
    assert first.info.get("num_channels") != 3
    assert load_data(DataConfig(name="idx", path=str(folder), max_train_samples=5)).train.num_rows == 5
    assert load_data(cfg).train.num_rows == 40
    write_idx(folder, n_train=20)
    assert load_data(cfg).train.num_rows == 20
