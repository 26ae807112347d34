"""MAC / parameter counting and the expected cost of the purged model (hf_sparse.structure.budget)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse.structure.budget import CostModel, count_macs, count_params

try:
    from hf_sparse.structure.groups import ChannelGroup, Slice
except ImportError:  # the shared groups module not there yet: the same fields
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Slice:  # type: ignore[no-redef]
        tensor: str
        module: str
        dim: int
        index: torch.Tensor
        role: str

    @dataclass
    class ChannelGroup:  # type: ignore[no-redef]
        name: str
        channels: int
        slices: list


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
