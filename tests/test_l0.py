"""Hard Concrete gates and the ``l0`` method: the distribution against its closed forms, the dual
ascent on toy problems with known answers, the effective-weight gradient mapping against plain
autograd, every granularity on tiny models, and exact state round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_sparse.config.recipe import RecipeError, recipe_from_text
from hf_sparse.grids import Granularity, resolve_targets
from hf_sparse.methods import get_method
from hf_sparse.methods import hard_concrete as hc
from hf_sparse.methods.base import step_generator
from hf_sparse.methods.constraints import AugmentedLagrangianController, LagrangianController

L0 = get_method("l0")


def l0_on(model: nn.Module, target_density=0.3, total_steps=100, granularity="unstructured", **params):
    """L0 over every target of ``model`` (``model`` is passed, so channel gates pair with a BatchNorm)."""
    m = L0(resolve_targets(model), L0.Config(**params), target_density, seed=0,
           granularity=Granularity.parse(granularity), model=model)
    m.setup(total_steps)
    return m


def run_steps(model, method, make_input, steps, start=0, lr=0.05, optimizer=None, adam=False):
    """A plain training loop driving the method's hooks; returns the optimizer."""
    if optimizer is None:
        optimizer = (torch.optim.Adam if adam else torch.optim.SGD)(list(model.parameters()), lr=lr)
        for group in method.param_groups(lr):
            optimizer.add_param_group(group)
    for step in range(start, start + steps):
        method.before_forward(step)
        x, y = make_input(step)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        F.mse_loss(out, y).backward()
        method.after_backward(step)
        optimizer.step()
        method.after_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def data_for(shape_in, shape_out):
    def make(step):
        g = step_generator(123, step, "data")
        return torch.randn(shape_in, generator=g), torch.randn(shape_out, generator=g)
    return make


# -- the distribution ---------------------------------------------------------------------------
# P(z != 0) = sigmoid(log_alpha + beta ln 11), since -gamma/zeta = 1/11; P(z == 1) = sigmoid(log_alpha - beta ln 11).
# By hand: beta ln 11 = (2/3)(2.397895) = 1.598597;  sigmoid(1.598597) = 0.831822,
# sigmoid(-2 + 1.598597) = sigmoid(-0.401403) = 0.400975;  sigmoid(-1.598597) = 0.168178,
# sigmoid(-3.598597) = 0.026633.
HAND = {0.0: (0.831822, 0.168178), -2.0: (0.400975, 0.026633)}


def test_prob_nonzero_closed_form_by_hand():
    la = torch.tensor([0.0, -2.0])
    assert hc.prob_nonzero(la).tolist() == pytest.approx([HAND[0.0][0], HAND[-2.0][0]], abs=1e-6)


@pytest.mark.parametrize("log_alpha", [0.0, -2.0])
def test_sampling_matches_closed_form(log_alpha):
    n = 200_000
    u = hc.uniform((n,), hc.step_keys(0, 0, "test"))
    z = hc.sample(torch.full((n,), log_alpha), u)
    p_open, p_one = HAND[log_alpha]
    tol = 4 * math.sqrt(0.25 / n)  # 4 sigma of a binomial fraction
    assert float((z > 0).float().mean()) == pytest.approx(p_open, abs=tol)
    assert float((z == 1).float().mean()) == pytest.approx(p_one, abs=tol)
    assert z.min() >= 0 and z.max() <= 1
    # The deterministic gate is the median of the distribution (Gallego-Posada's convention).
    assert float(z.median()) == pytest.approx(float(hc.deterministic(torch.tensor(log_alpha))), abs=5e-3)


def test_deterministic_gate_convention():
    # clamp(sigmoid(la / beta) * 1.2 - 0.1, 0, 1): 0.5 at la = 0, 1 for la >= beta ln 11, 0 for la <= -beta ln 11
    edge = (2 / 3) * math.log(11)
    la = torch.tensor([0.0, 3.0, -2.0, edge + 1e-3, -edge + 1e-3, -edge - 1e-3])
    z = hc.deterministic(la)
    assert z[:3].tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-6)
    # open exactly when P(z != 0) > 1/2
    assert ((z > 0) == (hc.prob_nonzero(la) > 0.5)).all()
    assert z[3] == 1.0 and z[4] > 0 and z[5] == 0


