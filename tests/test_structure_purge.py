"""Purging channel groups: smaller models with the gated model's outputs, saved, reloaded, pushed.

Each model gets the state a structured run leaves behind: about half of the channels of every
found group zeroed in all their producing ("out") tensors, BatchNorm statistics away from their
initial values. The purged model must give the gated model's outputs within 1e-5 (max abs, fp32),
have fewer parameters, and come back identical through a ``purged`` checkpoint.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from hf_sparse.checkpoint.save_and_load import CheckpointError, load_sparse, save_sparse_checkpoint
from hf_sparse.structure.purge import (
    PurgeError,
    keep_by_magnitude,
    mask_channels,
    purge_copy,
    purge_model,
    resize_to_plan,
    zero_channels,
)
from tests.helpers import run_steps

TOL = 1e-5


def report_of(model: nn.Module, method: str = "l0", granularity: str = "group") -> dict:
    """A run report naming every matrix/conv weight (the checkpoint records and checks their densities)."""
    return {"method": method, "granularity": granularity, "structure": None,
            "per_layer": {n: {} for n, p in model.named_parameters() if p.dim() > 1}}


def timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kwargs).eval()


def hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2],
                       layer_type="bottleneck", num_labels=10)
    return ResNetForImageClassification(cfg).eval()


def hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    cfg = ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, image_size=32)
    return ConvNextForImageClassification(cfg).eval()


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(num_channels=1, image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(cfg).eval()


MODELS = {
    "resnet18": lambda: timm_model("resnet18"),
    "resnet10t": lambda: timm_model("resnet10t"),
    "mobilenetv3_small_050": lambda: timm_model("mobilenetv3_small_050"),
    "convnext_atto": lambda: timm_model("convnext_atto"),
    "vit_tiny_patch16_224": lambda: timm_model("vit_tiny_patch16_224", img_size=32),
    "hf_resnet": hf_resnet,
    "hf_convnext": hf_convnext,
    "hf_vit": hf_vit,
}


def inputs(model: nn.Module, batch: int = 2) -> torch.Tensor | dict[str, torch.Tensor]:
    x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"pixel_values": x} if hasattr(model, "config") else x


def logits(model: nn.Module, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def run(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return logits(model, x)


def gated(model: nn.Module, density: float = 0.5):
    """``model`` as a structured run leaves it: ~half of every group's channels zeroed; its groups."""
    from hf_sparse.structure.groups import find_groups

    groups = find_groups(model, inputs(model, 1))
    assert groups, "no channel group found"
    with torch.no_grad():
        _perturb_norms(model)
    mask_channels(model, groups, keep_by_magnitude(model, groups, density))
    return model, groups


def _perturb_norms(model: nn.Module) -> None:
    for m in model.modules():  # statistics and affine terms away from 0/1, so they must be sliced right
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_purge_equals_gated_and_plan_rebuilds_it(name):
    model, groups = gated(MODELS[name]())
    x = inputs(model)
    ref = run(model, x)
    small = copy.deepcopy(model)
    keep = zero_channels(small, groups)
    assert sum(len(v) for v in keep.values()) < sum(g.channels for g in groups)
    plan = json.loads(json.dumps(purge_model(small, groups, keep)))  # the plan is JSON
    assert (run(small, x) - ref).abs().max() <= TOL
    assert n_params(small) < n_params(model)
    fresh = resize_to_plan(MODELS[name](), plan)  # the loading side: dense build -> recorded shapes
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(run(fresh.eval(), x), run(small, x))


@pytest.mark.parametrize("name", list(MODELS))
def test_purged_checkpoint_round_trip(name, tmp_path):
    model, _ = gated(MODELS[name]())
    x = inputs(model)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report_of(model), format="purged")
    sparsity = json.loads((folder / "sparsity.json").read_text())
    purged = sparsity["purged"]
    assert purged["params"]["purged"] < purged["params"]["dense"] and 0 < purged["macs"]["fraction"] < 1
    assert purged["max_abs_diff"] <= TOL and purged["plan"]["shapes"]
    loaded = load_sparse(folder)
    assert n_params(loaded) == purged["params"]["purged"]
    assert (run(loaded, x) - run(model, x)).abs().max() <= TOL
    card = (folder / "README.md").read_text()
    assert "purged model vs dense" in card
    if name == "hf_vit":  # every layer kept the same heads and MLP width: the config says so
        assert purged["config"]["num_attention_heads"] == 2 and purged["config"]["intermediate_size"] == 32
        assert "expresses the purged shapes" in card
    else:
        assert purged["config"] is None and "cannot express the purged widths" in card


def test_uniform_vit_loads_with_plain_from_pretrained(tmp_path):
    from transformers import ViTForImageClassification

    model, _ = gated(hf_vit())
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report_of(model), format="purged")
    plain = ViTForImageClassification.from_pretrained(folder).eval()
    assert plain.config.num_attention_heads == 2
    x = inputs(model)
    assert (run(plain, x) - run(model, x)).abs().max() <= TOL


