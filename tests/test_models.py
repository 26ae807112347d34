"""Every model source builds from a recipe section and trains under (Sparse)Trainer."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.config.recipe import ModelConfig
from hf_sparse.models import build_model
from hf_sparse.models.build import TimmClassifier
from tests.helpers import make_trainer

SOURCES = {
    "lenet300_100": ModelConfig(source="hf_sparse", name="lenet300_100"),
    "lenet5": ModelConfig(source="hf_sparse", name="lenet5"),
    "timm_resnet10t": ModelConfig(source="timm", name="resnet10t"),
    "hf_vit": ModelConfig(source="transformers", config={
        "model_type": "vit", "image_size": 28, "patch_size": 7, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64}),
    "hf_resnet": ModelConfig(source="transformers", config={
        "model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]}),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_model_source_trains_sparsely(fmnist_small, tmp_path, name):
    model = build_model(SOURCES[name], fmnist_small)
    trainer = make_trainer(fmnist_small, tmp_path, {"method": "gmp", "target_density": 0.5,
                                                    "params": {"start_step": 0, "end_step": 2}},
                           model=model, max_steps=3, per_device_train_batch_size=16)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.sparsifier.density() == pytest.approx(0.5, abs=0.01)
    layer_types = {t.layer_type for t in trainer.sparsifier.targets}
    assert "Linear" in layer_types or "Conv2d" in layer_types
    logits = trainer.predict(fmnist_small.eval.select(range(4))).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    assert logits.shape == (4, 10)


def test_lenet5_is_the_caffe_architecture(fmnist_small):
    model = build_model(SOURCES["lenet5"], fmnist_small)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    assert shapes == {"conv1.weight": (20, 1, 5, 5), "conv2.weight": (50, 20, 5, 5),
                      "fc1.weight": (500, 800), "classifier.weight": (10, 500)}


def test_lenet300_100_shapes_and_roundtrip(fmnist_small, tmp_path):
    from transformers import AutoModelForImageClassification

    model = build_model(SOURCES["lenet300_100"], fmnist_small)
    assert [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")] == [
        (300, 784), (100, 300), (10, 100)]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.config.id2label[9] == "Ankle boot"


def test_timm_wrapper_exposes_the_timm_model(fmnist_small):
    model = build_model(SOURCES["timm_resnet10t"], fmnist_small)
    assert isinstance(model, TimmClassifier) and model.timm_name == "resnet10t"
    assert model.model.conv1[0].in_channels == 1  # in_chans from the data


def test_unknown_names_are_plain_errors(fmnist_small):
    with pytest.raises(ValueError, match="unknown hf_sparse model 'lenet7'"):
        build_model(ModelConfig(source="hf_sparse", name="lenet7"), fmnist_small)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model(ModelConfig(source="timm", name="not_a_model"), fmnist_small)
