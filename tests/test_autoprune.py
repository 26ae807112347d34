"""AutoPrune: the update rules on small tensors against hand-computed values, then under SparseTrainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse.config.recipe import RecipeError, recipe_from_text
from hf_sparse.grids import Granularity, resolve_targets
from hf_sparse.methods import get_method
from hf_sparse.methods.base import optimizer_states
from tests.helpers import make_trainer

AutoPrune = get_method("autoprune")


def autoprune_on(model: nn.Module, target_density=None, total_steps: int = 100, granularity="unstructured",
                 pair_batchnorm: bool = True, **params):
    """AutoPrune over every target of ``model``; ``pair_batchnorm`` passes the model (channel masks
    then cover the following BatchNorm)."""
    params.setdefault("reg_coef", None if target_density else 0.0)
    params.setdefault("start_fraction", 0.0)  # the regulariser acts from step 0
    method = AutoPrune(resolve_targets(model), AutoPrune.Config(**params), target_density,
                       granularity=Granularity.parse(granularity), model=model if pair_batchnorm else None)
    method.setup(total_steps)
    return method


def real_of(method) -> dict[str, torch.Tensor]:
    """Tensor name -> the real (unmasked) value the method keeps."""
    return {t.name: v for t, v in zip(method.real.targets, method.real.values)}


def row(values: list[float]) -> nn.Linear:
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return layer


@torch.no_grad()
def set_m(method, g: int, values) -> None:
    """Give group ``g``'s auxiliary parameters ``values`` and put h(M) in effect (as after a step)."""
    method.M[g].copy_(torch.as_tensor(values, dtype=torch.float32).view_as(method.M[g]))
    method.masks[g] = method.M[g].detach() > 0
    method._refresh_factors()


def backward_with(method, layer: nn.Module, grad: list[float]) -> None:
    """Stand in for a backward pass: dL/d(effective weight) = ``grad``."""
    layer.weight.grad = torch.tensor([grad])
    method.after_backward(0)


# -- the update rules ---------------------------------------------------------------------------
W = [0.5, -2.0, 1.0, -0.25]
M = [0.5, -0.5, 0.0, 2.0]
G = [0.1, 0.2, -0.3, 0.4]
# g * sgn(W) + lam * n / N with lam = 0.8, n = 1, N = 4:  [0.1, -0.2, -0.3, -0.4] + 0.2
BRACKET = [0.3, 0.0, -0.1, -0.2]
SIG = [0.7310585786, 0.2689414214, 0.5, 0.9820137900]  # sigmoid(2 * M)


@pytest.mark.parametrize("ste, params, h_prime", [
    ("identity", {}, [1.0, 1.0, 1.0, 1.0]),
    ("leaky_relu", {"leaky_slope": 0.1}, [1.0, 0.1, 0.1, 1.0]),  # m = 0 is pruned: slope side
    ("softplus", {"softplus_beta": 2.0}, SIG),
])
def test_ste_gradients_match_hand_computed_values(ste, params, h_prime):
    layer = row(W)
    method = autoprune_on(layer, ste=ste, reg_coef=0.8, **params)
    set_m(method, 0, [M])
    method.before_forward(0)
    assert layer.weight.tolist() == [[0.5, 0.0, 0.0, -0.25]]  # W * h(M), h(0) = 0
    backward_with(method, layer, G)
    expected = [hp * b for hp, b in zip(h_prime, BRACKET)]
    assert method.M[0].grad.tolist()[0] == pytest.approx(expected, abs=1e-7)
    assert layer.weight.grad.tolist()[0] == pytest.approx([0.1, 0.0, 0.0, 0.4])  # g * h(M): W trains on the masked loss
    assert layer.weight.tolist() == [W]  # the optimizer steps the real W


