"""The granularity layer: grouping, reduction, expansion and selection by hand-computed values, and
every (method, granularity) pair meeting its density with the mask's shape rule on a model with a
Linear, a Conv + BatchNorm and a GRU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse.grids import Granularity, build_grids, check_mask_rule, keep_top, resolve_targets, thresholds
from hf_sparse.grids.nm import nm_count, nm_mask
from hf_sparse.methods import get_method
from hf_sparse.methods.reparam import RealWeights
from hf_sparse.methods.schedules import CubicSchedule, LinearWarmup, NarangThreshold, StepWindow
from tests.helpers import GRANULARITIES, method_granularities, run_steps


def grid_of(module: nn.Module, granularity: Granularity, model: nn.Module | None = None):
    return build_grids(resolve_targets(module), granularity, model)


# -- parsing ---------------------------------------------------------------------------------
def test_parse_each_spelling():
    assert Granularity.parse("unstructured") == Granularity()
    assert Granularity.parse("block", [4, 16]) == Granularity("block", block=(4, 16))
    assert Granularity.parse("2:4") == Granularity("n:m", n=2, m=4) and Granularity.parse("2:4").fixed_density == 0.5
    assert Granularity.parse("neuron") == Granularity.parse("unit") == Granularity("channel")


@pytest.mark.parametrize(("value", "block", "message"), [
    ("block", None, "needs sparsity.block_shape"),
    ("block", [4], "two positive integers"),
    ("block", [0, 4], "two positive integers"),
    ("unstructured", [4, 4], "only used with granularity 'block'"),
    ("4:2", None, "0 < N < M"),
    ("rows", None, "unknown granularity"),
])
def test_parse_rejects(value, block, message):
    with pytest.raises(ValueError, match=message):
        Granularity.parse(value, block)


# -- blocks ----------------------------------------------------------------------------------
def test_blocks_reduce_and_expand_with_ragged_edges():
    layer = nn.Linear(5, 3, bias=False)  # weight 3 x 5, blocks 2 x 2 -> a 2 x 3 grid, edge tiles smaller
    with torch.no_grad():
        layer.weight.copy_(torch.arange(15.0).view(3, 5))
    (g,) = grid_of(layer, Granularity("block", block=(2, 2)))
    assert g.shape == (2, 3)
    assert g.sizes.tolist() == [[4, 4, 2], [2, 2, 1]]
    w = layer.weight.detach()
    # sums of [[0,1],[5,6]], [[2,3],[7,8]], [[4],[9]] / [10,11], [12,13], [14]
    assert g.reduce([w]).tolist() == [[12, 20, 13], [21, 25, 14]]
    assert g.score([w], "max").tolist() == [[6, 8, 9], [11, 13, 14]]
    assert g.score([w], "mean").tolist() == [[3, 5, 6.5], [10.5, 12.5, 14]]
    keep = torch.tensor([[True, False, True], [False, True, False]])
    expanded = g.weights[0].full(keep)
    assert expanded.tolist() == [[True, True, False, False, True], [True, True, False, False, True],
                                 [False, False, True, True, False]]


def test_conv_blocks_tile_the_flattened_kernel():
    conv = nn.Conv2d(2, 4, 3)  # weight 4 x (2*3*3 = 18): 2 x 6 blocks -> 2 x 3 grid of 12 weights each
    (g,) = grid_of(conv, Granularity("block", block=(2, 6)))
    assert g.shape == (2, 3) and g.sizes.unique().tolist() == [12]
    assert g.weights[0].full(torch.ones(2, 3, dtype=torch.bool)).shape == conv.weight.shape


# -- N:M -----------------------------------------------------------------------------------
def test_nm_mask_keeps_the_best_n_of_every_m_along_the_input():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.7, 0.6]])
    assert nm_mask(scores, Granularity("n:m", n=2, m=4)).tolist() == [
        [False, True, True, False, False, True, True, False]]
    # during a schedule the density can sit between 1 and N/M: round(0.75 * 4) = 3 of every 4
    assert nm_mask(scores, Granularity("n:m", n=2, m=4), 0.75).sum().item() == 6


def test_nm_on_conv_runs_along_input_channels():
    scores = torch.rand(3, 8, 2, 2, generator=torch.Generator().manual_seed(0))
    keep = nm_mask(scores, Granularity("n:m", n=1, m=4))
    # at every (out, kh, kw), each run of 4 consecutive input channels keeps exactly its maximum
    runs = scores.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(keep.permute(0, 2, 3, 1).reshape(-1, 4), runs == runs.amax(1, keepdim=True))
    assert nm_count(keep, 4).unique().tolist() == [1]


def test_gradual_nm_never_leaves_fewer_than_n_of_m():
    # run 2 is all small: a threshold between the runs would prune it whole; N:M keeps its best 2
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.01, 0.04, 0.02, 0.03]]))
    cls = get_method("gradual")
    m = cls(resolve_targets(layer), cls.Config(start_step=0, ramp_step=1, end_step=3, frequency=1), None, 0,
            granularity=Granularity.parse("2:4"))
    m.setup(10)
    for step in range(4):
        m.after_step(step, None)
        assert nm_count(m.masks[0], 4).min() >= 2, step
    assert m.masks[0].tolist() == [[True, True, False, False, False, True, False, True]]


# -- channels ----------------------------------------------------------------------------------
def test_gru_unit_grid_spans_gate_blocks_of_both_matrices_and_biases():
    gru = nn.GRU(5, 4, bidirectional=True)
    grids = grid_of(gru, Granularity("channel"))
    assert [g.name for g in grids] == ["weight_ih_l0", "weight_ih_l0_reverse"]
    g = grids[0]
    assert [(m.target.name, m.role) for m in g.members] == [
        ("weight_ih_l0", "weight"), ("weight_hh_l0", "weight"), ("bias_ih_l0", "bias"), ("bias_hh_l0", "bias")]
    assert g.shape == (4,) and g.sizes.tolist() == [3 * (5 + 4)] * 4  # 3 gate rows of ih (5) and hh (4)
    keep = torch.tensor([True, False, True, True])
    assert g.members[1].full(keep)[:, 0].tolist() == keep.repeat(3).tolist()  # unit 1 in r, z and n


def test_channel_grid_pairs_the_following_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    grids = grid_of(model, Granularity("channel"), model)
    assert [(m.target.name, m.role) for m in grids[0].members] == [
        ("0.weight", "weight"), ("0.bias", "bias"), ("1.weight", "norm"), ("1.bias", "norm")]
    assert [m.role for m in grids[1].members] == ["weight", "bias"]


@pytest.mark.parametrize("method", ["gmp", "gradual", "dns", "autoprune", "l0"])
def test_pruned_channel_emits_exactly_zero_through_batchnorm(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6))
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.0)  # a BatchNorm shift that would leak through a zeroed conv channel
    cls = get_method(method)
    m = cls(resolve_targets(model), cls.Config(), 0.5, 0, granularity=Granularity("channel"), model=model)
    train_a_little(m, model, steps=40)
    model.eval()
    out = model(torch.randn(2, 1, 6, 6))
    pruned = ~m.group_masks()[0]
    assert int(pruned.sum()) == 3
    assert torch.all(out[:, pruned] == 0) and torch.all(out[:, ~pruned] != 0)


def test_keep_top_budget_with_groups_of_different_sizes():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))  # units of 4 and 2 weights
    grids = grid_of(model, Granularity("channel"))
    scores = [torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.2])]
    # global budget 0.5 * 12 = 6 weights: best unit (4 weights, 0.9) then 0.5 (2 weights) -> exactly 6
    keep = keep_top(grids, scores, 0.5, "global")
    assert [k.tolist() for k in keep] == [[True, False], [True, False]]
    assert [g.select(s, 0.5).tolist() for g, s in zip(grids, scores)] == [[True, False], [True, False]]
    # the threshold is the score of the last group kept: global 0.5 (the second unit of 2 weights)
    assert thresholds(grids, scores, 0.5, "global") == [0.5, 0.5]
    assert thresholds(grids, scores, 0.5, "layer") == [pytest.approx(0.9), 0.5]


# -- every method at every granularity ---------------------------------------------------------
class Mixed(nn.Module):
    """A Linear, a Conv + BatchNorm and a GRU: every layer kind a method must handle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gru = nn.GRU(8, 8)
        self.fc = nn.Linear(16, 12)


