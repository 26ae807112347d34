"""The counter-based Hard Concrete noise, the fused L0 gate kernels (eager and compiled), and
AutoPrune's moment handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_sparse.grids import Granularity, resolve_targets
from hf_sparse.methods import gate_kernels as gk
from hf_sparse.methods import hard_concrete as hc
from hf_sparse.methods.autoprune import V_FLOOR, V_FLOOR_EVERY, AutoPrune
from hf_sparse.methods.base import optimizer_states
from hf_sparse.methods.l0 import L0
from tests.helpers import run_steps

INV_BETA, SHIFT = 1.0 / hc.BETA, hc.BETA * math.log(-hc.GAMMA / hc.ZETA)


# -- the noise ---------------------------------------------------------------------------------
def test_hashed_uniform_is_a_uniform_counter_stream():
    keys = hc.step_keys(0, 7, "l0:0")
    assert keys == hc.step_keys(0, 7, "l0:0") and keys != hc.step_keys(0, 8, "l0:0")
    u = hc.uniform((1000, 500), keys)
    assert u.dtype == torch.float32 and float(u.min()) >= hc.EPS and float(u.max()) <= 1 - hc.EPS
    assert float(u.mean()) == pytest.approx(0.5, abs=2e-3) and float(u.var()) == pytest.approx(1 / 12, abs=1e-3)
    # deciles equally filled, neighbours uncorrelated
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=3e-3)
    flat = u.flatten() - 0.5
    assert abs(float((flat[1:] * flat[:-1]).mean()) * 12) < 0.01
    # each element depends on its index only: an FSDP2 shard's offset gives its slice of the whole draw
    assert torch.equal(hc.uniform((300, 500), keys, offset=200 * 500), u[200:500])
    # another step's stream is unrelated (not a shift of this one)
    other = hc.uniform((1000, 500), hc.step_keys(0, 8, "l0:0")).flatten() - 0.5
    assert abs(float((flat * other).mean()) * 12) < 0.01
    # the values are symmetric about 1/2, so 1 - u is exact and log u - log(1 - u) finite
    assert torch.isfinite(hc.logistic_noise(u)).all()


def test_no_gate_in_the_logit_range_is_saturated():
    """Why no draw is skipped: within LOG_ALPHA_RANGE every gate can still come out 0 and 1, so its
    sample depends on u, and skipping a draw would change the expectation."""
    lo, hi = hc.LOG_ALPHA_RANGE
    ends = torch.tensor([hc.EPS, 1 - hc.EPS])
    for la in (lo, hi):
        z = hc.sample(torch.full((2,), la), ends)
        assert float(z[0]) == 0.0 and float(z[1]) == 1.0
        assert 0.0 < float(hc.prob_nonzero(torch.tensor(la))) < 1.0


# -- the fused kernels = the generic formulas ----------------------------------------------------
def _tensors(n=1000, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    la = (torch.randn(n, generator=g) * 3).clamp(-10, 10).to(dtype)
    real, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    keys = torch.tensor(hc.step_keys(1, 2, "t"), dtype=torch.int32)
    return la, real, grad, keys, torch.tensor(0, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_the_generic_formulas(dtype):
    la, real, grad, keys, off = _tensors(dtype=dtype)
    z, slope = hc.sample_and_slope(la, hc.logistic_noise(hc.uniform(la.shape, hc.step_keys(1, 2, "t"))))
    out = torch.empty_like(real)
    psum = gk.train_write(la, real, out, keys, off, INV_BETA, SHIFT)
    torch.testing.assert_close(out, real * z, rtol=1e-6, atol=1e-7)
    assert float(psum) == pytest.approx(float(hc.expected_l0(la)), rel=1e-6)
    g, param, reg = grad.clone(), torch.empty_like(real), torch.tensor(0.3)
    la_grad = gk.train_grads(la, real, g, param, keys, off, INV_BETA, SHIFT, reg)
    p = hc.prob_nonzero(la)
    want = (real * grad * slope + 0.3 * p * (1 - p)).to(dtype)
    torch.testing.assert_close(la_grad, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    assert torch.equal(param, real)
    torch.testing.assert_close(g, grad * z, rtol=1e-6, atol=1e-7)
    w = real.clone()
    gk.eval_write(la, w, param, INV_BETA, store=False)
    torch.testing.assert_close(param, real * hc.deterministic(la), rtol=1e-6, atol=1e-7)


def test_mode_switch_and_auto_threshold(monkeypatch):
    monkeypatch.setenv("HF_SPARSE_GATE_KERNELS", "auto")
    gk.set_mode(None)
    assert not gk.use_compiled(100, 266_200) and gk.use_compiled(4690, 266_200)
    monkeypatch.setenv("HF_SPARSE_GATE_KERNELS", "eager")
    assert not gk.use_compiled(10**6, 10**6)
    gk.set_mode("compiled")
    try:
        assert gk.use_compiled(1, 1)
    finally:
        gk.set_mode(None)
    with pytest.raises(ValueError):
        gk.set_mode("fast")


def _lenet_l0(mode, total=1000, seed=0):
    gk.set_mode(mode)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    m = L0(resolve_targets(model), L0.Config(control="constrained", dual_lr=2.0), 0.2, seed=0,
           granularity=Granularity.parse("unstructured"), model=model)
    m.setup(total)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for group in m.param_groups(2e-3):
        opt.add_param_group(group)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # the gates' lr is pinned to gate_lr anyway
    return model, m, opt, sched


def _batches(steps, batch, features, classes, seed):
    """The same seeded (x, y) per step whichever step a run starts at."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(steps)]