def test_expected_l0_by_hand():
    la = torch.tensor([0.0, -2.0, 10.0])
    # 0.831822 + 0.400975 + sigmoid(11.598597) = 0.999991
    assert float(hc.expected_l0(la)) == pytest.approx(0.831822 + 0.400975 + 0.999991, abs=1e-5)


def _noise_hitting(stretched_value: float, near: float) -> torch.Tensor:
    """Float32 noise values (log_alpha = 0) whose stretched sample is exactly ``stretched_value``."""
    bits = torch.tensor(near, dtype=torch.float32).view(torch.int32).item()
    cand = torch.arange(bits - 200_000, bits + 200_000, dtype=torch.int32).view(torch.float32)
    s = cand.mul(1.0 / hc.BETA).sigmoid()
    return cand[s * (hc.ZETA - hc.GAMMA) + hc.GAMMA == stretched_value]


def test_sample_slope_equals_autograd_and_keeps_the_inside_value_at_the_clamp_ends():
    """The hot path's dz/dlog_alpha is autograd's through the same arithmetic; where the stretched
    sample is exactly 0 or 1 (float32 hits those) it is the inside derivative, where torch's clamp
    gives 0. Pinned, because changing it changes every trained result."""
    ends = torch.cat([_noise_hitting(1.0, math.log(11) * hc.BETA), _noise_hitting(0.0, -math.log(11) * hc.BETA)])
    assert len(ends) >= 2
    noise = torch.cat([ends, hc.logistic_noise(hc.uniform((4000,), hc.step_keys(0, 0, "t")))])
    log_alpha = torch.cat([torch.zeros(len(ends)), torch.linspace(-6, 6, 4000)]).requires_grad_()
    z_ref = (torch.add(noise, log_alpha).mul(1.0 / hc.BETA).sigmoid() * (hc.ZETA - hc.GAMMA) + hc.GAMMA).clamp(0, 1)
    z_ref.sum().backward()
    z, slope = hc.sample_and_slope(log_alpha.detach(), noise)
    assert torch.equal(z, z_ref.detach())
    n = len(ends)
    s = noise[:n].mul(1.0 / hc.BETA).sigmoid()
    torch.testing.assert_close(slope[:n], (hc.ZETA - hc.GAMMA) / hc.BETA * s * (1 - s), rtol=1e-6, atol=0)
    assert torch.all(log_alpha.grad[:n] == 0)  # torch's clamp: no gradient at exactly min or max
    torch.testing.assert_close(slope[n:], log_alpha.grad[n:], rtol=1e-6, atol=0)
    assert (slope[n:] == 0).any() and (slope[n:] > 0).any()  # clamped and open samples are covered