def test_m_moves_with_the_weight_magnitude():
    """Correlation consistency: with plain SGD, m rises exactly when the loss wants |w| to rise."""
    torch.manual_seed(0)
    layer = nn.Linear(20, 10, bias=False)
    method = autoprune_on(layer, ste="leaky_relu", reg_coef=0.0)
    set_m(method, 0, torch.randn(10, 20) * 0.1)
    opt = torch.optim.SGD([{"params": [layer.weight], "lr": 1e-4}, {"params": method.M}], lr=0.1)
    method.before_forward(0)
    grad = torch.randn(10, 20)
    keep = method.M[0].detach() > 0
    w0, m0 = method.real.values[0].clone(), method.M[0].detach().clone()
    layer.weight.grad = grad.clone()
    method.after_backward(0)
    opt.step()
    d_abs_w = layer.weight.detach().abs() - w0.abs()
    d_m = method.M[0].detach() - m0
    assert torch.equal(torch.sign(d_m[keep]), torch.sign(d_abs_w[keep]))
    # pruned: W stays, m follows the direction the loss wants |w| to move: -g * sgn(W)
    assert torch.all(d_abs_w[~keep] == 0)
    assert torch.equal(torch.sign(d_m[~keep]), torch.sign(-grad * torch.sign(w0))[~keep])


def test_pruned_weight_keeps_its_value_and_comes_back():
    layer = row([0.5, -0.7, 0.9])
    method = autoprune_on(layer, ste="leaky_relu", leaky_slope=0.5)
    set_m(method, 0, [[0.1, -0.01, 0.1]])
    opt = torch.optim.AdamW([{"params": [layer.weight], "weight_decay": 0.5},
                             {"params": method.M, "lr": 1e-3, "weight_decay": 0.0}], lr=0.1)
    # Steps where the loss pushes the pruned weight's effective value towards zero: it stays pruned,
    # while momentum and weight decay would move it: its value must not change.
    for step in range(3):
        method.before_forward(step)
        assert layer.weight[0, 1].item() == 0.0
        backward_with(method, layer, [0.1, -0.2, 0.1])  # -g*sgn(w) < 0 at w=-0.7: keep it pruned
        opt.step()
        method.after_step(step, opt)
        opt.zero_grad()
        assert method.real.values[0][0, 1].item() == pytest.approx(-0.7)
    assert method.metrics()["restore_events"] == 0
    # Now the loss wants w = -0.7 back (-g * sgn(w) > 0): m climbs above 0 and the weight returns as it was.
    for step in range(3, 40):
        method.before_forward(step)
        backward_with(method, layer, [0.0, 0.5, 0.0])
        opt.step()
        method.after_step(step, opt)
        opt.zero_grad()
        if method.M[0][0, 1] > 0:
            break
    assert all(float(s[0, 1]) == 0.0 for s in optimizer_states(opt, layer.weight))  # restored: fresh state
    assert method.M[0][0, 1] > 0
    assert layer.weight[0, 1].item() == pytest.approx(-0.7)
    m = method.metrics()
    assert m["restore_events"] == 1 and m["restored_weights"] == 1 and m["density"] == 1.0