def _steps(model, m, opt, sched, start, stop):
    data = _batches(stop, 32, 64, 10, seed=5)
    run_steps(m, opt, lambda s: nn.functional.cross_entropy(model(data[s][0]), data[s][1]), stop - start, start,
              scheduler=sched)


def _state(model, m):
    return [p.detach().clone() for p in model.parameters()] + [g.log_alpha.detach().clone() for g in m.gates]


def _resume_is_bit_exact(mode):
    model, m, opt, sched = _lenet_l0(mode)
    assert m.compiled == (mode == "compiled")
    _steps(model, m, opt, sched, 0, 6)
    straight = _state(model, m)
    model2, m2, opt2, sched2 = _lenet_l0(mode)
    _steps(model2, m2, opt2, sched2, 0, 3)
    saved = (m2.state_dict(), opt2.state_dict(), sched2.state_dict(), model2.state_dict())
    model3, m3, opt3, sched3 = _lenet_l0(mode, seed=1)  # a fresh process's objects, other init
    m3.load_state_dict(saved[0])
    model3.load_state_dict(saved[3])
    opt3.load_state_dict(saved[1])
    sched3.load_state_dict(saved[2])
    _steps(model3, m3, opt3, sched3, 3, 6)
    return straight, _state(model3, m3)


def test_resume_is_bit_exact_eager():
    try:
        straight, resumed = _resume_is_bit_exact("eager")
    finally:
        gk.set_mode(None)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.slow  # compiles the three kernels: 10-30 s in a fresh process
def test_compiled_kernels_equal_eager_and_resume_bit_exact():
    try:
        straight, resumed = _resume_is_bit_exact("compiled")
        eager, _ = _resume_is_bit_exact("eager")
        la, real, grad, keys, off = _tensors(100_003)
        idx = torch.arange(la.numel(), dtype=torch.int32)
        assert torch.equal(torch.compile(hc.hashed_uniform, dynamic=True)(idx, keys), hc.hashed_uniform(idx, keys))
        outs = []
        for compiled in (False, True):
            out, g, param = torch.empty_like(real), grad.clone(), torch.empty_like(real)
            s = gk.run("train_write", compiled, la, real, out, keys, off, INV_BETA, SHIFT)
            la_grad = gk.run("train_grads", compiled, la, real, g, param, keys, off, INV_BETA, SHIFT, torch.tensor(0.3))
            outs.append((out, s, la_grad, g))
    finally:
        gk.set_mode(None)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # six steps compiled vs eager: the same training up to float32 rounding (bfloat16 logits may round apart)
    for a, b in zip(straight, eager):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2 if a.dtype == torch.bfloat16 else 1e-4)