def test_init_and_fp32_under_autocast():
    la = hc.init_log_alpha((100_000,), 0.2, step_generator(0, 0))
    assert float(la.mean()) == pytest.approx(math.log(0.8 / 0.2), abs=1e-3)
    assert float(la.std()) == pytest.approx(0.01, rel=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = hc.sample(la[:10].bfloat16(), hc.uniform((10,), hc.step_keys(0, 1)))
        assert z.dtype == torch.float32 and hc.prob_nonzero(la[:10].bfloat16()).dtype == torch.float32


# -- dual ascent on toy problems ---------------------------------------------------------------
def _solve(bound: float, steps=4000, dual_lr=0.05, restarts=False):
    """min (x-2)^2 s.t. x <= bound by simultaneous gradient descent / projected dual ascent."""
    x = torch.tensor(0.0, requires_grad=True)
    ctl = LagrangianController(1, dual_lr, dual_restarts=restarts)
    seen = []
    for _ in range(steps):
        g = (x - bound).reshape(1)
        lagrangian = (x - 2) ** 2 + ctl.lagrangian_term(g)
        (grad,) = torch.autograd.grad(lagrangian, x)
        with torch.no_grad():
            x -= 0.05 * grad
        ctl.step(g)
        seen.append(float(ctl.multipliers[0]))
    return float(x.detach()), seen


def test_dual_ascent_toy_known_answer():
    x, lam = _solve(1.0)  # KKT: 2(x-2) + lambda = 0 at x = 1 -> lambda* = 2
    assert x == pytest.approx(1.0, abs=1e-3) and lam[-1] == pytest.approx(2.0, abs=1e-2)


def test_zero_violation_keeps_multiplier_at_zero():
    x, lam = _solve(3.0)  # the unconstrained optimum x = 2 is feasible
    assert max(lam) == 0.0 and x == pytest.approx(2.0, abs=1e-4)


def test_dual_restarts_reset_satisfied_constraints():
    ctl = LagrangianController(2, 1.0, dual_restarts=True)
    ctl.step(torch.tensor([0.5, 0.5]))
    ctl.step(torch.tensor([0.2, -0.1]))
    assert ctl.multipliers.tolist() == pytest.approx([0.7, 0.0])


def test_augmented_lagrangian_toy_equality():
    x = torch.tensor(0.0, requires_grad=True)  # min (x-2)^2 s.t. x = 1
    ctl = AugmentedLagrangianController(1, 0.05)
    for _ in range(6000):
        gap = (x - 1).reshape(1)
        (grad,) = torch.autograd.grad((x - 2) ** 2 + ctl.lagrangian_term(gap), x)
        with torch.no_grad():
            x -= 0.05 * grad
        ctl.step(gap)
    assert float(x.detach()) == pytest.approx(1.0, abs=1e-2) and float(ctl.lambda2[0]) > 0


# -- the effective-weight gradient mapping -------------------------------------------------------
@pytest.mark.parametrize("granularity", ["unstructured", "neuron", "factorized"])
@pytest.mark.parametrize("control", ["penalty", "constrained"])
def test_gradient_mapping_equals_autograd(granularity, control):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    # float32 logits: the hand-derived gradients against autograd at 1e-6 (bfloat16 logits round them)
    m = l0_on(layer, 0.2, 100, granularity=granularity, control=control, penalty=0.7, dual_lr=0.3,
              gate_dtype="float32")
    m.controller is not None and m.controller.multipliers.fill_(1.5)  # a nonzero multiplier
    (g,) = m.gates
    if granularity == "neuron":  # the unit gate covers the weight's rows and the unit's bias
        assert [(mm.target.name, mm.role) for mm in g.grid.members] == [("weight", "weight"), ("bias", "bias")]
    elif granularity == "unstructured":  # one gate per weight; the bias stays ungated
        assert [(mm.target.name, mm.role) for mm in g.grid.members] == [("weight", "weight")]
    with torch.no_grad():  # move the gates off their init so every term matters
        g.log_alpha.copy_(torch.linspace(-1.5, 2.0, g.num).view(g.log_alpha.shape))
    x, y = torch.randn(7, 5), torch.randn(7, 4)

    # explicit forward through W * z (or P diag(z) Q) with autograd on every real parameter
    la = g.log_alpha.detach().clone().requires_grad_()
    m.before_forward(3)
    z = hc.sample(la, hc.uniform(la.shape, hc.step_keys(0, 3, "l0:0")))  # the step's own noise (grid 0)
    if granularity == "factorized":
        P, Q = g.P.detach().clone().requires_grad_(), g.Q.detach().clone().requires_grad_()
        w_eff, real = (P * z) @ Q, [P, Q]
    else:
        W = g.real.values[0].clone().requires_grad_()
        w_eff, real = W * (z[:, None] if granularity == "neuron" else z), [W]
    bias = (g.real.values[1] if granularity == "neuron" else layer.bias).detach().clone().requires_grad_()
    b_eff = bias * z if granularity == "neuron" else bias  # a unit gate covers the unit's bias too
    loss = F.mse_loss(F.linear(x, w_eff, b_eff), y)
    dens = g.cost * hc.expected_l0(la) / g.total
    reg = 0.7 * dens if control == "penalty" else 1.5 * (dens - 0.2)
    expected = torch.autograd.grad(loss + reg, real + [la, bias])

    # the method: forward with the written effective weight, then map gradients
    assert torch.allclose(layer.weight, w_eff.detach(), atol=1e-6)
    F.mse_loss(layer(x), y).backward()
    m.after_backward(3)
    got = [g.P.grad, g.Q.grad] if granularity == "factorized" else [layer.weight.grad]
    for a, b in zip(got + [g.log_alpha.grad, layer.bias.grad], expected):
        assert torch.allclose(a, b, atol=1e-6)
    if granularity != "factorized":  # the optimizer now sees the real weight (and bias)
        assert torch.equal(layer.weight.detach(), g.real.values[0])
        assert torch.equal(layer.bias.detach(), bias.detach())


# -- granularities on tiny models ------------------------------------------------------------------
def test_unstructured_constrained_meets_target_and_writes_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    m = l0_on(model, 0.25, 150, gate_lr=0.1, dual_lr=0.5, freeze_fraction=0.8)
    assert m.freeze_step == 120
    run_steps(model, m, data_for((32, 12), (32, 3)), 150)
    assert m.frozen
    m.finalize()
    masks = m.hard_masks()
    kept = sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks)
    assert kept <= 0.25 + 1e-9 and kept == pytest.approx(0.25, abs=0.02)
    for t, k in zip(m.targets, masks):
        assert torch.all(t.param[~k] == 0) and torch.all(t.param[k] != 0)
    assert m.metrics()["hard_density"] == pytest.approx(kept)


