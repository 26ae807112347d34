"""``granularity: group``: every structured method on coupled channel groups.

A small residual CNN (stem -> two convs writing one residual stream -> a bottleneck conv pair ->
depthwise conv -> head) has groups that per-tensor channels get wrong: the residual stream's
channels live in three convs and their BatchNorms at once. Each method must keep or remove a
group's channel in all of its tensors together, meet the group density within 0.02, and end in a
model that purges to a smaller one with the same outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse.config.recipe import load_recipe
from hf_sparse.grids import Granularity
from hf_sparse.grids.tilings import Slices as _Slices
from hf_sparse.structure.groups import find_groups
from hf_sparse.structure.purge import purge_copy
from hf_sparse.training.sparsifier import Sparsifier
from tests.helpers import run_steps

RECIPES = {"gmp": "fmnist_lenet300_gmp", "dns": "fmnist_lenet300_dns", "gradual": "fmnist_lenet300_gradual",
           "l0": "fmnist_lenet300_l0_constrained", "autoprune": "fmnist_lenet300_autoprune"}


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.down_bn = nn.BatchNorm2d(16)
        self.conv_a = nn.Conv2d(8, 32, 3, stride=2, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.conv_b = nn.Conv2d(32, 16, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.conv_c = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_c = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        r = self.down_bn(self.down(x)) + self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))
        r = r + self.bn_c(self.conv_c(torch.relu(r)))  # conv_c also writes the stream
        y = torch.relu(self.expand(torch.relu(self.dw(r))))
        return self.head(y.mean((2, 3)))


def test_slices_reduce_and_expand_by_hand():
    w = torch.arange(12.0).view(4, 3)  # rows 0..3; channel 0 = rows {1, 3}, channel 1 = rows {0, 2}
    tiling = _Slices(w.shape, 0, torch.tensor([[1, 3], [0, 2]]))
    assert tiling.reduce(w, "sum").tolist() == [3 + 4 + 5 + 9 + 10 + 11, 0 + 1 + 2 + 6 + 7 + 8]
    assert tiling.reduce(w, "max").tolist() == [11, 8]
    assert tiling.expand(torch.tensor([0.0, 1.0])).flatten().tolist() == [1, 0, 1, 0]


def test_groups_of_the_residual_net():
    model = ResidualNet()
    groups = {g.name: g for g in find_groups(model, torch.randn(1, 1, 16, 16))}
    stream = next(g for g in groups.values() if any(s.tensor == "conv_c.weight" and s.role == "out" for s in g.slices))
    outs = {s.tensor for s in stream.slices if s.role == "out"}
    assert {"down.weight", "conv_b.weight", "conv_c.weight", "bn_b.weight", "dw.weight", "dw.bias"} <= outs
    assert {s.tensor for s in stream.slices if s.role == "in"} >= {"conv_c.weight", "expand.weight"}
    assert not any(s.tensor.startswith("stem.0") and s.role == "out" for g in groups.values() for s in g.slices)
    assert not any(s.tensor == "head.weight" and s.role == "out" for g in groups.values() for s in g.slices)
    assert "conv_a" in groups and "expand" in groups  # bottleneck hidden channels, expand's outputs (head input)


def _train(method: str, density: float = 0.5, steps: int = 60):
    torch.manual_seed(0)
    model = ResidualNet()
    recipe = load_recipe(f"recipes/{RECIPES[method]}.yaml",
                         ["sparsity.granularity=group", f"sparsity.target_density={density}",
                          "sparsity.targets.layer_types=[Conv2d, Linear]"])
    sp = Sparsifier(model, recipe.sparsity, seed=0)
    extra = sp.param_groups(0.01)
    opt = torch.optim.Adam([{"params": list(model.parameters())}, *extra], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 16, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    sp.setup(steps)
    run_steps(sp, opt, lambda step: nn.functional.cross_entropy(model(x), y), steps)
    sp.finalize()
    return model.eval(), sp


@pytest.mark.parametrize("method", list(RECIPES))
def test_every_method_prunes_whole_groups_and_purges(method):
    model, sp = _train(method)
    grids = sp.method.grids
    assert {g.granularity.kind for g in grids} == {"group"}
    kept = sum(float((g.sizes * k).sum()) for g, k in zip(grids, sp.method.group_masks()))
    assert abs(kept / sum(g.numel for g in grids) - 0.5) <= 0.02
    params = dict(model.named_parameters())
    for g in grids:  # a channel is zero in every producing parameter of its group, or in none
        zero = [m.tiling.reduce((params[m.target.name] != 0).float(), "max") == 0 for m in g.members]
        assert all(torch.equal(z, zero[0]) for z in zero), g.name
    x = torch.randn(2, 1, 16, 16)
    small, info = purge_copy(model, inputs=x)
    assert info["max_abs_diff"] <= 1e-5 and info["params"]["fraction"] < 0.9
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5


def test_group_granularity_parses_and_is_structured():
    assert Granularity.parse("group").structured


def test_l0_meets_a_mac_budget_on_coupled_groups():
    """The MAC budget's expectation runs over the coupled groups (a residual stream's channels cost in
    every conv that writes or reads them); the hard mask spends it: purged MACs <= budget."""
    torch.manual_seed(0)
    model = ResidualNet()
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    recipe = load_recipe("recipes/fmnist_resnet18_l0_macs.yaml",
                         ["sparsity.granularity=group", "sparsity.budget={macs: 0.5}",
                          "sparsity.targets.include=['*']", "sparsity.targets.layer_types=[Conv2d, Linear]"])
    sp = Sparsifier(model, recipe.sparsity, seed=0, example_inputs=x[:1])
    assert sp.cost_names == [g.name for g in sp.method.grids]
    opt = torch.optim.Adam([{"params": list(model.parameters())}, *sp.param_groups(0.01)], lr=0.01)
    steps = 80
    sp.setup(steps)
    run_steps(sp, opt, lambda step: nn.functional.cross_entropy(model(x), y), steps)
    sp.finalize()
    model.eval()
    small, info = purge_copy(model, inputs=x[:1])
    assert info["macs"]["fraction"] <= 0.5 + 1e-6 and info["max_abs_diff"] <= 1e-5


def test_a_model_without_removable_groups_is_one_clear_error():
    """A hidden layer normalised by a LayerNorm over its channels cannot lose a channel exactly."""
    from hf_sparse.structure.purge import PurgeError

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert find_groups(model, torch.randn(1, 4)) == []
    with pytest.raises(PurgeError, match="no channel group that can be removed exactly"):
        purge_copy(model, inputs=torch.randn(1, 4))
