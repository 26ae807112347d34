"""SparseTrainer invariants: masks hold, state resumes exactly, Trainer features keep working."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.methods.base import optimizer_states
from tests.helpers import assert_trainers_equal, fast_sparsity, make_trainer, method_granularities, tiny_lenet

ENGINE_METHODS = ["gmp", "gradual", "dns"]


def test_no_sparsity_is_plain_trainer(fmnist_small, tmp_path):
    from transformers import Trainer

    from tests.helpers import tiny_args

    a = make_trainer(fmnist_small, tmp_path / "a", None, max_steps=6)
    a.train()
    b = Trainer(model=tiny_lenet(), args=tiny_args(tmp_path / "b", max_steps=6), train_dataset=fmnist_small.train,
                data_collator=fmnist_small.collator)
    b.train()
    assert a.sparsifier is None
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(("method", "granularity"), method_granularities())
def test_pruned_weights_stay_zero_under_momentum_and_weight_decay(fmnist_small, tmp_path, method, granularity):
    """After every step the weights carry the method's hard masks exactly, at every granularity."""
    from transformers import TrainerCallback

    trainer = make_trainer(fmnist_small, tmp_path, fast_sparsity(method, granularity), optim="adamw_torch",
                           learning_rate=0.01, weight_decay=0.1, max_steps=20)
    seen = []

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sp = trainer.sparsifier
            for t, m in zip(sp.targets, sp.method.hard_masks()):
                assert torch.all(t.param[~m] == 0), (t.name, state.global_step)
                # mask methods: the state was not zeroed at pruning; only the re-zeroing after each
                # step keeps pruned weights dead
                if method in ("gmp", "gradual") and granularity == "unstructured" and state.global_step > 15 \
                        and t.name == "fc1.weight":
                    assert any(torch.any(s[~m] != 0) for s in optimizer_states(trainer.optimizer, t.param))
            seen.append(sp.density())

    trainer.add_callback(Check())
    trainer.train()
    expected = 0.5 if granularity == "2:4" else 0.3
    assert len(seen) == 20 and seen[-1] == pytest.approx(expected, abs=0.02)


def test_dns_pruned_weights_keep_training(fmnist_small, tmp_path):
    from transformers import TrainerCallback

    trainer = make_trainer(fmnist_small, tmp_path, fast_sparsity("dns"), max_steps=20)
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (15, 19):  # after the last surgery (step 14), before finalize
                m = trainer.sparsifier.method
                snapshots[state.global_step] = (m.real.values[0].clone(), m.masks[0].clone(),
                                                trainer.sparsifier.targets[0].param.detach().clone())

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer.sparsifier.method.surgeries >= 2
    (dense_a, mask_a, seen_a), (dense_b, mask_b, seen_b) = snapshots[15], snapshots[19]
    pruned = ~mask_a
    assert torch.equal(mask_a, mask_b) and pruned.any()
    assert torch.all(seen_a[pruned] == 0) and torch.all(seen_b[pruned] == 0)  # the forward pass sees W*T ...
    assert torch.all(dense_a[pruned] != 0)  # ... while the dense W of the pruned weights keeps training
    assert torch.all(dense_a[pruned] != dense_b[pruned])
    assert trainer.sparsifier.density() == pytest.approx(0.3, abs=0.002)


def test_gradient_accumulation_clipping_and_bf16(fmnist_small, tmp_path):
    trainer = make_trainer(fmnist_small, tmp_path, fast_sparsity("gmp"), gradient_accumulation_steps=2,
                           max_grad_norm=0.5, bf16=True, max_steps=16)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.3
    out = trainer.predict(fmnist_small.eval.select(range(8)))
    assert out.predictions.shape == (8, 10)
    assert trainer.sparsifier.density() == pytest.approx(0.3, abs=0.002)


def test_logs_carry_density_and_method_state(fmnist_small, tmp_path):
    trainer = make_trainer(fmnist_small, tmp_path, fast_sparsity("dns"), max_steps=20, logging_steps=10)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and "sparsity/density" in logs[-1]
    assert "sparsity/density/fc1.weight" not in logs[-1]  # per-layer figures go to report_to backends only
    assert "sparsity/dns/spliced" in logs[-1]


@pytest.mark.parametrize(("method", "granularity"), method_granularities())
def test_resume_equals_uninterrupted(fmnist_small, tmp_path, method, granularity):
    """N steps straight == N/2, save, new trainer resumed from the checkpoint, N/2 more."""
    sparsity = fast_sparsity(method, granularity)
    straight = make_trainer(fmnist_small, tmp_path / "a", sparsity, max_steps=20)
    straight.train()

    first = make_trainer(fmnist_small, tmp_path / "b", sparsity, max_steps=20, save_strategy="steps", save_steps=10)
    first.train()  # also writes checkpoint-10
    resumed = make_trainer(fmnist_small, tmp_path / "b", sparsity, max_steps=20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))

    assert_trainers_equal(straight, resumed)


def test_resume_without_sparsity_state_is_refused(fmnist_small, tmp_path):
    plain = make_trainer(fmnist_small, tmp_path, None, max_steps=4, save_strategy="steps", save_steps=4)
    plain.train()
    sparse = make_trainer(fmnist_small, tmp_path, fast_sparsity("gmp"), max_steps=8)
    from hf_sparse.training.trainer import ResumeError

    with pytest.raises(ResumeError, match="sparsity_state.pt"):
        sparse.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