def test_channel_gates_on_conv_prune_whole_output_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3))
    m = l0_on(model, 0.5, 80, granularity="channel", constraint="layer", count="gates", gate_lr=0.2,
              dual_lr=1.0, freeze_fraction=0.75)
    assert m.freeze_step == 60
    assert [tuple(g.log_alpha.shape) for g in m.gates] == [(8,), (6,)]
    run_steps(model, m, data_for((4, 2, 7, 7), (4, 6, 3, 3)), 80)
    m.finalize()
    structure = m.structure()
    for t, mask in zip(m.targets, m.hard_masks()):
        rows = mask.flatten(1)
        assert torch.all(rows.all(1) | ~rows.any(1))  # every output channel is all kept or all pruned
        assert rows.all(1).nonzero().flatten().tolist() == structure[t.name]
        assert len(structure[t.name]) <= 0.5 * t.shape[0]  # hard mask satisfies each layer's constraint
    assert len(structure["0.weight"]) == 4 and len(structure["2.weight"]) == 3


@pytest.mark.parametrize("rnn", [nn.GRU, nn.LSTM])
def test_neuron_gates_on_recurrent_hidden_units(rnn):
    torch.manual_seed(0)
    model = rnn(4, 6, num_layers=2, bidirectional=True)
    blocks = 3 if rnn is nn.GRU else 4
    m = l0_on(model, 0.5, 40, granularity="neuron", freeze_fraction=0.5)
    # one gate grid per (layer, direction), shared by weight_ih and weight_hh (and their biases)
    assert len(m.gates) == 4 and all(g.num == 6 for g in m.gates)
    assert [[(mm.target.attr, mm.role) for mm in g.grid.members] for g in m.gates][1] == [
        ("weight_ih_l0_reverse", "weight"), ("weight_hh_l0_reverse", "weight"),
        ("bias_ih_l0_reverse", "bias"), ("bias_hh_l0_reverse", "bias")]
    assert all([mm.role for mm in g.grid.members] == ["weight", "weight", "bias", "bias"] for g in m.gates)
    assert m.gates[0].cost == (blocks * 6 * 4 + blocks * 6 * 6) / 6
    assert m.gates[2].cost == (blocks * 6 * 12 + blocks * 6 * 6) / 6  # layer 1 reads both directions
    run_steps(model, m, data_for((5, 3, 4), (5, 3, 12)), 40)
    m.finalize()
    structure = m.structure()
    for t, mask in zip(m.targets, m.hard_masks()):
        units = mask.all(1).view(blocks, 6)
        assert torch.all(units == units[0])  # a unit's rows go together in every gate block
        assert torch.equal(mask.any(1), mask.all(1))
        assert units[0].nonzero().flatten().tolist() == structure[t.name]
        assert torch.all(t.param[~mask] == 0)
        bias = getattr(model, t.attr.replace("weight", "bias"))
        assert torch.all(bias[~mask.all(1)] == 0)  # a pruned unit's biases go with it
    assert structure["weight_ih_l0"] == structure["weight_hh_l0"]
    out, _ = model(torch.randn(5, 3, 4))  # flat weights still work after in-place writes
    assert torch.isfinite(out).all()


