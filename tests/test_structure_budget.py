"""MAC / parameter counting and the expected cost of the purged model (hf_sparse.structure.budget)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse.structure.budget import CostModel, count_macs, count_params
from hf_sparse.structure.groups import ChannelGroup, Slice
from tests.helpers import run_steps


def _net() -> nn.Sequential:
    """conv(2->4, 3x3) - BN - ReLU - depthwise 3x3 - conv(4->3, 1x1, bias) - pool - Linear(3->5)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n)[:, None]


def _groups() -> list[ChannelGroup]:
    """A: conv0's 4 channels (through BN and the depthwise conv, read by conv4); B: conv4's 3 (read by the head)."""
    a = ChannelGroup("0", 4, [
        Slice("0.weight", "0", 0, _rows(4), "out"), Slice("1.weight", "1", 0, _rows(4), "out"),
        Slice("1.bias", "1", 0, _rows(4), "out"), Slice("1.running_mean", "1", 0, _rows(4), "out"),
        Slice("3.weight", "3", 0, _rows(4), "out"), Slice("4.weight", "4", 1, _rows(4), "in")])
    b = ChannelGroup("4", 3, [
        Slice("4.weight", "4", 0, _rows(3), "out"), Slice("4.bias", "4", 0, _rows(3), "out"),
        Slice("7.weight", "7", 1, _rows(3), "in")])
    return [a, b]


X = torch.randn(2, 2, 6, 6)  # batch 2: counts are per sample


def test_hand_counts():
    net = _net()
    macs = count_macs(net, X)
    # conv0 36 positions x 72 weights, depthwise 36 x 36, conv4 36 x 12, head 1 x 15
    assert macs.per_tensor == {"0.weight": 2592, "3.weight": 1296, "4.weight": 432, "7.weight": 15}
    assert macs.total == 4335
    assert count_params(net) == 72 + 8 + 36 + 15 + 20


def test_resnet18_known_figure():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18")
    assert count_params(net) == 11_689_512
    assert count_macs(net, torch.randn(1, 3, 224, 224)).total == pytest.approx(1.814e9, rel=1e-3)


def _hand(S: float, Q: float) -> tuple[float, float]:
    """Expected (params, MACs) for kept sums S (group A) and Q (group B), worked by hand."""
    params = 18 * S + 2 * S + 9 * S + S * Q + Q + 5 * Q + 5
    macs = 36 * 18 * S + 36 * 9 * S + 36 * S * Q + 5 * Q
    return params, macs


def test_expected_cost_matches_hand_values_and_dense():
    cm = CostModel(_net(), _groups(), X)
    assert (cm.dense_params, cm.dense_macs) == (151, 4335)
    p = torch.tensor([0.5, 0.25, 1.0, 0.0])
    q = torch.tensor([0.2, 0.6, 0.9])
    cost = cm.expected({"0": p, "4": q})
    hp, hm = _hand(float(p.sum()), float(q.sum()))
    assert float(cost.params) == pytest.approx(hp)
    assert float(cost.macs) == pytest.approx(hm)
    assert float(cm.fraction({"0": p, "4": q}, "macs")) == pytest.approx(hm / 4335)
    # every group closed: only the head bias is left
    assert cm.minimum("params") == pytest.approx(5 / 151)


def test_expected_cost_gradient():
    cm = CostModel(_net(), _groups(), X)
    p = torch.tensor([0.5, 0.25, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64, requires_grad=True)
    cm.expected({"0": p, "4": q}).macs.backward()
    S, Q = float(p.detach().sum()), float(q.detach().sum())
    assert torch.allclose(p.grad, torch.full((4,), 972 + 36 * Q, dtype=torch.float64))
    assert torch.allclose(q.grad, torch.full((3,), 36 * S + 5, dtype=torch.float64))


def test_kept_equals_measured_purged_model():
    """0/1 probabilities give the exact cost of the physically smaller model."""
    cm = CostModel(_net(), _groups(), X)
    kept = cm.kept({"0": torch.tensor([0, 2]), "4": torch.tensor([True, False, True])})
    small = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False),
        nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5))
    assert float(kept.macs) == count_macs(small, X).total
    assert float(kept.params) == count_params(small)


