"""Each method's rule on small tensors, against values computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_sparse.grids import resolve_targets
from hf_sparse.methods import bitset, get_method
from hf_sparse.methods.base import step_generator


def linear_with(weights: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
    return layer


def method_on(layer: nn.Module, name: str, target_density, total_steps: int, **params):
    cls = get_method(name)
    m = cls(resolve_targets(layer), cls.Config(**params), target_density, seed=0)
    m.setup(total_steps)
    return m


# -- gmp: Zhu & Gupta -------------------------------------------------------------------------
def test_gmp_cubic_schedule_values():
    m = method_on(linear_with([1.0] * 8), "gmp", 0.25, 10, start_step=0, end_step=3, frequency=1)
    # s_t = s_f + (s_i - s_f)(1 - t/3)^3 with s_f = 0.75, s_i = 0: densities 1, 1-0.75*(1-8/27), 1-0.75*(1-1/27), 0.25
    expected = [1.0, 1 - (0.75 - 0.75 * 8 / 27), 1 - (0.75 - 0.75 / 27), 0.25, 0.25]
    assert [m.density_at(t) for t in range(5)] == pytest.approx(expected)
    assert [m.schedule.window.is_update_step(t) for t in range(5)] == [True, True, True, True, False]


def test_gmp_prunes_smallest_magnitudes_exactly():
    layer = linear_with([0.1, -0.8, 0.3, 0.05, -0.6, 0.7, -0.2, 0.4])
    m = method_on(layer, "gmp", 0.25, 10, start_step=3, end_step=3)
    m.after_step(3, None)  # final update: keep round(0.25 * 8) = 2 largest |w|: -0.8 and 0.7
    assert m.masks[0].tolist() == [[False, True, False, False, False, True, False, False]]
    assert layer.weight.tolist() == [[0.0, pytest.approx(-0.8), 0.0, 0.0, 0.0, pytest.approx(0.7), 0.0, 0.0]]


def test_gmp_global_scope_ranks_across_layers():
    model = nn.Sequential(linear_with([0.9, 0.8, 0.1, 0.2]), linear_with([0.05, 0.04, 0.03, 0.7]))
    m = method_on(model, "gmp", 0.5, 4, start_step=0, end_step=0, scope="global")
    m.after_step(0, None)  # 4 of 8 survive: 0.9, 0.8, 0.7, 0.2
    assert m.masks[0].tolist() == [[True, True, False, True]]
    assert m.masks[1].tolist() == [[False, False, False, True]]


# -- gradual: Narang et al. -------------------------------------------------------------------
def test_gradual_threshold_formula_and_monotone_masks():
    layer = linear_with([0.05, 0.15, 0.25, 0.45, 0.65, 0.85, 0.95, -0.3])
    m = method_on(layer, "gradual", None, 10, start_itr=0, ramp_itr=2, end_itr=4, freq=1,
                  start_slope=0.1, ramp_slope=0.2)
    # eps = theta (itr+1)/freq before ramp; (theta (ramp-start+1) + phi (itr-ramp+1))/freq after
    assert [m.eps(i, 0.1, 0.2) for i in range(5)] == pytest.approx([0.1, 0.2, 0.5, 0.7, 0.9])
    survivors = []
    for itr in range(5):
        m.after_step(itr, None)
        survivors.append(int(m.masks[0].sum()))
    # pruned: 0.05 | 0.15 | 0.25, 0.45, -0.3 | 0.65 | 0.85  -> only 0.95 stays
    assert survivors == [7, 6, 3, 2, 1]
    assert layer.weight[0, 6].item() == pytest.approx(0.95) and int((layer.weight != 0).sum()) == 1


def test_gradual_theta_from_q_as_in_the_paper():
    layer = linear_with([float(i) for i in range(1, 11)])
    m = method_on(layer, "gradual", None, 100, start_itr=0, ramp_itr=2, end_itr=4, freq=1)
    m.after_step(0, None)
    q = 9.1  # 90th percentile of 1..10 (linear interpolation)
    theta = 2 * q * 1 / (2 * (2 - 0) + 3 * (4 - 2))
    assert float(m.theta[0]) == pytest.approx(theta)
    assert float(m.phi[0]) == pytest.approx(1.5 * theta)


def test_gradual_target_mode_lands_on_target():
    torch.manual_seed(0)
    layer = nn.Linear(50, 40)
    m = method_on(layer, "gradual", 0.1, 100, start_itr=10, ramp_itr=30, end_itr=60, freq=10)
    for itr in range(100):
        m.after_step(itr, None)
    assert int(m.masks[0].sum()) == 200  # exactly round(0.1 * 2000)


# -- dns: Guo et al. --------------------------------------------------------------------------
def test_dns_thresholds_surgery_and_splicing():
    w = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0]
    layer = linear_with(w)
    m = method_on(layer, "dns", None, 100, c=0.5, start_iter=0, iter_stop=50, gamma=0.0)
    m.after_step(0, None)  # gamma=0: surgery probability 1
    mean, std = 4.5, math.sqrt(6.0)  # of |W| = 1..8 (unbiased std)
    t = mean + 0.5 * std
    assert float(m.t[0]) == pytest.approx(t)
    # a = 0.9t = 5.15, b = 1.1t = 6.30: |W| <= a pruned, 6.0 in the band keeps its mask (1), 7 and 8 kept
    assert m.masks[0].tolist() == [[False, False, False, False, False, True, True, True]]
    assert layer.weight.tolist()[0][:5] == [0.0] * 5
    # forward sees W*T, but the dense W is kept and trains: grow a pruned weight past b -> spliced back
    m.after_backward(1)
    assert layer.weight.tolist() == [w]
    with torch.no_grad():
        layer.weight[0, 0] = 7.5   # pruned weight grows above b
        layer.weight[0, 5] = -5.5  # kept weight falls into the band: stays kept
    m.after_step(1, None)
    assert m.masks[0].tolist() == [[True, False, False, False, False, True, True, True]]
    assert m.metrics()["spliced"] == 1


def test_packed_flags_round_trip():
    """DNS keeps its ever-pruned flags eight to a byte; unpacking gives the flags back exactly."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(1,), (8,), (3, 5), (7, 3, 3)]:
        flags = torch.rand(shape, generator=gen) > 0.5
        packed = bitset.pack(flags)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(flags.numel() / 8)
        assert torch.equal(bitset.unpack(packed, flags.shape), flags)
        assert torch.equal(bitset._pack_tensor(flags), packed)  # the path of non-CPU devices: same bytes
    assert bitset.pack(torch.tensor([True, False, True] + [False] * 5)).tolist() == [0b101]