def train_a_little(method, model: nn.Module, steps: int) -> None:
    """Drive the method's step protocol with a loss that favours small weights (so masks move)."""
    method.setup(steps)
    extra = [p for g in method.param_groups(0.05) for p in g["params"]]
    opt = torch.optim.SGD(list(model.parameters()) + extra, lr=0.05)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))

    def loss(step: int) -> torch.Tensor:
        small = sum((p - 0.1).square().sum() for p in model.parameters()) * 0.01
        return small + model(x[:, :1]).square().mean() if isinstance(model, nn.Sequential) else small

    run_steps(method, opt, loss, steps)
    method.finalize()


@pytest.mark.parametrize(("method", "granularity"), method_granularities())
def test_method_meets_density_with_the_mask_rule(method, granularity):
    torch.manual_seed(0)
    model = Mixed()
    extra = GRANULARITIES[granularity]
    spec = Granularity.parse(extra.get("granularity", "unstructured"), extra.get("block_shape"))
    cls = get_method(method)
    target = 0.25 if spec.fixed_density is None else None
    m = cls(resolve_targets(model), cls.Config(), target, 0, granularity=spec, model=model)
    train_a_little(m, model, steps=60)
    masks = m.hard_masks()
    density = sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks)
    assert density == pytest.approx(spec.fixed_density or 0.25, abs=0.02)
    for t, k in zip(m.targets, masks):
        weight = t.param.detach()
        assert torch.equal(weight != 0, k), t.name  # the weights carry the mask
        units = t.module.hidden_size if t.is_recurrent else None
        assert check_mask_rule(weight, spec, units) is None, t.name
        if spec.kind == "n:m":
            assert nm_count(k, spec.m).unique().tolist() == [spec.n], t.name  # exactly N of every M


