"""The user's own model and other backbones: transformers ViT/Swin checkpoints under their saved
names, a plain nn.Module saved and loaded back, heads kept dense, image resizing, timm backbones."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification

from hf_sparse import SparseTrainer, load_sparse
from hf_sparse.checkpoint.files import DENSE_WEIGHTS
from hf_sparse.checkpoint.formats.bitmask import BITMASK_WEIGHTS
from hf_sparse.checkpoint.model_io import saved_names
from hf_sparse.checkpoint.save_and_load import CheckpointError
from hf_sparse.cli import main as cli_main
from hf_sparse.config.recipe import recipe_from_text
from hf_sparse.grids.targets import TargetSpec, head_weight_names, resolve_targets
from hf_sparse.training.run import prepare_run, summary_table
from tests.helpers import REPO, tiny_args

GMP_02 = {"method": "gmp", "target_density": 0.2, "params": {"start_step": 2, "end_step": 10, "frequency": 2}}
L0_CHANNEL = {"method": "l0", "target_density": 0.5, "granularity": "channel",
              "params": {"control": "constrained", "constraint": "model", "count": "gates", "gate_lr": 0.2,
                         "target_warmup": 0.2, "freeze_fraction": 0.2}}

TRANSFORMERS_CONFIGS = {  # small enough to train a few steps on 28x28 grey images
    "vit": dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=256),
    "swin": dict(image_size=28, patch_size=4, num_channels=1, embed_dim=64, depths=[2], num_heads=[2],
                 window_size=7),
}


def train(model, data, tmp_path, sparsity, steps=12) -> SparseTrainer:
    trainer = SparseTrainer(model=model, args=tiny_args(tmp_path / "run", max_steps=steps, learning_rate=2e-3),
                            train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                            compute_metrics=data.compute_metrics, sparsity=sparsity)
    trainer.train()
    return trainer


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(pixel_values=batch["pixel_values"])
    return out["logits"] if isinstance(out, dict) else out.logits


# -- transformers: the names on disk ----------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TRANSFORMERS_CONFIGS))
def test_transformers_bitmask_checkpoint_uses_the_saved_names(fmnist_small, tmp_path, model_type, capsys, one_thread):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_labels=10, **TRANSFORMERS_CONFIGS[model_type])
    model = AutoModelForImageClassification.from_config(config)
    rename = saved_names(model)
    assert any(k != v for k, v in rename.items()), "transformers renames this architecture's weights on save"
    trainer = train(model, fmnist_small, tmp_path, GMP_02)
    dense, bitmask = tmp_path / "dense", tmp_path / "bitmask"
    trainer.save_sparse_model(dense, format="dense")
    trainer.save_sparse_model(bitmask, format="bitmask")

    targets = {rename[t.name] for t in trainer.sparsifier.targets}
    for folder in (dense, bitmask):
        recorded = json.loads((folder / "sparsity.json").read_text())["per_layer"]
        assert set(recorded) == targets  # every target, under its name on disk
        assert cli_main(["inspect", str(folder)]) == 0
        assert "MISMATCH" not in capsys.readouterr().out
    with safe_open(str(bitmask / BITMASK_WEIGHTS), framework="pt") as f:
        layout = json.loads(f.metadata()["hf_sparse.bitmask"])
    assert set(layout) == targets  # every target is bit-packed, not only those whose names agree
    ratio = (bitmask / BITMASK_WEIGHTS).stat().st_size / (dense / DENSE_WEIGHTS).stat().st_size
    assert ratio <= 0.35, ratio

    batch = fmnist_small.collator([fmnist_small.eval[i] for i in range(8)])
    expected = logits(trainer.model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "densities differ" warning
        for folder in (dense, bitmask):
            assert torch.equal(logits(load_sparse(folder), batch), expected)


# -- a plain nn.Module ------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A user's own CNN with BatchNorm: keyword inputs and a dict output, as Trainer expects."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, pixel_values, labels=None):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(pixel_values))), 2)
        x = F.relu(self.bn2(self.conv2(x))).mean((2, 3))
        out = {"logits": self.fc(x)}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"], labels)
        return out


@pytest.mark.parametrize("sparsity", [
    {"method": "dns", "target_density": 0.3, "params": {"start_iter": 2, "iter_stop": 10, "recalibrate_every": 4}},
    L0_CHANNEL,
], ids=["dns", "l0-channel"])
def test_plain_module_saves_and_loads_into_a_fresh_instance(fmnist_small, tmp_path, sparsity, one_thread):
    torch.manual_seed(0)
    trainer = train(SmallCNN(), fmnist_small, tmp_path, sparsity)
    assert "fc.weight" not in {t.name for t in trainer.sparsifier.targets}  # the head stays dense
    out = trainer.save_sparse_model(tmp_path / "ckpt", format="bitmask")
    info = json.loads((out / "sparsity.json").read_text())
    assert info["library"] == "torch" and info["model_class"].endswith("SmallCNN")
    assert "load_sparse" in (out / "README.md").read_text()

    batch = fmnist_small.collator([fmnist_small.eval[i] for i in range(16)])
    expected = logits(trainer.model, batch)
    fresh = SmallCNN()
    loaded = load_sparse(out, model=fresh)
    assert loaded is fresh and not loaded.training
    assert torch.equal(logits(loaded, batch), expected)
    if sparsity["method"] == "l0":  # pruned channels emit exactly 0 after their BatchNorm
        gated = loaded.conv1.weight.flatten(1).abs().sum(1) == 0
        assert gated.any()
        with torch.no_grad():
            assert torch.all(loaded.bn1(loaded.conv1(batch["pixel_values"]))[:, gated] == 0)
    with pytest.raises(CheckpointError, match="model=module"):
        load_sparse(out)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_sparse(out, model=nn.Linear(3, 2))


# -- heads and target patterns ----------------------------------------------------------------------


def test_heads_are_found_and_kept_dense():
    import timm

    from hf_sparse.models.build import TimmClassifier

    timm_model = TimmClassifier(timm.create_model("resnet18", num_classes=10, in_chans=1), "resnet18")
    assert head_weight_names(timm_model) == {"model.fc.weight"}
    vit = AutoModelForImageClassification.from_config(
        AutoConfig.for_model("vit", num_labels=10, **TRANSFORMERS_CONFIGS["vit"]))
    assert head_weight_names(vit) == {"classifier.weight"}
    names = {t.name for t in resolve_targets(timm_model)}
    assert "model.fc.weight" not in names and "model.conv1.weight" in names
    assert "model.fc.weight" in {t.name for t in resolve_targets(timm_model, TargetSpec(include_head=True))}
    assert head_weight_names(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))) == set()  # no named head


def recipe(text_sparsity: str, data: str = "", model: str = "  source: hf_sparse\n  name: lenet300_100\n"):
    return recipe_from_text(f"model:\n{model}data:\n  name: fashion_mnist\n  max_train_samples: 64\n"
                            f"  max_eval_samples: 32\n{data}sparsity:\n{text_sparsity}", "r.yaml")


def test_unmatched_exclude_warns_and_unmatched_include_is_located(tmp_path):
    with pytest.warns(UserWarning, match="no_such_layer"):
        run = prepare_run(recipe("  method: gmp\n  target_density: 0.5\n  targets:\n"
                                 "    exclude: ['no_such_layer.*']\n"), tmp_path)
        SparseTrainer(model=run.model, args=run.args, train_dataset=run.data.train,
                      data_collator=run.data.collator, sparsity=run.recipe.sparsity)
    with pytest.raises(Exception, match=r"r\.yaml:\d+:\d+: sparsity\.targets\.include\.0"):
        prepare_run(recipe("  method: gmp\n  target_density: 0.5\n  targets:\n    include: ['nope.*']\n"), tmp_path)


# -- image size and channels ------------------------------------------------------------------------


def test_image_size_and_channels_resize_in_the_collator(tmp_path):
    run = prepare_run(recipe("  method: none\n", data="  image_size: 40\n  channels: 3\n",
                             model="  source: timm\n  name: resnet18\n"), tmp_path)
    batch = run.data.collator([run.data.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 40, 40)
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])  # grey replicated to RGB
    assert run.model.model.conv1.in_channels == 3
    from timm.data import resolve_data_config

    assert run.data.collator.interpolation == resolve_data_config({}, model=run.model.model)["interpolation"]


def test_too_small_images_are_a_located_validation_error(tmp_path, capsys, one_thread):
    path = tmp_path / "r.yaml"
    path.write_text((REPO / "recipes" / "fmnist_timm_l0_channel.yaml").read_text())
    assert cli_main(["validate", str(path), "--set", "model.name=convnext_atto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.image_size" in err and "1×28×28" in err
    assert f"{path}:" in err
    assert cli_main(["validate", str(path), "--set", "model.name=convnext_atto", "data.image_size=32"]) == 0


# -- the timm recipe: a few steps of each backbone --------------------------------------------------


@pytest.mark.parametrize("name,size", [("resnet18", None), ("mobilenetv3_small_050", None),
                                       ("efficientnet_b0", None), ("convnext_atto", 32)])
def test_timm_recipe_trains_each_backbone_with_a_dense_head(tmp_path, name, size, one_thread):
    from hf_sparse.config.recipe import load_recipe
    from hf_sparse.training.run import make_trainer

    overrides = [f"model.name={name}", "data.max_train_samples=64", "data.max_eval_samples=32",
                 "training.max_steps=3", "training.per_device_train_batch_size=16", "training.disable_tqdm=true"]
    overrides += [f"data.image_size={size}"] if size else []
    run = prepare_run(load_recipe(REPO / "recipes" / "fmnist_timm_l0_channel.yaml", overrides), tmp_path)
    trainer = make_trainer(run)
    trainer.train()
    head = head_weight_names(trainer.model)
    assert head and not head & {t.name for t in trainer.sparsifier.targets}
    for name_ in head:
        assert torch.count_nonzero(trainer.model.get_parameter(name_)) == trainer.model.get_parameter(name_).numel()
    assert trainer.sparsifier.method_metrics()["hard_density"] == pytest.approx(0.5, abs=0.02)


# -- output -----------------------------------------------------------------------------------------


def test_summary_table_shows_the_density_in_the_targets_unit():
    results = {"method": "l0", "target_density": 0.5, "target_unit": "gates", "achieved_density": 0.4631,
               "method_metrics": {"hard_density": 0.5}, "eval": {"accuracy": 0.9},
               "train_runtime_s": 1.0, "train_steps": 3}
    table = summary_table(results)
    assert "0.5000 of gates (0.4631 of weights)" in table and "target density    0.5000 of gates" in table
    assert "0.4631 of weights" in summary_table({**results, "target_unit": "weights"})


def test_per_layer_densities_go_to_tensorboard_not_the_console(fmnist_small, tmp_path, one_thread, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import make_trainer

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(fmnist_small, tmp_path, GMP_02, max_steps=6, logging_steps=3, report_to="tensorboard")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and "sparsity/density" in logged[-1]
    assert not any(k.startswith("sparsity/density/") for h in logged for k in h)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "train/sparsity/density/fc1.weight" in events.Tags()["scalars"]


@pytest.mark.parametrize("model_type,config", [
    ("resnet", dict(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])),
    ("convnext", dict(num_channels=1, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
], ids=["resnet", "convnext"])
def test_other_transformers_vision_models_round_trip_as_bitmask(tmp_path, model_type, config, capsys):
    """Architectures transformers saves under their in-memory names: the same checks, pruned by hand."""
    from tests.test_export import magnitude_prune, make_report

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(AutoConfig.for_model(model_type, num_labels=10, **config))
    names = [t.name for t in resolve_targets(model)]
    magnitude_prune(model, names, 0.2)
    out = tmp_path / "ckpt"
    from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint

    save_sparse_checkpoint(model, out, report=make_report(model, names, target=0.2), format="bitmask")
    assert set(json.loads((out / "sparsity.json").read_text())["per_layer"]) == {saved_names(model)[n] for n in names}
    assert cli_main(["inspect", str(out)]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
    x = torch.randn(2, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(logits(load_sparse(out), {"pixel_values": x}), logits(model, {"pixel_values": x}))


def test_exporting_a_one_channel_timm_model_does_not_warn_about_its_mean_and_std(tmp_path, caplog):
    import logging

    import timm

    from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint

    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)  # built by the user: ImageNet's 3-value mean
    report = {"method": "none", "target_density": None, "achieved_density": 1.0, "per_layer": {}}
    with caplog.at_level(logging.WARNING):
        out = save_sparse_checkpoint(model, tmp_path / "ckpt", report=report)
    assert "does not match" not in caplog.text
    config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert len(config["mean"]) == len(config["std"]) == 1


def test_fixed_size_vit_on_small_images_names_both_fixes(tmp_path, capsys, one_thread):
    """timm's ViT checks its input size with torch._assert (an AssertionError, not a RuntimeError)."""
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  source: timm\n  name: vit_tiny_patch16_224\ndata:\n  name: fashion_mnist\n"
                    "  max_train_samples: 16\n  max_eval_samples: 8\nsparsity:\n  method: gmp\n  target_density: 0.5\n")
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}:" in err and "Traceback" not in err
    assert "built for 224×224 images" in err and "model.kwargs: {img_size: 28}" in err
    assert cli_main(["validate", str(path), "--set", "model.kwargs={img_size: 28}"]) == 0
