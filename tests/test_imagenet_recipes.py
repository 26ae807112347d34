"""The ImageNet-scale recipes and the lazily decoded image sources they read.

The recipes name the Hub's ImageNet-1k, which cannot be reached here; the tests point them at a
tiny ImageFolder tree (``data.name=image_folder data.path=...``), which goes through the same
lazy-decoding and timm-transform code as the Hub dataset with ``data.transforms: timm``.
"""

from __future__ import annotations

import glob
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_sparse import load_sparse
from hf_sparse.cli import main as cli_main
from hf_sparse.config.recipe import DataConfig
from hf_sparse.data import DataError, load_data
from tests.helpers import REPO

CLASSES = ("goldfish", "tabby", "tractor")
IMAGENET_RECIPES = sorted(glob.glob(str(REPO / "recipes" / "imagenet_*.yaml")))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``train/<class>/`` and ``val/<class>/`` with images of mixed sizes, modes and formats."""
    root = tmp_path_factory.mktemp("imagenet_tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = 40 + 7 * i, 56 - 5 * i
                if i % 2:  # a grey JPEG among the RGB PNGs, as in ImageNet
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(root / split / c / f"{i}.jpg")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_decodes_and_transforms_per_example(image_folder):
    bundle = load_data(DataConfig(name="image_folder", path=str(image_folder), image_size=32, max_train_samples=10))
    assert bundle.label_names == list(CLASSES) and bundle.num_labels == 3
    assert (len(bundle.train), len(bundle.eval)) == (10, 6)  # the eval split is val/, not train/
    assert bundle.train.column_names == ["pixel_values", "labels"]  # what Trainer keeps for the model
    batch = bundle.collator([bundle.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    # evaluation is deterministic (resize + centre crop), training is random (random-resized crop)
    assert torch.equal(bundle.eval[1]["pixel_values"], bundle.eval[1]["pixel_values"])
    assert not torch.equal(bundle.train[0]["pixel_values"], bundle.train[0]["pixel_values"])
    # DataLoader workers receive the datasets pickled: the transform travels with them
    again = pickle.loads(pickle.dumps(bundle.eval))
    assert torch.equal(again[1]["pixel_values"], bundle.eval[1]["pixel_values"])
    assert bundle.info["image_transform"]["input_size"] == [3, 32, 32]


def test_image_folder_errors_name_the_key(image_folder, tmp_path):
    with pytest.raises(DataError, match="needs data.path"):
        load_data(DataConfig(name="image_folder"))
    with pytest.raises(DataError, match="no train/ folder"):
        load_data(DataConfig(name="image_folder", path=str(tmp_path)))
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="image_folder", path=str(image_folder), transforms="stored"))
    assert err.value.key == "transforms"
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="fashion_mnist", transforms="timm"))
    assert err.value.key == "transforms"
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="image_folder", path=str(image_folder), channels=1))
    assert err.value.key == "channels"


def test_there_are_five_imagenet_recipes():
    names = {Path(p).stem for p in IMAGENET_RECIPES}
    assert names == {"imagenet_resnet50_gmp", "imagenet_resnet50_dns", "imagenet_resnet50_l0_channel",
                     "imagenet_vit_small_gmp", "imagenet_vit_small_l0_neuron"}


@pytest.mark.parametrize("recipe", IMAGENET_RECIPES, ids=lambda p: Path(p).stem)
def test_imagenet_recipe_validates_and_trains_a_few_steps(recipe, image_folder, tmp_path):
    local = ["data.hub_id=null", "data.name=image_folder", f"data.path={image_folder}", "data.image_size=64"]
    # the recipe's architecture at a fraction of its depth (every stage and layer type it targets is
    # still there): a few CPU steps of the full 25M/22M-weight models are ~30 s each, and test nothing more
    if "vit" in Path(recipe).stem:
        local.append("model.kwargs={img_size: 64, depth: 2}")
    else:
        local.append("model.kwargs={layers: [1, 1, 1, 1]}")
    assert cli_main(["validate", recipe, "--set", *local]) == 0
    small = ["training.max_steps=3", "training.per_device_train_batch_size=4", "training.per_device_eval_batch_size=6",
             "training.dataloader_num_workers=0", "training.save_strategy=no", "training.eval_strategy=no",
             "training.logging_steps=1", "training.disable_tqdm=true"]
    if "_gmp" in recipe or "_dns" in recipe:  # prune within the three steps: from step 0 to the window's end
        small += ["sparsity.params.start_fraction=0.0"]  # (each update ranks all the weights: only those two)
    out = tmp_path / "run"
    assert cli_main(["train", recipe, "--output-dir", str(out), "--set", *local, *small]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["eval"]["accuracy"] <= 1.0 and results["achieved_density"] < 1.0
    model = load_sparse(out / "model").eval()  # a plain timm model, as timm.create_model builds it
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, len(CLASSES))
