"""Fine-tuning from a pretrained checkpoint through a recipe: transformers (a head for other labels),
timm (a save_for_hf folder, a weights file, ``local-dir:``) and hf_sparse's own checkpoints.

Every start is checked where it matters: the backbone weights the run starts from equal the
checkpoint's, the head fits the data, and nothing touches the network.
"""

from __future__ import annotations

import time

import pytest
import torch

from hf_sparse.config.recipe import RecipeError, recipe_from_text
from hf_sparse.training.run import prepare_run

FMNIST_SMALL = "data: {name: fashion_mnist, max_train_samples: 64, max_eval_samples: 32}\n"
TRAINING = "training: {max_steps: 1, per_device_train_batch_size: 16, report_to: none}\n"


def _prepare(text: str, tmp_path, overrides: list[str] | None = None):
    recipe = recipe_from_text(text + FMNIST_SMALL + TRAINING, "recipe.yaml", overrides)
    return prepare_run(recipe, tmp_path / "run")


@pytest.fixture(scope="module")
def vit_1000(tmp_path_factory):
    """A transformers ViT image classifier saved with 1000 labels (as an ImageNet checkpoint is)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=1000)
    folder = tmp_path_factory.mktemp("vit_1000")
    model = ViTForImageClassification(config)
    model.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_transformers_head_replaced_backbone_kept(vit_1000, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, saved = vit_1000
    run = _prepare(f"model: {{source: transformers, path: {folder}, ignore_mismatched_sizes: true}}\n", tmp_path)
    state = run.model.state_dict()
    backbone = [k for k in saved if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert state["classifier.weight"].shape == (10, 32) and saved["classifier.weight"].shape == (1000, 32)
    assert run.model.config.num_labels == 10 and run.model.config.id2label[0] == "T-shirt/top"


def test_transformers_head_mismatch_names_the_option(vit_1000, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = vit_1000
    with pytest.raises(RecipeError) as err:
        _prepare(f"model: {{source: transformers, path: {folder}}}\n", tmp_path)
    assert "model.ignore_mismatched_sizes" in str(err.value)
    assert err.value.key == ("model", "ignore_mismatched_sizes")


def test_hub_id_without_hub_fails_fast_naming_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        _prepare("model: {source: transformers, path: someone/vit-imagenet, revision: v1}\n", tmp_path)
    assert time.perf_counter() - started < 20
    assert err.value.key == ("model", "path") and "model.path" in str(err.value)


@pytest.fixture(scope="module")
def timm_saved(tmp_path_factory):
    """A timm resnet10t (1 input channel, 1000 classes) written by ``timm.models.save_for_hf``, and
    the same weights as one ``.safetensors`` file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=1000, in_chans=1)
    folder = tmp_path_factory.mktemp("timm_saved")
    timm.models.save_for_hf(model, folder / "resnet10t")
    save_file(model.state_dict(), folder / "resnet10t.safetensors")
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _timm_backbone_equal(run, saved) -> None:
    state = run.model.model.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert all(torch.equal(state[k], saved[k]) for k in backbone)
    assert state["fc.weight"].shape[0] == 10 and saved["fc.weight"].shape[0] == 1000


@pytest.mark.parametrize("form", ["path_folder", "path_file", "local_dir"])
def test_timm_starts_from_local_weights(timm_saved, tmp_path, monkeypatch, form):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, saved = timm_saved
    model = {"path_folder": f"{{source: timm, path: {folder / 'resnet10t'}}}",
             "path_file": f"{{source: timm, name: resnet10t, path: {folder / 'resnet10t.safetensors'}}}",
             "local_dir": f"{{source: timm, name: 'local-dir:{folder / 'resnet10t'}'}}"}[form]
    run = _prepare(f"model: {model}\n", tmp_path)
    _timm_backbone_equal(run, saved)


def test_timm_pretrained_without_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    started = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        _prepare("model: {source: timm, name: resnet10t, pretrained: true}\n", tmp_path)
    assert time.perf_counter() - started < 20
    assert err.value.key == ("model", "pretrained") and "model.path" in str(err.value)