# -- the real-weight copy and the schedules ---------------------------------------------------
def test_real_weights_follow_dtype_and_round_trip():
    layer = nn.Linear(3, 2)
    real = RealWeights(resolve_targets(layer))
    layer.double()
    real.follow()
    assert real.values[0].dtype == torch.float64
    real.write([torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)])
    assert layer.weight[0, 1] == 0 and real.values[0][0, 1] != 0
    state = real.state_dict()
    fresh = RealWeights(resolve_targets(layer))
    fresh.load_state_dict(state)
    fresh.restore()
    assert torch.equal(layer.weight, state[0])


def test_schedules():
    w = StepWindow.resolve(100, None, 0.1, None, 0.5, frequency=10)
    assert (w.start, w.end) == (10, 50)
    assert [s for s in range(100) if w.is_update_step(s)] == [10, 20, 30, 40, 50]
    cubic = CubicSchedule(1.0, 0.2, w)
    assert [cubic(t) for t in (0, 10, 30, 50, 90)] == pytest.approx([1.0, 1.0, 1 - 0.8 * (1 - 0.125), 0.2, 0.2])
    assert [LinearWarmup(1.0, 0.2, 4)(s) for s in range(5)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])
    eps = NarangThreshold(0, 2, 4, 1)
    theta, phi = eps.slopes(9.1, 1.5)
    assert theta == pytest.approx(2 * 9.1 / (2 * 2 + 3 * 2)) and phi == pytest.approx(1.5 * theta)
    assert [eps(i, 0.1, 0.2) for i in range(5)] == pytest.approx([0.1, 0.2, 0.5, 0.7, 0.9])