def test_factorized_gates_drop_rank_one_components():
    torch.manual_seed(0)
    layer = nn.Linear(10, 8)
    w0 = layer.weight.detach().clone()
    m = l0_on(layer, 0.5, 60, granularity="factorized", count="gates", gate_lr=0.2, dual_lr=1.0)
    (g,) = m.gates
    assert torch.allclose(g.P @ g.Q, w0, atol=1e-5)  # SVD init reproduces W
    run_steps(layer, m, data_for((16, 10), (16, 8)), 60)
    m.finalize()
    P, Q = m.factors()["weight"]
    assert P.shape[1] == Q.shape[0] <= 4
    assert torch.allclose(P @ Q, layer.weight, atol=1e-5)
    assert torch.linalg.matrix_rank(layer.weight.detach()) == P.shape[1]


def test_penalty_strength_orders_density():
    densities = []
    for lam in (0.0, 5.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        m = l0_on(model, None, 60, control="penalty", penalty=lam, gate_lr=0.1)
        run_steps(model, m, data_for((32, 12), (32, 3)), 60, lr=0.01, adam=True)
        densities.append(m.metrics()["expected_density"])
    assert densities[1] < densities[0] - 0.2


L0_RECIPE = """
model: {source: hf_sparse, name: lenet5}
sparsity:
  method: l0
SPARSITY"""


def l0_recipe_error(sparsity: str) -> str:
    with pytest.raises(RecipeError) as err:
        recipe_from_text(L0_RECIPE.replace("SPARSITY", sparsity), "r.yaml")
    return str(err.value)


def test_constrained_needs_target_and_config_validates():
    for control in ("constrained", "augmented"):
        key, message = L0.config_error(L0.Config(control=control), None)
        assert key == ("target_density",) and "target_density" in message
        assert "r.yaml:" in (e := l0_recipe_error(f"  params: {{control: {control}}}\n"))
        assert "sparsity.target_density:" in e and control in e
    assert L0.config_error(L0.Config(control="penalty"), None) is None
    assert L0.config_error(L0.Config(), 0.5) is None
    # the target must be reached before the gates freeze
    with pytest.raises(ValueError, match="freeze"):
        L0.Config(target_warmup=0.8, freeze_fraction=0.7)
    assert L0.Config(target_warmup=0.7, freeze_fraction=0.7).freeze_fraction == 0.7
    e = l0_recipe_error("  target_density: 0.5\n  params: {target_warmup: 0.8, freeze_fraction: 0.7}\n")
    assert "sparsity.params:" in e and "freeze_fraction" in e
    # granularity is a sparsity key, not a method param; an unknown one is located there
    with pytest.raises(ValueError):
        L0.Config(granularity="channel")
    e = l0_recipe_error("  target_density: 0.5\n  params: {granularity: channel}\n")
    assert "sparsity.params.granularity:" in e and "unknown key" in e
    e = l0_recipe_error("  target_density: 0.5\n  granularity: diagonal\n")
    assert "sparsity.granularity:" in e and "unknown granularity" in e
    for spelling in ("unstructured", "neuron", "factorized", "2:4"):
        recipe_from_text(L0_RECIPE.replace("SPARSITY", f"  granularity: '{spelling}'\n  params: {{control: penalty}}\n"),
                         "r.yaml")
    with pytest.raises(ValueError, match="2-D"):
        L0(resolve_targets(nn.Conv2d(2, 3, 3)), L0.Config(), 0.5, granularity=Granularity.parse("factorized"))


def test_satisfied_constraint_never_moves_multiplier():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    m = l0_on(model, 1.0, 20)  # E[density] <= 1 always holds
    run_steps(model, m, data_for((32, 12), (32, 3)), 20)
    assert float(m.controller.multipliers.max()) == 0.0


# -- state ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity, params", [
    ("unstructured", {"control": "constrained", "constraint": "layer"}),
    ("unstructured", {"control": "augmented", "target_warmup": 0.3}),
    ("factorized", {"control": "penalty"}),
    ("channel", {"control": "constrained"}),
])
def test_state_dict_round_trip_resumes_exactly(granularity, params):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    data = data_for((16, 6), (16, 2))
    ref_model = copy.deepcopy(model)
    ref = l0_on(ref_model, 0.4, 30, granularity, freeze_fraction=0.8, **params)
    run_steps(ref_model, ref, data, 30)
    assert ref.frozen and ref.freeze_step == 24  # the resume below (at 15) precedes the freeze

    first = l0_on(model, 0.4, 30, granularity, freeze_fraction=0.8, **params)
    opt = run_steps(model, first, data, 15)
    saved_state, saved_model = copy.deepcopy(first.state_dict()), copy.deepcopy(model.state_dict())

    fresh = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))  # other weights until loaded
    fresh.load_state_dict(saved_model)
    resumed = L0(resolve_targets(fresh), L0.Config(freeze_fraction=0.8, **params), 0.4, seed=0,
                 granularity=Granularity.parse(granularity), model=fresh)
    resumed.load_state_dict(saved_state)
    resumed.setup(30)  # Trainer calls setup after loading a checkpoint
    opt2 = torch.optim.SGD(list(fresh.parameters()), lr=0.05)
    for group in resumed.param_groups(0.05):
        opt2.add_param_group(group)
    opt2.load_state_dict(opt.state_dict())
    run_steps(fresh, resumed, data, 15, start=15, optimizer=opt2)

    for a, b in zip(ref_model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref.hard_masks(), resumed.hard_masks()):
        assert torch.equal(a, b)
    for a, b in zip(ref.masks, resumed.masks):
        assert torch.equal(a, b)
    assert ref.metrics() == resumed.metrics()
    assert set(saved_state) >= {"log_alpha", "real", "masks", "frozen", "controller"}