def test_timm_bad_paths_are_located(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "notes.txt").write_text("x")
    cases = {f"{{source: timm, name: resnet10t, path: {tmp_path / 'absent'}}}": ("model", "path"),
             f"{{source: timm, name: resnet10t, path: {tmp_path / 'notes.txt'}}}": ("model", "path"),
             f"{{source: timm, path: {tmp_path}}}": ("model", "path"),
             "{source: timm, name: 'local-dir:/nonexistent/x'}": ("model", "name")}
    for model, key in cases.items():
        with pytest.raises(RecipeError) as err:
            _prepare(f"model: {model}\n", tmp_path)
        assert err.value.key == key, (model, str(err.value))


def test_hf_sparse_dense_checkpoint_starts_a_sparse_run(tmp_path, monkeypatch):
    """Train dense, then sparsify it: one recipe with model.path; the weights at step 0 are the
    checkpoint's, and sparsity is then applied on top."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hf_sparse.training.run import execute_run

    dense = _prepare("model: {source: hf_sparse, name: lenet300_100}\n", tmp_path / "dense")
    execute_run(dense)
    ckpt = tmp_path / "dense" / "run" / "model"
    saved = {k: v.clone() for k, v in dense.model.state_dict().items()}
    run = _prepare(f"model: {{source: hf_sparse, path: {ckpt}}}\n"
                   "sparsity: {method: gmp, target_density: 0.5, targets: {exclude: ['classifier.*']}}\n",
                   tmp_path / "sparse")
    state = run.model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    execute_run(run)
    card = (tmp_path / "sparse" / "run" / "model" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model" not in front and str(tmp_path) not in front  # a local start publishes no path
    assert "License: not set" in card


# -- what the card says about where the model and data came from ---------------------------------
def test_card_base_model_license_and_dataset(tmp_path):
    from huggingface_hub import ModelCard

    from hf_sparse.checkpoint.model_card import base_model_of, card_dataset, license_of

    assert base_model_of({"source": "transformers", "path": "google/vit-base-patch16-224"}) == \
        "google/vit-base-patch16-224"
    assert base_model_of({"source": "transformers", "path": str(tmp_path)}) is None
    assert base_model_of({"source": "timm", "name": "hf-hub:timm/resnet18.a1_in1k@main"}) == "timm/resnet18.a1_in1k"
    assert base_model_of({"source": "timm", "name": "resnet18", "pretrained": True}) == "timm/resnet18.a1_in1k"
    assert base_model_of({"source": "timm", "name": "resnet18"}) is None
    assert card_dataset(str(tmp_path / "my_words")) == (None, "my_words")
    assert card_dataset("google/speech_commands") == ("google/speech_commands", "google/speech_commands")

    base = tmp_path / "base"
    base.mkdir()
    ModelCard("---\nlicense: mit\n---\n# base\n").save(base / "README.md")
    assert license_of(f"model: {{source: transformers, path: {base}}}\n") == ("mit", "the base model's")
    assert license_of(f"model: {{path: {base}}}\nexport: {{license: apache-2.0}}\n")[0] == "apache-2.0"
    unset, note = license_of("model: {source: hf_sparse, name: lenet300_100}\n")
    assert unset is None and "export.license" in note


def test_gate_targets_compare_gates(tmp_path):
    """An L0 channel run counts its target in gates: the card and the summary put the gate target
    beside the kept gates, and the chart does not draw it on the weight axis."""
    from hf_sparse.checkpoint.model_card import density_words

    facts = {"target_density": 0.5, "target_unit": "gates", "achieved_density": 0.4382,
             "method_metrics": {"hard_density": 0.5}}
    assert density_words(facts) == ("0.5000 of gates", "0.5000 of gates (0.4382 of weights)")
    assert density_words({**facts, "target_unit": "weights"}) == ("0.5000 of weights", "0.4382 of weights")