def test_same_gate_on_both_dims_costs_p():
    """A weight whose rows and columns are one group (a recurrent weight_hh): E[z z] = p on the diagonal."""
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    g = ChannelGroup("h", 4, [Slice("0.weight", "0", 0, _rows(4), "out"), Slice("0.weight", "0", 1, _rows(4), "in")])
    cm = CostModel(net, [g], torch.randn(1, 4))
    p = torch.tensor([0.5, 0.5, 1.0, 0.0])
    # off-diagonal pairs: S^2 - sum p^2 = 4 - 1.5; diagonal: sum p = 2
    assert float(cm.expected({"h": p}).params) == pytest.approx(4.5)
    # Monte Carlo check of the same expectation
    z = torch.bernoulli(p.expand(20000, 4))
    assert float((z[:, :, None] * z[:, None, :]).sum((1, 2)).mean()) == pytest.approx(4.5, abs=0.05)


def test_concat_split_dim():
    """A dim split between two groups (a concat feeding a layer): each part follows its own group."""
    net = nn.Sequential(nn.Linear(5, 2, bias=False))
    groups = [ChannelGroup("a", 3, [Slice("0.weight", "0", 1, _rows(3), "in")]),
              ChannelGroup("b", 2, [Slice("0.weight", "0", 1, torch.tensor([[3], [4]]), "in")])]
    cm = CostModel(net, groups, torch.randn(1, 5))
    cost = cm.expected({"a": torch.tensor([1.0, 0.0, 0.5]), "b": torch.tensor([0.25, 0.25])})
    assert float(cost.params) == pytest.approx(2 * (1.5 + 0.5))


# -- L0 under a budget ---------------------------------------------------------------------------
def _l0(net: nn.Module, fraction: float, kind: str = "macs", **params):
    from hf_sparse.grids import Granularity, TargetSpec, resolve_targets
    from hf_sparse.methods.l0 import L0, L0Config

    targets = resolve_targets(net, TargetSpec(include=["0.weight", "4.weight"], layer_types=["Conv2d"]))
    cfg = L0Config(control=params.pop("control", "constrained"), count="gates", gate_lr=0.1, dual_lr=1.0,
                   init_drop_rate=0.05, freeze_fraction=1.0, **params)
    method = L0(targets, cfg, None, 0, granularity=Granularity("channel"), model=net)
    # channel grids "0.weight" (gating BN "1") and "4.weight" are groups "0" and "4" of the cost model
    method.set_budget(kind, fraction, CostModel(net, _groups(), X), names=["0", "4"])
    return method


@pytest.mark.parametrize("control", ["constrained", "augmented"])
def test_l0_steps_move_expected_macs_to_the_budget(control):
    torch.manual_seed(0)
    net = _net()
    method = _l0(net, 0.3, control=control)
    steps = 60
    method.setup(steps)
    opt = torch.optim.Adam([p for p in net.parameters()] + [g.log_alpha for g in method.gates], lr=0.01)
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 5, (16,))
    start = method.metrics()["expected_macs_fraction"]
    run_steps(method, opt, lambda step: nn.functional.cross_entropy(net(x), y), steps)
    end = method.metrics()["expected_macs_fraction"]
    assert start > 0.8
    assert abs(end - 0.3) < abs(start - 0.3) / 2
    method.finalize()
    hard = method.hard_cost()
    assert hard["macs_fraction"] <= 0.3 + 1e-9
    # the frozen mask is the exact cost of what it keeps
    kept = {"0": method.masks[0], "4": method.masks[1]}
    assert hard["macs_fraction"] == pytest.approx(float(CostModel(_net(), _groups(), X).kept(kept).macs) / 4335)


def test_budget_below_the_fixed_layers_is_refused():
    with pytest.raises(ValueError, match="cannot be met"):
        _l0(_net(), 5 / 151 * 0.5, kind="params")


# -- recipe validation ---------------------------------------------------------------------------
_RECIPE = """\
model: {{source: timm, name: resnet18}}
sparsity:
  method: {method}
  granularity: {granularity}
{extra}  params: {{control: {control}}}
"""


def _recipe(method="l0", granularity="channel", control="constrained", extra="  budget: {macs: 0.25}\n"):
    from hf_sparse.config.recipe import recipe_from_text

    return recipe_from_text(_RECIPE.format(method=method, granularity=granularity, control=control, extra=extra),
                            "r.yaml")


def test_recipe_budget_accepted():
    r = _recipe()
    assert (r.sparsity.budget.kind, r.sparsity.budget.fraction) == ("macs", 0.25)
    r = _recipe(control="augmented", extra="  budget: {params: 0.3}\n")
    assert (r.sparsity.budget.kind, r.sparsity.budget.fraction) == ("params", 0.3)