# -- channel gates and BatchNorm ----------------------------------------------------------------
def conv_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))


def test_channel_gate_acts_after_batchnorm_with_exact_gradients():
    from hf_sparse.grids import TargetSpec

    model = conv_bn_model()
    conv, bn, head = model[0], model[1], model[4]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.5, -0.7, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
    m = L0(resolve_targets(model, TargetSpec(include=["0.weight"])),
           L0.Config(penalty=0.3, control="penalty", gate_dtype="float32"),  # exact gradients: float32 logits
           None, seed=0, granularity=Granularity.parse("channel"), model=model)
    m.setup(10)
    (g,) = m.gates
    assert [(mm.target.name, mm.role) for mm in g.grid.members] == [
        ("0.weight", "weight"), ("1.weight", "norm"), ("1.bias", "norm")]
    assert g.grid.members[1].param is bn.weight and g.grid.members[2].param is bn.bias and g.paired
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-1.0, 0.5, 1.5, 3.0]))
    x, y = torch.randn(6, 2, 7, 7), torch.randn(6, 3)
    W, gamma, beta = conv.weight.detach().clone(), bn.weight.detach().clone(), bn.bias.detach().clone()
    leaves = [t.clone().requires_grad_() for t in (W, gamma, beta, g.log_alpha.detach())]
    z = hc.sample(leaves[3], hc.uniform((4,), hc.step_keys(0, 2, "l0:0")))
    h = F.batch_norm(F.conv2d(x, leaves[0]), None, None, leaves[1] * z, leaves[2] * z, training=True)
    loss = F.mse_loss(head(F.relu(h).flatten(1)), y) + 0.3 * hc.expected_l0(leaves[3]) / 4
    expected = torch.autograd.grad(loss, leaves)

    model.train()
    m.before_forward(2)
    assert torch.equal(conv.weight, W)  # the conv trains ungated; the gate scales the BatchNorm
    F.mse_loss(model(x), y).backward()
    m.after_backward(2)
    for got, want in zip((conv.weight.grad, bn.weight.grad, bn.bias.grad, g.log_alpha.grad), expected):
        assert torch.allclose(got, want, atol=1e-6)

    m.finalize()
    model.eval()
    closed = ~m.masks[0]
    assert closed.any()
    feats = model[:3](torch.randn(5, 2, 7, 7))
    assert torch.all(feats[:, closed] == 0) and torch.all(conv.weight[closed] == 0)