@pytest.mark.parametrize("spelling", ["channel", "neuron", "unit"])
def test_channel_units_of_linear_conv_and_gru(spelling):
    torch.manual_seed(0)  # (a module named "fc" would count as the output head, which stays dense by default)
    model = nn.ModuleDict({"lin": nn.Linear(3, 4), "conv": nn.Conv2d(2, 5, 3), "gru": nn.GRU(3, 6, num_layers=2)})
    method = autoprune_on(model, granularity=spelling, ste="leaky_relu", reg_coef=0.0)
    names = [t.name for t in method.targets]
    assert names == ["lin.weight", "conv.weight", "gru.weight_ih_l0", "gru.weight_hh_l0",
                     "gru.weight_ih_l1", "gru.weight_hh_l1"]
    # one m per output unit / channel; the ih and hh matrices of a GRU layer share one m per hidden unit
    assert [tuple(m.shape) for m in method.M] == [(4,), (5,), (6,), (6,)]
    sizes = [g.sizes for g in method.grids]  # weights behind each m; the biases are not counted
    assert sizes[0].tolist() == [3.0] * 4 and sizes[1].tolist() == [18.0] * 5
    assert sizes[2].tolist() == [3 * (3 + 6)] * 6  # 3 gates x (3 inputs + 6 recurrent)
    # the real copy covers every masked tensor: each grid's weights, then its unit biases
    assert list(real_of(method)) == ["lin.weight", "lin.bias", "conv.weight", "conv.bias", "gru.weight_ih_l0",
                                     "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0", "gru.weight_ih_l1",
                                     "gru.weight_hh_l1", "gru.bias_ih_l1", "gru.bias_hh_l1"]
    set_m(method, 0, [1.0, -1.0, 1.0, 1.0])
    set_m(method, 2, [1.0, 1.0, 1.0, 1.0, -1.0, 1.0])
    method.before_forward(0)
    masks = method.hard_masks()
    assert masks[0].sum(1).tolist() == [3, 0, 3, 3]
    for mask in masks[2:4]:  # rows 4, 6+4 and 12+4 (reset, update, new gates) of unit 4 are gone
        assert [r for r in range(18) if not mask[r].any()] == [4, 10, 16]
    assert method.structure()["gru.weight_hh_l0"] == [0, 1, 2, 3, 5]
    assert method.structure()["lin.weight"] == [0, 2, 3]
    # a pruned unit's biases go with it (it emits exactly zero); the other biases are untouched
    assert model["lin"].bias[1] == 0 and torch.all(model["lin"].bias[[0, 2, 3]] == real_of(method)["lin.bias"][[0, 2, 3]])
    for b in (model["gru"].bias_ih_l0, model["gru"].bias_hh_l0):
        assert [r for r in range(18) if b[r] == 0] == [4, 10, 16]
    assert torch.all(model["gru"].bias_ih_l1 != 0)
    # the m of a unit collects g * sgn(W) over all of the unit's weights, in both matrices (not the biases)
    grads = {}
    for member in method.covered:
        grads[member.target.name] = torch.randn(member.param.shape)
        member.param.grad = grads[member.target.name].clone()
    w = {n: v.clone() for n, v in real_of(method).items()}
    method.after_backward(0)
    lin = (grads["lin.weight"] * torch.sign(w["lin.weight"])).sum(1)
    assert method.M[0].grad.tolist() == pytest.approx((lin * torch.tensor([1, 0.1, 1, 1])).tolist(), abs=1e-6)
    ih, hh = (grads[n] * torch.sign(w[n]) for n in ("gru.weight_ih_l0", "gru.weight_hh_l0"))
    unit = (ih.sum(1) + hh.sum(1)).view(3, 6).sum(0)
    slope = torch.tensor([1, 1, 1, 1, 0.1, 1])
    assert method.M[2].grad.tolist() == pytest.approx((unit * slope).tolist(), abs=1e-5)
    # every covered tensor trains on the masked loss (g * h(M)) and holds its real value for the optimizer
    assert model["lin"].bias.grad.tolist() == pytest.approx((grads["lin.bias"] * torch.tensor([1, 0, 1, 1])).tolist())
    gru_rows = torch.ones(18)
    gru_rows[[4, 10, 16]] = 0
    assert torch.equal(model["gru"].bias_hh_l0.grad, grads["gru.bias_hh_l0"] * gru_rows)
    for member in method.covered:
        assert torch.equal(member.param.detach(), w[member.target.name])


def test_channel_bidirectional_lstm_has_one_m_per_layer_and_direction():
    lstm = nn.LSTM(3, 4, num_layers=1, bidirectional=True)
    method = autoprune_on(lstm, granularity="channel", reg_coef=0.0)
    assert [t.attr for t in method.targets] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse",
                                                 "weight_hh_l0_reverse"]
    assert [[m.target.attr for m in g.weights] for g in method.grids] == [
        ["weight_ih_l0", "weight_hh_l0"], ["weight_ih_l0_reverse", "weight_hh_l0_reverse"]]
    assert [tuple(m.shape) for m in method.M] == [(4,), (4,)]
    set_m(method, 1, [1.0, -1.0, 1.0, 1.0])
    method.before_forward(0)
    out, _ = lstm(torch.randn(5, 2, 3))  # the flat-weight LSTM runs on the masked weights
    assert out.shape == (5, 2, 8)
    for t in method.targets:
        pruned_rows = [r for r in range(16) if not t.param[r].any()]
        assert pruned_rows == ([1, 5, 9, 13] if t.attr.endswith("reverse") else [])
        bias = getattr(lstm, t.attr.replace("weight", "bias"))
        assert [r for r in range(16) if bias[r] == 0] == pruned_rows
    assert method.density() == pytest.approx(1 - 4 * (3 + 4) / (2 * 16 * 7))


def conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    with torch.no_grad():  # an affine BatchNorm with running statistics: alone, they make a zero input nonzero
        model[1].weight.copy_(torch.tensor([1.0, 0.5, -0.7, 2.0]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
        model[1].running_mean.copy_(torch.tensor([0.3, 0.5, -0.2, 0.1]))
    return model


def test_pruned_conv_channel_before_batchnorm_emits_exactly_zero():
    """Channel masks cover the conv's bias and the following BatchNorm's weight and bias, so a
    pruned channel is exactly zero after the BatchNorm (eval: running statistics), also after
    optimizer steps with momentum and weight decay."""
    model = conv_bn()
    conv, bn = model[0], model[1]
    method = autoprune_on(model, granularity="channel", reg_coef=0.0)
    grid = method.grids[0]
    assert [(m.target.name, m.role) for m in grid.members] == [
        ("0.weight", "weight"), ("0.bias", "bias"), ("1.weight", "norm"), ("1.bias", "norm")]
    assert grid.members[2].param is bn.weight and grid.members[3].param is bn.bias
    assert [(m.target.name, m.role) for m in method.grids[1].members] == [("4.weight", "weight"), ("4.bias", "bias")]
    assert method.numel == 4 * 18 + 3 * 100  # companions are masked, not counted
    set_m(method, 0, [1.0, -1.0, 1.0, 1.0])
    opt = torch.optim.AdamW(list(model.parameters()) + method.M, lr=0.05, weight_decay=0.5)
    for step in range(3):  # train mode: batch statistics, running statistics move
        model.train()
        method.before_forward(step)
        x = torch.randn(6, 2, 7, 7, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        method.after_backward(step)
        opt.step()
        method.after_step(step, opt)
        opt.zero_grad()
    assert method.masks[0].tolist() == [True, False, True, True]
    assert float(bn.running_mean[1]) == pytest.approx(0.5 * 0.9**3)  # the zero channel only decays it
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        assert torch.all(p[1] == 0)
    model.eval()
    feats = model[:2](torch.randn(5, 2, 7, 7))
    assert torch.all(feats[:, 1] == 0)
    assert torch.all(feats[:, [0, 2, 3]].flatten(1).abs().amax(1) > 0)
    method.finalize()
    assert torch.all(model[:2](torch.randn(5, 2, 7, 7))[:, 1] == 0)
    # without the model the BatchNorm is not paired: its bias alone makes the "pruned" channel nonzero
    alone = conv_bn()
    plain = autoprune_on(alone, granularity="channel", reg_coef=0.0, pair_batchnorm=False)
    assert [m.role for m in plain.grids[0].members] == ["weight", "bias"]
    set_m(plain, 0, [1.0, -1.0, 1.0, 1.0])
    plain.before_forward(0)
    alone.eval()
    # (0 - 0.5) / sqrt(1 + 1e-5) * 0.5 - 0.2 = -0.45
    out = alone[:2](torch.randn(5, 2, 7, 7))[:, 1]
    assert torch.allclose(out, torch.full_like(out, -0.45), atol=1e-5)


def test_projection_hits_the_target():
    layer = row([1.0] * 8)
    method = autoprune_on(layer, target_density=0.25)
    set_m(method, 0, [[0.3, -0.2, 0.1, 0.1, 0.5, 0.1, -1.0, 0.0]])
    assert method.project(0.25)[0].tolist() == [[True, False, False, False, True, False, False, False]]
    assert method.project(0.75)[0].tolist() == [[True, False, True, True, True, True, False, True]]
    method.freeze()
    assert method.density() == 0.25 and method.frozen


def test_projection_breaks_ties_by_position():
    layer = row([1.0] * 8)
    method = autoprune_on(layer, target_density=0.25)
    set_m(method, 0, [[0.3, -0.2, 0.1, 0.1, 0.5, 0.1, -1.0, 0.0]])
    assert method.project(0.5)[0].tolist() == [[True, False, True, True, True, False, False, False]]


def test_penalty_mode_prunes_what_the_loss_does_not_defend_then_freezes():
    layer = row([0.5, -0.5, 0.5, -0.5])
    method = autoprune_on(layer, total_steps=40, reg_coef=4.0, init=0.05, freeze_fraction=0.5)
    opt = torch.optim.SGD(method.M, lr=0.01)  # per element: lam / N = 1 against the loss term
    for step in range(40):
        method.before_forward(step)
        backward_with(method, layer, [-2.0, 2.0, 0.0, 0.5])  # loss wants |w| up for the first two only
        opt.step()
        method.after_step(step, opt)
        opt.zero_grad()
        if step == 19:
            assert method.frozen and method.masks[0].tolist() == [[True, True, False, False]]
    assert method.masks[0].tolist() == [[True, True, False, False]] and method.density() == 0.5
    assert method.metrics()["reg_coef"] == 0.0  # frozen: no regulariser in effect


def test_target_schedule_is_cubic_from_one():
    method = autoprune_on(row([1.0] * 4), target_density=0.1, total_steps=100, start_fraction=0.1,
                          end_fraction=0.5, freeze_fraction=0.8)
    assert (method.start, method.target_at_time.window.end, method.freeze_at) == (10, 50, 80)
    assert method.target_at(5) == 1.0
    assert method.target_at(29) == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert method.target_at(49) == pytest.approx(0.1)


# -- recipe validation ------------------------------------------------------------------------
RECIPE = """
model: {source: hf_sparse, name: lenet5}
sparsity:
  method: autoprune
  target_density: 0.05
  params: {PARAMS}
"""


def recipe_error(text: str) -> str:
    with pytest.raises(RecipeError) as err:
        recipe_from_text(text, "r.yaml")
    return str(err.value)


@pytest.mark.parametrize("params, key, words", [
    ("{ste: relu}", "sparsity.params.ste", "identity"),
    ("{leaky_slope: 0}", "sparsity.params.leaky_slope", "greater than 0"),
    ("{softplus_beta: -1}", "sparsity.params.softplus_beta", "greater than 0"),
    ("{granularity: channel}", "sparsity.params.granularity", "unknown key"),  # a sparsity key now
    ("{end_fraction: 0.8, freeze_fraction: 0.5}", "sparsity.params", "end_fraction <= freeze_fraction"),
    ("{mask_lr: 0}", "sparsity.params.mask_lr", "greater than 0"),
    ("{dual_lr: 0}", "sparsity.params.dual_lr", "greater than 0"),
    ("{lam: 1}", "sparsity.params.lam", "unknown key"),
])
def test_bad_params_are_located(params, key, words):
    message = recipe_error(RECIPE.replace("{PARAMS}", params))
    assert "r.yaml:" in message and f"{key}:" in message and words in message


def test_granularity_is_a_located_sparsity_key():
    recipe = RECIPE.replace("  params: {PARAMS}\n", "  granularity: GRANULARITY\n  params: {}\n")
    for spelling in ("unstructured", "channel", "neuron", "unit", "block\n  block_shape: [2, 2]"):
        recipe_from_text(recipe.replace("GRANULARITY", spelling), "r.yaml")
    recipe_from_text(recipe.replace("GRANULARITY", "'2:4'").replace("target_density: 0.05", "target_density: 0.5"),
                     "r.yaml")  # N:M fixes the density at N/M
    message = recipe_error(recipe.replace("GRANULARITY", "factorized"))  # l0 only
    assert "sparsity.granularity:" in message and "no 'factorized' granularity" in message
    message = recipe_error(recipe.replace("GRANULARITY", "structured"))  # the old spelling of channel
    assert "sparsity.granularity:" in message and "unknown granularity" in message


def test_penalty_or_target_not_both_nor_neither():
    cfg = AutoPrune.Config
    assert AutoPrune.config_error(cfg(), None)[0] == ("params", "reg_coef")
    assert "not both" in AutoPrune.config_error(cfg(reg_coef=1.0), 0.1)[1]
    assert AutoPrune.config_error(cfg(reg_coef=1.0), None) is None
    assert AutoPrune.config_error(cfg(), 0.1) is None
    neither = RECIPE.replace("  target_density: 0.05\n", "").replace("{PARAMS}", "{}")
    message = recipe_error(neither)
    assert "sparsity.params.reg_coef:" in message and "target_density" in message
    assert "not both" in recipe_error(RECIPE.replace("{PARAMS}", "{reg_coef: 1.0}"))
    recipe_from_text(RECIPE.replace("  target_density: 0.05\n", "").replace("{PARAMS}", "{reg_coef: 1.0}"), "r.yaml")


# -- under SparseTrainer ----------------------------------------------------------------------
FAST = {"method": "autoprune", "target_density": 0.3,
        "params": {"init": 0.02, "start_fraction": 0.0, "end_fraction": 0.5, "freeze_fraction": 0.75}}


def test_trains_to_target_with_the_mask_invariant(fmnist_small, tmp_path):
    from transformers import TrainerCallback

    trainer = make_trainer(fmnist_small, tmp_path, FAST, max_steps=24, weight_decay=0.1, logging_steps=8)
    method = trainer.sparsifier.method
    densities = []

    before = [torch.ones_like(t.param, dtype=torch.bool) for t in method.targets]

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            real = {id(t.param): v for t, v in zip(method.real.targets, method.real.values)}
            for i, (t, mask) in enumerate(zip(method.targets, method.hard_masks())):
                assert torch.equal(t.param, real[id(t.param)] * mask)  # targets hold W * h(M) between steps
                for s in optimizer_states(trainer.optimizer, t.param):
                    assert torch.all(s[mask & ~before[i]] == 0)  # a weight restored at this step starts afresh
                before[i] = mask
            densities.append(method.density())

    trainer.add_callback(Check())
    trainer.train()
    n = method.numel
    assert abs(trainer.sparsifier.density() - 0.3) <= 1 / n
    assert min(densities[:18]) < 0.9  # pruned before the final phase, not only by the projection
    # M has its own group without weight decay; the targets get none either (weight_decay_on_targets=False)
    groups = trainer.optimizer.param_groups
    m_ids = [id(m) for m in method.M]
    assert any([id(p) for p in g["params"]] == m_ids and g["weight_decay"] == 0.0 for g in groups)
    target_ids = {id(t.param) for t in method.targets}
    assert all(g["weight_decay"] == 0.0 for g in groups if target_ids & {id(p) for p in g["params"]})
    logs = [h for h in trainer.state.log_history if "loss" in h][-1]
    for key in ("restore_events", "restored_weights", "reg_coef", "density", "constraint_target"):
        assert f"sparsity/autoprune/{key}" in logs


@pytest.mark.parametrize("extra, params", [({"granularity": "channel"}, {"ste": "softplus"}),
                                           ({}, {"end_fraction": 0.2, "freeze_fraction": 0.4})])
def test_resume_equals_uninterrupted(fmnist_small, tmp_path, extra, params):
    """Also across the freeze (resumed at step 10 after freezing at step 8) and for channel masks."""
    sparsity = {**FAST, **extra, "params": {**FAST["params"], **params}}
    straight = make_trainer(fmnist_small, tmp_path / "a", sparsity, max_steps=20)
    straight.train()
    first = make_trainer(fmnist_small, tmp_path / "b", sparsity, max_steps=20, save_strategy="steps", save_steps=10)
    first.train()
    resumed = make_trainer(fmnist_small, tmp_path / "b", sparsity, max_steps=20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))
    a, b = straight.sparsifier.method, resumed.sparsifier.method
    for m1, m2 in zip(a.hard_masks(), b.hard_masks()):
        assert torch.equal(m1, m2)
    for m1, m2 in zip(a.M, b.M):
        assert torch.equal(m1, m2)
    for v1, v2 in zip(a.real.values, b.real.values):
        assert torch.equal(v1, v2)
    if extra:  # channel masks also cover the unit biases
        assert any(m.role == "bias" for g in a.grids for m in g.members)
    for (n, p1), p2 in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p1, p2), n
    assert a.metrics() == b.metrics()