# -- recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gmp", "gradual", "dns", "l0", "autoprune"])
@pytest.mark.parametrize(("setting", "kind", "grid_shape"), [
    (["sparsity.granularity=unstructured"], "unstructured", lambda rows, cols: (rows, cols)),
    (["sparsity.granularity=block", "sparsity.block_shape=[4,4]"], "block", lambda rows, cols: (-(-rows // 4), -(-cols // 4))),
    (["sparsity.granularity=2:4", "sparsity.target_density=0.5"], "n:m", lambda rows, cols: (rows, cols)),
    (["sparsity.granularity=channel", "sparsity.targets.include_head=false"], "channel", lambda rows, cols: (rows,)),
], ids=["unstructured", "block", "2:4", "channel"])
def test_every_method_recipe_takes_every_granularity(method, setting, kind, grid_shape, tmp_path):
    """The recipe with the setting is a valid run whose method gates each targeted weight in groups
    of that granularity (blocks with ragged edges, whole rows for channels; the head left out)."""
    from hf_sparse.config.recipe import load_recipe
    from hf_sparse.training.run import make_trainer, prepare_run

    name = "l0_constrained" if method == "l0" else method
    if kind == "n:m" and method in ("gmp", "gradual", "dns"):  # their recipes rank globally; N:M is per run
        setting = [*setting, "sparsity.params.scope=layer"]
    recipe = load_recipe(f"recipes/fmnist_lenet300_{name}.yaml",
                         [*setting, "data.max_train_samples=64", "data.max_eval_samples=64"])
    engine = make_trainer(prepare_run(recipe, tmp_path / "run")).sparsifier.method
    names = [m.target.name for g in engine.grids for m in g.weights]
    assert {"fc1.weight", "fc2.weight"} <= set(names) and ("classifier.weight" in names) == (kind != "channel")
    for grid in engine.grids:
        assert grid.granularity.kind == kind and grid.shape == grid_shape(*grid.weights[0].target.param.shape)
    assert engine.target_density == (0.5 if kind == "n:m" else recipe.sparsity.target_density)


@pytest.mark.parametrize(("overrides", "key", "message"), [
    (["sparsity.granularity=block"], "sparsity.granularity", "needs sparsity.block_shape"),
    (["sparsity.block_shape=[4,4]"], "sparsity.block_shape", "only used with granularity 'block'"),
    (["sparsity.granularity=2:4", "sparsity.target_density=0.3"], "sparsity.target_density", "fixes the density"),
    (["sparsity.granularity=factorized"], "sparsity.granularity", "has no 'factorized' granularity"),
    (["sparsity.granularity=2:4", "sparsity.target_density=0.5", "sparsity.params.scope=global"],
     "sparsity.params.scope", "no meaning"),
    (["sparsity.granularity=diagonal"], "sparsity.granularity", "unknown granularity"),
    (["sparsity.granularity=channel", "sparsity.targets.include_head=true"], "sparsity.targets.include_head",
     "whole output units of the head"),
])
def test_bad_granularity_settings_are_located(overrides, key, message):
    from hf_sparse.config.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message) as err:
        load_recipe("recipes/fmnist_lenet300_gmp.yaml", overrides)
    assert key in str(err.value)


def test_blocks_too_coarse_to_keep_one_are_a_validation_error(tmp_path):
    """The block granularity's density_problem: 64x64 blocks cut fc2 (100x300) into 10, and density
    0.01 of them keeps none; the run is refused before its directory exists, naming the layer."""
    from hf_sparse.config.recipe import RecipeError, load_recipe
    from hf_sparse.training.run import prepare_run

    recipe = load_recipe("recipes/fmnist_lenet300_gmp.yaml", [
        "sparsity.granularity=block", "sparsity.block_shape=[64,64]", "sparsity.target_density=0.01",
        "sparsity.params.scope=layer", "data.max_train_samples=64", "data.max_eval_samples=64"])
    with pytest.raises(RecipeError, match=r"64x64 blocks cut fc2.weight \(100x300\) into 10 block\(s\), and a "
                                          r"density of 0.01 keeps none of them") as err:
        prepare_run(recipe, tmp_path / "run")
    assert "sparsity.block_shape" in str(err.value) and not (tmp_path / "run").exists()


def test_nm_that_does_not_divide_a_layer_is_a_validation_error(tmp_path):
    from hf_sparse.config.recipe import RecipeError, load_recipe
    from hf_sparse.training.run import prepare_run

    recipe = load_recipe("recipes/fmnist_lenet300_gmp.yaml", [
        "sparsity.granularity=2:3", "sparsity.target_density=0.6666666666666666", "sparsity.params.scope=layer",
        "data.max_train_samples=64",
        "data.max_eval_samples=64"])
    with pytest.raises(RecipeError, match="divisible by M=3") as err:
        prepare_run(recipe, tmp_path / "run")
    assert "sparsity.granularity" in str(err.value) and not (tmp_path / "run").exists()