@pytest.mark.parametrize("kwargs, where, message", [
    (dict(extra="  budget: {macs: 0.25, params: 0.3}\n"), "budget", "exactly one"),
    (dict(extra="  budget: {}\n"), "budget", "exactly one"),
    (dict(extra="  budget: {macs: 1.5}\n"), "macs", "less than or equal to 1"),
    (dict(extra="  budget: {flops: 0.5}\n"), "flops", ""),
    (dict(control="penalty"), "control", "constrained or augmented"),
    (dict(granularity="unstructured"), "granularity", "granularity group"),
    (dict(method="gmp", extra="  target_density: 0.5\n  budget: {macs: 0.25}\n"), "budget", "no cost budget"),
    (dict(extra="  target_density: 0.5\n  budget: {macs: 0.25}\n"), "target_density", "not both"),
])
def test_recipe_budget_errors_are_located(kwargs, where, message):
    from hf_sparse.config.recipe import RecipeError

    with pytest.raises(RecipeError) as err:
        _recipe(**kwargs)
    text = str(err.value)
    assert "r.yaml:" in text and where in text and message in text


# -- channel grids of a timm ResNet as groups, and the Sparsifier's budget -------------------------
def _resnet18():
    timm = pytest.importorskip("timm")
    from hf_sparse.models.build import TimmClassifier

    return TimmClassifier(timm.create_model("resnet18", in_chans=1, num_classes=10), "resnet18")


def _sparsity(**extra):
    from hf_sparse.config.recipe import SparsityConfig

    return SparsityConfig(method="l0", granularity="channel", targets={
        "include": [r"re:^model\.layer\d\.\d\.conv1\.weight$"], "layer_types": ["Conv2d"]},
        params={"control": "constrained", "count": "gates"}, **extra)


def test_channel_grids_of_resnet_blocks_become_groups():
    from hf_sparse.training.sparsifier import Sparsifier

    net = _resnet18()
    sp = Sparsifier(net, _sparsity(budget={"macs": 0.25}), example_inputs={"pixel_values": torch.randn(1, 1, 28, 28)})
    assert sp.cost_names[0] == "model.layer1.0.conv1.weight"
    assert len(sp.cost_names) == 8 and sp.method.budget == ("macs", 0.25)
    first = dict(zip(sp.cost.group_names, sp.cost.channels))
    assert first["model.layer4.1.conv1.weight"] == 512
    assert sp.cost.dense_macs == count_macs(net, {"pixel_values": torch.randn(1, 1, 28, 28)}).total
    metrics = sp.method_metrics()  # every gate open at eval time before training: the dense cost
    assert metrics["purged_macs_fraction"] == pytest.approx(1.0) and metrics["target_density"] == 0.25


def test_budget_refuses_layers_without_a_single_reader():
    """A block's conv2 feeds a residual add: its channel gates have no single reader to purge."""
    from hf_sparse.training.sparsifier import Sparsifier

    cfg = _sparsity(budget={"params": 0.3})
    cfg.targets.include = [r"re:^model\.layer1\.0\.conv2\.weight$"]
    with pytest.raises(ValueError, match="cannot tell which layer reads the channels of 'model.layer1.0.conv2'"):
        Sparsifier(_resnet18(), cfg, example_inputs={"pixel_values": torch.randn(1, 1, 28, 28)})


def test_card_states_the_purged_cost():
    from hf_sparse.checkpoint.model_card import render_model_card

    sparsity = {"format": "dense", "library": "timm", "model_class": "timm.models.resnet.ResNet", "method": "l0",
                "target_density": 0.25, "achieved_density": 0.2, "per_layer": {},
                "method_metrics": {"purged_params": 3e6, "purged_macs": 8.25e6, "dense_params": 1.2e7,
                                   "dense_macs": 3.3e7, "purged_params_fraction": 0.25, "purged_macs_fraction": 0.25}}
    card = str(render_model_card(sparsity))
    assert ("| purged model vs dense | parameters 0.2500 (3,000,000 of 12,000,000), MACs per sample 0.2500 "
            "(8,250,000 of 33,000,000, at the training resolution) |") in card
    del sparsity["method_metrics"]
    assert "purged model vs dense" not in str(render_model_card(sparsity))