# -- AutoPrune: moments zeroed at restore events only ------------------------------------------------
def test_autoprune_restore_only_zeroing_keeps_the_per_step_zeroing_trajectory():
    """Zeroing the pruned weights' moments after every step (the old rule) and zeroing them only when
    a weight is restored train the same weights; the second moments stay off subnormals."""

    def train(zero_every_step: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
        m = AutoPrune(resolve_targets(model), AutoPrune.Config(start_fraction=0.0, end_fraction=0.5,
                                                               freeze_fraction=0.9, mask_lr=0.01, init=0.02),
                      0.3, seed=0, granularity=Granularity.parse("unstructured"), model=model)
        m.setup(70)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
        for group in m.param_groups(0.01):
            opt.add_param_group(group)
        data = _batches(70, 16, 16, 4, seed=3)

        def then(s):
            if zero_every_step:
                for member, f in zip(m.covered, m._factors):
                    for st in optimizer_states(opt, member.target.parameter):
                        st.mul_(f)
            if s % V_FLOOR_EVERY == 0 and not zero_every_step:
                for member in m.covered:
                    assert float(opt.state[member.target.parameter]["exp_avg_sq"].min()) >= V_FLOOR

        run_steps(m, opt, lambda s: nn.functional.cross_entropy(model(data[s][0]), data[s][1]), 70, then=then)
        return [v.clone() for v in m.real.values], [k.clone() for k in m.masks], m.restore_events

    old, new = train(True), train(False)
    assert new[2] > 0  # weights did come back
    assert all(torch.equal(a, b) for a, b in zip(old[0], new[0]))
    assert all(torch.equal(a, b) for a, b in zip(old[1], new[1]))


# -- AutoPrune's fused passes ----------------------------------------------------------------------
def _ap_tensors(n=1000):
    g = torch.Generator().manual_seed(1)
    m = torch.randn(n, generator=g) * 0.01
    real, grad, param = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    keep = torch.rand(n, generator=g) > 0.5
    states = [torch.randn(n, generator=g), torch.rand(n, generator=g)]
    return m, real, grad, param, keep, states


@pytest.mark.parametrize("ste, arg", [("identity", 0.0), ("leaky_relu", 0.1), ("softplus", 20.0)])
def test_autoprune_fused_passes_match_the_generic_rules(ste, arg):
    """The fused passes (eager) = the generic per-op rules of autoprune.py, bit for bit."""
    from hf_sparse.methods.autoprune import ste_grad

    m, real, grad, param, keep, states = _ap_tensors()
    f = keep.float()
    # after backward
    g = grad.clone()
    m_grad = gk.run("ap_grads", False, m, real, g, param, keep.view(torch.uint8), torch.tensor(0.25), ste, arg)
    cfg = AutoPrune.Config(ste=ste, **({"leaky_slope": arg} if ste == "leaky_relu" else
                                       {"softplus_beta": arg} if ste == "softplus" else {}))
    want = ste_grad(m, cfg).mul_((torch.zeros_like(m) + grad * torch.sign(real)).add_(0.25))
    assert torch.equal(m_grad, want) and torch.equal(g, grad * f) and torch.equal(param, real)
    # after the step: store where kept, new mask m > 0, restored weights' states zeroed and marked
    w, p, k, ever = real.clone(), param.clone(), keep.clone(), torch.zeros_like(keep)
    st = [s.clone() for s in states]
    n, kept = gk.run("ap_step", False, m, w, p, k.view(torch.uint8), ever.view(torch.uint8), st, False)
    stored = real.lerp(param, f)
    new = m > 0
    back = new & ~keep
    assert torch.equal(w, stored) and torch.equal(p, stored * new) and torch.equal(k, new)
    assert torch.equal(ever, back) and int(n) == int(back.sum()) and int(kept) == int(new.sum())
    for a, s in zip(st, states):
        assert torch.equal(a, s * (1.0 - back.float()))
    # frozen: the mask stays, nothing restored
    w, p, k = real.clone(), param.clone(), keep.clone()
    n, _ = gk.run("ap_step", False, m, w, p, k.view(torch.uint8), ever.view(torch.uint8), [], True)
    assert int(n) == 0 and torch.equal(k, keep) and torch.equal(w, stored) and torch.equal(p, stored * f)


def _ap_run(mode, steps=40, stop=None, state=None):
    """A small AutoPrune run (restores, the dual step, the freeze at step 30); optionally resumed."""
    gk.set_mode(mode)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    m = AutoPrune(resolve_targets(model), AutoPrune.Config(start_fraction=0.0, end_fraction=0.5, freeze_fraction=0.75,
                                                           mask_lr=0.01, init=0.02),
                  0.3, seed=0, granularity=Granularity.parse("unstructured"), model=model)
    m.setup(steps)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    for group in m.param_groups(0.01):
        opt.add_param_group(group)
    start = 0
    if state is not None:
        m.load_state_dict(state[0])
        model.load_state_dict(state[1])
        opt.load_state_dict(state[2])
        start = state[3]
    data = _batches(steps, 16, 16, 4, seed=3)
    stop = steps if stop is None else stop
    run_steps(m, opt, lambda s: nn.functional.cross_entropy(model(data[s][0]), data[s][1]), stop - start, start)
    return model, m, opt, stop


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_autoprune_fused_resume_is_bit_exact(mode):
    """A run resumed at step 17 (of 40: restores, dual steps, the freeze at 30) = the straight run."""
    try:
        model, m, _, _ = _ap_run(mode)
        model2, m2, opt2, at = _ap_run(mode, stop=17)
        assert m2.compiled == (mode == "compiled")
        saved = (m2.state_dict(), model2.state_dict(), opt2.state_dict(), at)
        model3, m3, _, _ = _ap_run(mode, state=saved)
    finally:
        gk.set_mode(None)
    assert m.restore_events > 0 and m.frozen and m3.frozen
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model3.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(m.real.values, m3.real.values))
    assert [k.tolist() for k in m.masks] == [k.tolist() for k in m3.masks]
    assert m.restore_events == m3.restore_events