def paired_norms(method) -> list[nn.Module | None]:
    """The BatchNorm each gate grid acts after (None: the gates scale the layer itself)."""
    return [next((mm.target.module for mm in g.grid.members if mm.role == "norm"), None) for g in method.gates]


def test_batchnorm_pairing_rules():
    model = conv_bn_model()
    m = l0_on(model, 0.5, 10, granularity="channel")
    assert paired_norms(m) == [model[1], None]  # the Linear has no BatchNorm
    assert [g.paired for g in m.gates] == [True, False]
    plain_model = conv_bn_model()
    plain = l0_on(plain_model, 0.5, 10, granularity="channel", batchnorm=False)
    assert paired_norms(plain) == [None, None]
    unpaired = L0(resolve_targets(model), L0.Config(), 0.5, granularity=Granularity.parse("channel"))  # no model
    assert paired_norms(unpaired) == [None, None]


# -- under SparseTrainer ------------------------------------------------------------------------
TRAINER_CONFIGS = {
    "neuron-augmented": {"method": "l0", "target_density": 0.5, "targets": {"exclude": ["classifier.*"]},
                         "granularity": "neuron",
                         "params": {"control": "augmented", "target_warmup": 0.3, "freeze_fraction": 0.7,
                                    "dual_lr": 1.0}},
    "factorized-penalty": {"method": "l0", "granularity": "factorized",
                           "params": {"control": "penalty", "penalty": 1.0, "freeze_fraction": 0.7}},
    "layer-constrained": {"method": "l0", "target_density": 0.3,
                          "params": {"constraint": "layer", "gate_lr_schedule": "constant", "freeze_fraction": 0.7}},
}


def gate_state(trainer) -> list[torch.Tensor]:
    m = trainer.sparsifier.method
    state = [g.log_alpha.detach().clone() for g in m.gates]
    if m.controller is not None:
        state += [torch.as_tensor(v).clone() for v in m.controller.state_dict().values()]
    return state


@pytest.mark.parametrize("name", ["neuron-augmented", "factorized-penalty"])  # constrained: test_engine.py
def test_trainer_resume_equals_uninterrupted(fmnist_small, tmp_path, name):
    from tests.helpers import make_trainer

    sparsity = TRAINER_CONFIGS[name]
    straight = make_trainer(fmnist_small, tmp_path / "a", sparsity, max_steps=20, lr_scheduler_type="cosine")
    straight.train()
    first = make_trainer(fmnist_small, tmp_path / "b", sparsity, max_steps=20, lr_scheduler_type="cosine",
                         save_strategy="steps", save_steps=10)
    first.train()
    resumed = make_trainer(fmnist_small, tmp_path / "b", sparsity, max_steps=20, lr_scheduler_type="cosine")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))
    for (n, p1), p2 in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p1, p2), n
    for a, b in zip(gate_state(straight), gate_state(resumed)):
        assert torch.equal(a, b)
    # factorised layers are dense low-rank matrices: their density counts the kept factors
    assert straight.sparsifier.method.metrics()["hard_density"] < 1.0