def test_dns_surgery_probability_and_shared_draws():
    m = method_on(linear_with([1.0, 2.0]), "dns", None, 10_000, gamma=1e-3, power=1.0, iter_stop=10_000)
    assert m.surgery_probability(1000) == pytest.approx(0.5)  # (1 + 1e-3 * 1000) ** -1
    assert m.surgery_probability(3000) == pytest.approx(0.25)
    draws = [m.runs_surgery(i) for i in range(2000, 4000)]
    expected = sum(m.surgery_probability(i) for i in range(2000, 4000))
    assert abs(sum(draws) - expected) < 4 * math.sqrt(expected)
    # the draw for an iteration is a function of (seed, iteration): another process (or a resumed
    # run) building the method afresh makes the same choices, and they are u < sigma(iter)
    other = method_on(linear_with([3.0, 4.0]), "dns", None, 10_000, gamma=1e-3, power=1.0, iter_stop=10_000)
    assert [other.runs_surgery(i) for i in range(2000, 4000)] == draws
    u = [torch.rand((), generator=step_generator(0, i, "dns")).item() for i in range(2000, 2100)]
    assert draws[:100] == [x < m.surgery_probability(i) for x, i in zip(u, range(2000, 2100))]
    assert torch.equal(torch.rand(3, generator=step_generator(0, 7, "x")), torch.rand(3, generator=step_generator(0, 7, "x")))


def test_dns_target_mode_final_surgery_hits_target():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    m = method_on(layer, "dns", 0.2, 100, start_iter=0, iter_stop=40, gamma=0.01, recalibrate_every=10)
    for itr in range(60):
        m.after_backward(itr)
        with torch.no_grad():
            layer.weight.add_(0.01 * torch.randn(layer.weight.shape, generator=step_generator(1, itr)))
        m.after_step(itr, None)
    assert int(m.masks[0].sum()) == 120  # round(0.2 * 600)
    assert int((layer.weight != 0).sum()) == 120


@pytest.mark.parametrize("method", ["dns", "gradual"])
def test_global_scope_ranks_across_layers_at_the_last_update(method):
    """scope: global keeps the largest weights of all layers together (the small layer is not starved)."""
    model = nn.Sequential(linear_with([0.9, 0.8, 0.1, 0.2]), linear_with([0.05, 0.04, 0.03, 0.7]))
    window = {"start_step": 0, "end_step": 0} if method == "dns" else {"start_step": 0, "ramp_step": 0, "end_step": 0}
    m = method_on(model, method, 0.5, 4, scope="global", **window)
    m.after_step(0, None)  # 4 of 8 survive: 0.9, 0.8, 0.7, 0.2 (per layer it would be 2 + 2)
    assert m.masks[0].tolist() == [[True, True, False, True]]
    assert m.masks[1].tolist() == [[False, False, False, True]]
    per_layer = method_on(nn.Sequential(linear_with([0.9, 0.8, 0.1, 0.2]), linear_with([0.05, 0.04, 0.03, 0.7])),
                          method, 0.5, 4, **window)
    per_layer.after_step(0, None)
    assert [int(k.sum()) for k in per_layer.masks] == [2, 2]