def test_uneven_widths_are_refused_by_plain_from_pretrained(tmp_path):
    from transformers import ViTForImageClassification

    from hf_sparse.structure.groups import find_groups

    model = hf_vit()
    groups = find_groups(model, inputs(model, 1))
    keep = {g.name: torch.arange(g.channels) for g in groups}
    first = groups[0]
    keep[first.name] = keep[first.name][: max(1, first.channels // 2)]  # one group only: widths differ per layer
    mask_channels(model, groups, keep)
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report_of(model), format="purged")
    assert json.loads((folder / "sparsity.json").read_text())["purged"]["config"] is None
    with pytest.raises(Exception, match="(?i)size|shape"):
        ViTForImageClassification.from_pretrained(folder)
    x = inputs(model)
    assert (run(load_sparse(folder), x) - run(model, x)).abs().max() <= TOL


def test_removing_a_live_channel_is_refused():
    model, groups = gated(timm_model("resnet18"), density=1.0)
    g = groups[0]
    with pytest.raises(PurgeError, match=f"group {g.name}: channels \\[0"):
        purge_model(model, [g], {g.name: torch.arange(1, g.channels)})


@dataclass(frozen=True)
class _Slice:
    tensor: str
    module: str
    dim: int
    index: torch.Tensor
    role: str


@dataclass
class _Group:
    name: str
    channels: int
    slices: list


class _Scale(nn.Module):
    """A module type no purge rule knows."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.s[:, None, None]


def test_unsupported_module_is_one_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _Scale(4), nn.Conv2d(4, 2, 3))
    idx = torch.arange(4)[:, None]
    group = _Group("0", 4, [_Slice("0.weight", "0", 0, idx, "out"), _Slice("0.bias", "0", 0, idx, "out"),
                            _Slice("1.s", "1", 0, idx, "in"), _Slice("2.weight", "2", 1, idx, "in")])
    mask_channels(model, [group], {"0": torch.tensor([0, 1])})
    with pytest.raises(PurgeError, match=r"module '1' \(_Scale\)"):
        purge_model(model, [group], {"0": torch.tensor([0, 1])})


def test_hand_built_groups_depthwise_and_linear():
    """The generic slicing on known groups: conv -> depthwise conv -> BN -> pooled Linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    c6, c8 = torch.arange(6)[:, None], torch.arange(8)[:, None]
    g1 = _Group("0", 6, [_Slice("0.weight", "0", 0, c6, "out"), _Slice("0.bias", "0", 0, c6, "out"),
                         _Slice("1.weight", "1", 0, c6, "out"), _Slice("1.bias", "1", 0, c6, "out"),
                         *[_Slice(f"2.{t}", "2", 0, c6, "out") for t in ("weight", "bias", "running_mean",
                                                                           "running_var")],
                         _Slice("6.weight", "6", 1, c6, "in")])
    g2 = _Group("6", 8, [_Slice("6.weight", "6", 0, c8, "out"), _Slice("6.bias", "6", 0, c8, "out"),
                         _Slice("8.weight", "8", 1, c8, "in")])
    keep = {"0": torch.tensor([1, 3, 4]), "6": torch.tensor([0, 2, 5, 7])}
    mask_channels(model, [g1, g2], keep)
    x = torch.randn(2, 1, 9, 9)
    ref = model(x)
    plan = purge_model(model, [g1, g2], keep)
    assert (model(x) - ref).abs().max() <= TOL
    dw = model[1]
    assert (dw.in_channels, dw.out_channels, dw.groups, model[2].num_features) == (3, 3, 3, 3)
    assert plan["shapes"]["1.weight"] == [3, 1, 3, 3] and plan["shapes"]["8.weight"] == [3, 4]
    assert plan["attrs"]["6"] == {"in_features": 3, "out_features": 4}


def test_purge_copy_keeps_the_original():
    model, _ = gated(timm_model("resnet10t"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, info = purge_copy(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert info["params"]["purged"] == n_params(small) < n_params(model)


def test_push_and_load_purged_from_the_hub(hub, tmp_path):
    from hf_sparse.checkpoint.hub import push_to_hub
    from tests.conftest import HUB_TOKEN

    for repo, build in (("alice/resnet18-purged", lambda: timm_model("resnet18")), ("alice/vit-purged", hf_vit)):
        model, _ = gated(build())
        folder = save_sparse_checkpoint(model, tmp_path / repo, report=report_of(model), format="purged")
        push_to_hub(folder, repo, token=HUB_TOKEN, endpoint=hub.url)
        loaded = load_sparse(repo, endpoint=hub.url, token=HUB_TOKEN, cache_dir=tmp_path / f"cache-{repo}")
        x = inputs(model)
        assert torch.equal(run(loaded, x), run(load_sparse(folder), x))
        assert (run(loaded, x) - run(model, x)).abs().max() <= TOL


def test_cli_export_purged(tmp_path, capsys):
    from hf_sparse.cli import main

    model, _ = gated(timm_model("resnet10t"))
    save_sparse_checkpoint(model, tmp_path / "run" / "model", report=report_of(model))
    assert main(["export", str(tmp_path / "run"), "--format", "purged", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    dense, purged = n_params(model), n_params(load_sparse(tmp_path / "p"))
    assert f"purge removed {dense - purged:,} of {dense:,} parameters" in out and "bitmask" not in out
    loaded = load_sparse(tmp_path / "p")
    x = inputs(model)
    assert n_params(loaded) < n_params(model)
    assert (run(loaded, x) - run(model, x)).abs().max() <= TOL


def test_cli_export_purged_of_an_unstructured_run_names_bitmask(tmp_path, capsys):
    """Half of every weight zeroed at random removes no whole channel: the export says it removed
    nothing and names bitmask, and the Python API warns the same."""
    from hf_sparse.cli import main

    model = timm_model("resnet10t")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) < 0.5)
    report = report_of(model, "gmp", "unstructured")
    save_sparse_checkpoint(model, tmp_path / "run" / "model", report=report)
    assert main(["export", str(tmp_path / "run"), "--format", "purged", "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert f"purge removed 0 of {n_params(model):,} parameters (0.0%)" in captured.out
    assert "--format bitmask" in captured.out and "purge removed" not in captured.err  # said once
    with pytest.warns(UserWarning, match=r"purge removed 0 of .*--format bitmask"):
        save_sparse_checkpoint(model, tmp_path / "api", report=report, format="purged")


def test_purged_export_of_an_unstructured_recipe_warns_at_validate(tmp_path):
    """``export.format: purged`` with an unstructured granularity is a located warning, not an error;
    a structured granularity gets none."""
    from hf_sparse.config.recipe import recipe_from_text

    text = ("model: {source: hf_sparse, name: lenet300_100}\n"
            "sparsity: {method: gmp, target_density: 0.1}\n"
            "export:\n  format: purged\n")
    notices = recipe_from_text(text, "r.yaml").notices()
    assert len(notices) == 1 and notices[0].startswith("r.yaml:4:3: export.format: purged removes whole channels")
    assert "granularity unstructured" in notices[0] and "bitmask" in notices[0]
    assert recipe_from_text(text, "r.yaml", ["sparsity.granularity=channel"]).notices() == []
    assert recipe_from_text(text, "r.yaml", ["export.format=bitmask"]).notices() == []


def test_validate_prints_the_purged_warning(tmp_path, capsys):
    from hf_sparse.cli import main
    from hf_sparse.config.recipe import RecipeWarning

    with pytest.warns(RecipeWarning, match=r"fmnist_lenet300_gmp.yaml .*export.format: purged removes whole channels"):
        assert main(["validate", "recipes/fmnist_lenet300_gmp.yaml", "--set", "export.format=purged",
                     "training.max_steps=1"]) == 0


def test_load_refuses_a_plan_that_does_not_fit(tmp_path):
    model, _ = gated(timm_model("resnet10t"))
    folder = save_sparse_checkpoint(model, tmp_path / "ck", report=report_of(model), format="purged")
    sparsity = json.loads((folder / "sparsity.json").read_text())
    sparsity["purged"]["plan"]["shapes"]["no.such.weight"] = [1]
    (folder / "sparsity.json").write_text(json.dumps(sparsity))
    with pytest.raises(CheckpointError, match="no.such.weight"):
        load_sparse(folder)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_group_steps_then_purge(name):
    """Train a few steps of gmp at ``granularity: group`` (every coupled group to half its channels),
    then purge: the purged model keeps exactly those channels and gives the trained model's outputs."""
    from hf_sparse.config.recipe import SparsityConfig
    from hf_sparse.training.sparsifier import Sparsifier

    model = MODELS[name]().train()
    config = SparsityConfig(method="gmp", target_density=0.5, granularity="group",
                            targets={"layer_types": ["Conv2d", "Linear"]},
                            params={"start_fraction": 0.0, "end_fraction": 0.5, "frequency": 1})
    sp = Sparsifier(model, config, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = inputs(model, 4), torch.arange(4)
    steps = 4
    sp.setup(steps)
    run_steps(sp, opt, lambda step: nn.functional.cross_entropy(logits(model, x), y), steps)
    sp.finalize()
    model.eval()
    small, info = purge_copy(model, inputs=inputs(model, 1))
    grids = sp.method.grids
    assert grids and set(info["kept"]) == {g.name for g in grids}
    for grid, mask in zip(grids, sp.method.group_masks()):
        assert abs(int(mask.sum()) - mask.numel() / 2) <= 0.5, grid.name  # half of every group's channels
        assert info["kept"][grid.name] == mask.flatten().nonzero().flatten().tolist(), grid.name  # and only those
    assert info["max_abs_diff"] <= TOL and info["params"]["purged"] < info["params"]["dense"]
    x = inputs(model)
    assert (run(small, x) - run(model, x)).abs().max() <= TOL