def test_trainer_bf16_accumulation_and_logs(fmnist_small, tmp_path):
    from tests.helpers import make_trainer

    trainer = make_trainer(fmnist_small, tmp_path, TRAINER_CONFIGS["layer-constrained"], bf16=True,
                           gradient_accumulation_steps=2, max_grad_norm=0.5, max_steps=12, logging_steps=6)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"sparsity/l0/expected_density", "sparsity/l0/hard_density", "sparsity/l0/lambda"} <= set(logs[-1])
    assert all(math.isfinite(v) for h in logs for v in h.values() if isinstance(v, float))
    assert trainer.sparsifier.density() == pytest.approx(0.3, abs=0.002)
    # the logits keep the configured dtype (float32 by default), whatever the training precision
    assert all(g.log_alpha.dtype == torch.float32 for g in trainer.sparsifier.method.gates)


def test_neuron_gates_export_purged_with_equal_outputs(fmnist_small, tmp_path):
    from hf_sparse.checkpoint.save_and_load import load_sparse
    from tests.helpers import make_trainer

    sparsity = {"method": "l0", "target_density": 0.5, "targets": {"exclude": ["classifier.*"]},
                "granularity": "neuron", "params": {"count": "gates", "freeze_fraction": 0.7, "dual_lr": 1.0}}
    trainer = make_trainer(fmnist_small, tmp_path / "run", sparsity, max_steps=12)
    trainer.train()
    structure = trainer.sparsifier.method.structure()
    assert [len(structure[n]) for n in ("fc1.weight", "fc2.weight")] == [16, 8]  # half of (32, 16) units
    # results.json/sparsity.json carry the unit density; achieved_density counts weights
    report = trainer.sparsifier.report(trainer.model)
    assert report.method_metrics["hard_density"] == 0.5 and report.granularity == "channel"
    folder = trainer.save_sparse_model(tmp_path / "model", format="purged")
    small = load_sparse(folder)
    assert small.fc1.out_features == 16 and small.fc2.out_features == 8
    x = fmnist_small.collator([fmnist_small.eval[i] for i in range(8)])["pixel_values"]
    trainer.model.eval()
    assert torch.allclose(small(x).logits, trainer.model(x.to(trainer.model.device)).logits, atol=1e-5)


def test_budget_split_caps_and_rounds():
    from types import SimpleNamespace

    from hf_sparse.methods.l0 import _spend

    groups = [SimpleNamespace(num=10, cost=1.0), SimpleNamespace(num=100, cost=1.0)]
    assert _spend(groups, [9.0, 10.0], 30) == [10, 20]  # the first layer is full, the rest goes on
    groups = [SimpleNamespace(num=100, cost=1.0), SimpleNamespace(num=100, cost=1.0)]
    assert _spend(groups, [1.0, 2.0], 10) == [3, 7]  # 3.33, 6.67: floors, then the largest remainder
    groups = [SimpleNamespace(num=8, cost=3.0), SimpleNamespace(num=8, cost=5.0)]
    counts = _spend(groups, [4.0, 4.0], 30)
    assert sum(k * g.cost for k, g in zip(counts, groups)) <= 30


def test_constant_gate_lr_undoes_the_trainer_schedule():
    def gates_after(scheduled_fraction: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        m = l0_on(model, 0.4, 20, gate_lr=0.1, freeze_fraction=1.0)
        opt = torch.optim.Adam(list(model.parameters()), lr=0.01)
        for group in m.param_groups(0.01):
            opt.add_param_group(group)
        opt.param_groups[-1]["lr"] *= scheduled_fraction  # what an LR scheduler would do to the gates
        run_steps(model, m, data_for((16, 6), (16, 2)), 5, optimizer=opt)
        assert not m.frozen
        return torch.cat([g.log_alpha.detach().flatten() for g in m.gates])

    assert torch.allclose(gates_after(0.25), gates_after(1.0), atol=1e-5)