@pytest.mark.slow  # compiles AutoPrune's passes: several seconds in a fresh process
def test_autoprune_compiled_passes_equal_eager():
    outs = []
    for compiled in (False, True):
        m, real, grad, param, keep, states = _ap_tensors(100_003)
        k, ever = keep.clone(), torch.zeros_like(keep)
        m_grad = gk.run("ap_grads", compiled, m, real, grad, param, k.view(torch.uint8), torch.tensor(0.25),
                        "softplus", 20.0)
        n, kept = gk.run("ap_step", compiled, m, real, param, k.view(torch.uint8), ever.view(torch.uint8), states,
                         False)
        outs.append((m_grad, grad, param, real, k, ever, *states, int(n), int(kept)))
    eager, compiled = outs
    torch.testing.assert_close(eager[0], compiled[0], rtol=1e-6, atol=0)  # sigmoid: float32 rounding
    for a, b in zip(eager[1:], compiled[1:]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # batched (more grids than one compiled call takes) = one by one
    sizes = [7, 300, 1, 64] * 3
    runs = []
    for compiled in (False, True):
        g = torch.Generator().manual_seed(4)
        entries = []
        for n in sizes:
            m = torch.randn(n, generator=g) * 0.01
            entries.append({"m": m, "real": torch.randn(n, generator=g), "param": torch.randn(n, generator=g),
                            "keep": (torch.rand(n, generator=g) > 0.5).view(torch.uint8),
                            "ever": torch.zeros(n, dtype=torch.uint8), "states": [torch.rand(n, generator=g)]})
        counts = gk.run_many("ap_step", compiled, entries, frozen=False)
        runs.append((entries, [(int(a), int(b)) for a, b in counts]))
    assert not gk._broken and runs[0][1] == runs[1][1]
    for e1, e2 in zip(runs[0][0], runs[1][0]):
        for key in ("real", "param", "keep", "ever"):
            assert torch.equal(e1[key], e2[key])
        assert torch.equal(e1["states"][0], e2["states"][0])


def test_run_many_equals_one_call_per_grid():
    """Batched calls (what the methods use) = one call per grid, eagerly; compiled likewise (slow test)."""
    g = torch.Generator().manual_seed(2)
    sizes = [5, 17, 1, 33] * 3  # more grids than one compiled call takes
    las = [(torch.randn(n, generator=g) * 12).clamp(-11, 11) for n in sizes]
    reals = [torch.randn(n, generator=g) for n in sizes]
    want = []
    for la, real in zip(las, reals):
        la2, real2, param = la.clone(), real.clone(), torch.randn(len(la), generator=torch.Generator())
        gk.eval_write(la2, real2, param, INV_BETA, store=False, clamp=True)
        want.append((la2, param))
    entries = [{"la": la.clone(), "real": real.clone(), "param": torch.empty_like(real)} for la, real in zip(las, reals)]
    gk.run_many("eval_write", False, entries, inv_beta=INV_BETA, store=False, clamp=True)
    for e, (la2, param) in zip(entries, want):
        assert torch.equal(e["la"], la2) and torch.equal(e["param"], param)
        assert float(e["la"].abs().max()) <= hc.LOG_ALPHA_RANGE[1]
