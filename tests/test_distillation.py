"""Distillation: Hinton's loss exactly, a frozen teacher that never reaches a checkpoint, gradient
accumulation, exact resume, two processes, CTC frames, recipe errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_sparse import SparseTrainer
from hf_sparse.config.recipe import DistillationConfig
from hf_sparse.training.distill import frame_mask, soft_target_loss
from tests.helpers import assert_trainers_equal, fast_sparsity, tiny_args, tiny_lenet


def distilled(data, out, sparsity=None, teacher="self", distillation=None, model=None, **args) -> SparseTrainer:
    return SparseTrainer(model=model or tiny_lenet(), args=tiny_args(out, **args), train_dataset=data.train,
                         eval_dataset=data.eval, data_collator=data.collator, compute_metrics=data.compute_metrics,
                         sparsity=sparsity, teacher=teacher, distillation=distillation)


def test_soft_target_loss_is_hintons_kl():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_t = F.softmax(t / T, -1)
    expected = T ** 2 * (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(soft_target_loss(s, t, T), expected)
    torch.testing.assert_close(soft_target_loss(s, t, T), T ** 2 * F.kl_div(F.log_softmax(s / T, -1), p_t,
                                                                          reduction="batchmean"))
    assert soft_target_loss(t, t, T) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(soft_target_loss(s, t, T, "mse"), F.mse_loss(s, t))


def test_training_loss_combines_task_and_soft_term(fmnist_small, tmp_path):
    """The loss Trainer backpropagates is (1-a)*CE + a*T^2*KL(teacher || student), teacher a second model."""
    teacher = tiny_lenet(seed=1)
    trainer = distilled(fmnist_small, tmp_path, teacher=teacher, distillation={"alpha": 0.3, "temperature": 2.0})
    batch = fmnist_small.collator([fmnist_small.train[i] for i in range(8)])
    student = trainer.model.train()
    loss = trainer.compute_loss(student, dict(batch))
    out = student(**batch)
    with torch.no_grad():
        t_logits = teacher(pixel_values=batch["pixel_values"]).logits
    expected = 0.7 * F.cross_entropy(out.logits, batch["labels"]) + 0.3 * soft_target_loss(out.logits, t_logits, 2.0)
    torch.testing.assert_close(loss, expected)
    assert trainer.distiller.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
    student.eval()  # evaluation reports the task loss alone
    torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), F.cross_entropy(out.logits, batch["labels"]))


def test_hidden_terms_add_the_mse_of_the_paired_modules(fmnist_small, tmp_path):
    teacher = tiny_lenet(seed=1)
    trainer = distilled(fmnist_small, tmp_path, teacher=teacher,
                        distillation={"alpha": 0.0, "hidden": {"fc1": "fc1", "fc2": "fc2"}, "hidden_weight": 0.5})
    batch = fmnist_small.collator([fmnist_small.train[i] for i in range(8)])
    student = trainer.model.train()
    loss = trainer.compute_loss(student, dict(batch))
    x = batch["pixel_values"].flatten(1)
    with torch.no_grad():
        s1, t1 = student.fc1(x), teacher.fc1(x)  # the modules' outputs (before the ReLU)
        s2, t2 = student.fc2(torch.relu(s1)), teacher.fc2(torch.relu(t1))
        mse = F.mse_loss(s1, t1) + F.mse_loss(s2, t2)
        task = student(**batch).loss
    torch.testing.assert_close(loss.detach(), task + 0.5 * mse)


def test_teacher_self_is_frozen_and_never_saved(fmnist_small, tmp_path):
    model = tiny_lenet()
    start = copy.deepcopy(model.state_dict())
    trainer = distilled(fmnist_small, tmp_path, sparsity=fast_sparsity("gmp"), model=model, max_steps=20,
                        save_strategy="steps", save_steps=10, optim="adamw_torch", weight_decay=0.1)
    trainer.train()
    teacher = trainer.distiller.teacher
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, start[name]), name  # the weights the run started from, untouched
    assert not torch.equal(trainer.model.fc1.weight, start["fc1.weight"])
    ckpt = tmp_path / "checkpoint-20"
    assert set(load_file(ckpt / "model.safetensors")) == set(trainer.model.state_dict())
    assert json.loads((ckpt / "distillation.json").read_text())["teacher"] == "self"
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.save_sparse_model(tmp_path / "model")
    assert set(load_file(tmp_path / "model" / "model.safetensors")) == set(trainer.model.state_dict())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "distillation/soft" in logs[-1] and logs[-1]["distillation/soft"] > 0


def test_gradient_accumulation_matches_the_full_batch(fmnist_small, tmp_path):
    """Two micro-batches of 16 accumulate to the gradient of one batch of 32 (task and soft terms)."""
    runs = []
    for name, batch, steps in (("full", 32, 1), ("accumulated", 16, 2)):
        t = distilled(fmnist_small, tmp_path / name, teacher=tiny_lenet(seed=1), max_steps=1, optim="sgd",
                      per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                      distillation={"alpha": 0.6, "temperature": 2.0})
        t.train()
        runs.append(t.model)
    for (n, a), b in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("method", ["gmp", "l0"])
def test_distilled_run_resumes_exactly(fmnist_small, tmp_path, method):
    sparsity = fast_sparsity(method)
    kw = dict(sparsity=sparsity, distillation={"alpha": 0.5, "hidden": {"fc2": "fc2"}}, max_steps=20)
    straight = distilled(fmnist_small, tmp_path / "a", **kw)
    straight.train()
    first = distilled(fmnist_small, tmp_path / "b", save_strategy="steps", save_steps=10, **kw)
    first.train()
    resumed = distilled(fmnist_small, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))
    assert_trainers_equal(straight, resumed)


def test_ctc_kl_is_per_valid_frame():
    from hf_sparse.models.speech_rnn import SpeechRNNConfig, SpeechRNNForCTC

    torch.manual_seed(0)
    cfg = SpeechRNNConfig(num_mel_bins=8, hidden_size=6, num_layers=1, conv_channels=[], dropout=0.0, vocab_size=5)
    student, teacher = SpeechRNNForCTC(cfg).eval(), SpeechRNNForCTC(cfg).eval()
    feats = torch.randn(2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 4:] = 0  # the second utterance has 4 real frames
    out = student(input_features=feats, attention_mask=mask)
    t_logits = teacher(input_features=feats, attention_mask=mask).logits
    valid = frame_mask(out, {"attention_mask": mask}, out.logits, student)
    assert valid.sum() == 13 and not valid[1, 4:].any()
    loss = soft_target_loss(out.logits, t_logits, 2.0, mask=valid)
    per_frame = [soft_target_loss(out.logits[i, :n], t_logits[i, :n], 2.0) * n for i, n in ((0, 9), (1, 4))]
    torch.testing.assert_close(loss, sum(per_frame) / 13)
    garbage = out.logits.clone()
    garbage[1, 4:] = 100.0  # padded frames do not count
    torch.testing.assert_close(soft_target_loss(garbage, t_logits, 2.0, mask=valid), loss)


def test_recipe_section_and_its_errors(tmp_path):
    from hf_sparse.config.recipe import RecipeError, recipe_from_text
    from hf_sparse.training.run import prepare_run

    text = "model: {name: lenet300_100}\ndata: {max_train_samples: 64, max_eval_samples: 32}\n" \
           "training: {max_steps: 2}\nsparsity: {method: gmp, target_density: 0.5}\n"
    ok = recipe_from_text(text + "distillation: {alpha: 0.2}\n", "r.yaml")
    assert ok.distillation == DistillationConfig(teacher="self", alpha=0.2)
    assert prepare_run(ok, tmp_path / "ok").teacher is None  # self: copied by the trainer
    with pytest.raises(RecipeError, match=r"r.yaml:5:\d+: distillation.alpha: .*less than or equal to 1"):
        recipe_from_text(text + "distillation: {alpha: 1.5}\n", "r.yaml")
    bad = recipe_from_text(text + f"distillation: {{teacher: {tmp_path / 'none'}}}\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml:5:\d+: distillation.teacher: cannot load the teacher"):
        prepare_run(bad, tmp_path / "bad")
    hidden = recipe_from_text(text + "distillation: {hidden: {fc9: fc1}}\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"distillation.hidden.fc9: the student has no module 'fc9'"):
        prepare_run(hidden, tmp_path / "hidden")
    shapes = recipe_from_text(text + "distillation: {hidden: {fc1: fc2}}\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"distillation.hidden.fc1: the student's 'fc1' outputs shape \(2, 300\)"):
        prepare_run(shapes, tmp_path / "shapes")


def test_cli_run_with_a_saved_teacher(tmp_path):
    """A finished run directory is a teacher; results.json says the run distilled and from what."""
    from hf_sparse.config.recipe import recipe_from_text
    from hf_sparse.training.run import execute_run, prepare_run

    base = "model: {name: lenet300_100, config: {hidden_sizes: [32, 16]}}\n" \
           "data: {max_train_samples: 256, max_eval_samples: 64}\ntraining: {max_steps: 4, use_cpu: true}\n"
    execute_run(prepare_run(recipe_from_text(base, "dense.yaml"), tmp_path / "dense"))
    wrong = recipe_from_text(base.replace("[32, 16]", "[32, 8]") + f"distillation: {{teacher: {tmp_path / 'dense'}}}\n"
                             "sparsity: {method: gmp, target_density: 0.5}\n", "s.yaml")
    run = prepare_run(recipe_from_text(base + "sparsity: {method: gmp, target_density: 0.5}\n"
                                       f"distillation: {{teacher: {tmp_path / 'dense'}, alpha: 0.9}}\n", "s.yaml"),
                      tmp_path / "sparse")
    results = execute_run(run)
    assert results["distillation"]["teacher"] == str(tmp_path / "dense") and results["distillation"]["alpha"] == 0.9
    assert json.loads((tmp_path / "sparse" / "results.json").read_text())["distillation"]["alpha"] == 0.9
    assert prepare_run(wrong, tmp_path / "wrong").teacher is not None  # same logits shape: hidden sizes may differ


# -- starting from a pretrained model: gates and masks from the weights ------------------------------
def _top_half(w: torch.Tensor, density: float) -> torch.Tensor:
    k = round(density * w.numel())
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[w.abs().flatten().argsort(descending=True, stable=True)[:k]] = True
    return keep.view_as(w)


def test_l0_magnitude_init_opens_the_largest_weights():
    from hf_sparse import Sparsifier, SparsityConfig
    from hf_sparse.methods import hard_concrete as hc

    model = tiny_lenet()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = Sparsifier(model, SparsityConfig(method="l0", target_density=0.1, params={"init": "magnitude",
                                                                                  "init_drop_rate": 0.4}))
    for g, t in zip(sp.method.gates, sp.targets):
        keep = _top_half(dense[t.name], 0.6)
        assert torch.equal(hc.deterministic(g.log_alpha.detach()) == 1, keep)
        assert torch.equal(hc.deterministic(g.log_alpha.detach()) == 0, ~keep)
        assert torch.equal(t.param.detach(), dense[t.name] * keep)  # eval_on_start sees the one-shot model
    probs = torch.cat([hc.prob_nonzero(g.log_alpha.detach()).flatten() for g in sp.method.gates])
    assert float(probs.mean()) == pytest.approx(0.6 * 0.990 + 0.4 * 0.198, abs=0.01)
    constant = Sparsifier(tiny_lenet(), SparsityConfig(method="l0", target_density=0.1))
    assert torch.equal(constant.targets[0].param, dense[constant.targets[0].name])  # today's init: unchanged


def test_autoprune_magnitude_init_orders_m_like_the_weights():
    from hf_sparse import Sparsifier, SparsityConfig

    model = tiny_lenet()
    w = model.fc1.weight.detach().clone()
    sp = Sparsifier(model, SparsityConfig(method="autoprune", target_density=0.1,
                                          params={"init": "magnitude", "init_scale": 0.02}))
    m = sp.method.M[0].detach()
    assert (m > 0).all() and sp.density() == 1.0  # all kept: AutoPrune starts dense
    assert torch.equal(m.flatten().argsort(stable=True), w.abs().flatten().argsort(stable=True))
    assert float(m.mean()) == pytest.approx(0.02, rel=1e-3)


@pytest.mark.parametrize("method", ["gmp", "gradual", "dns"])
def test_initial_sparsity_prunes_once_before_step_zero(fmnist_small, tmp_path, method):
    from hf_sparse import Sparsifier, SparsityConfig
    from hf_sparse.config.recipe import RecipeError, recipe_from_text

    model = tiny_lenet()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = Sparsifier(model, SparsityConfig(method=method, target_density=0.2, params={"initial_sparsity": 0.5}))
    for t in sp.targets:
        assert torch.equal(t.param.detach(), dense[t.name] * _top_half(dense[t.name], 0.5)), t.name
    if method == "dns":  # the dense W keeps training under the mask
        assert torch.equal(sp.method.real.values[0], dense[sp.targets[0].name])
    sparsity = {**fast_sparsity(method), "params": {**fast_sparsity(method)["params"], "initial_sparsity": 0.5}}
    trainer = distilled(fmnist_small, tmp_path, sparsity=sparsity, max_steps=20)
    trainer.train()
    assert trainer.sparsifier.density() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(RecipeError, match="sparsity.params.initial_sparsity: 0.9 prunes more than the target"):
        recipe_from_text(f"model: {{name: lenet300_100}}\nsparsity: {{method: {method}, target_density: 0.2, "
                         "params: {initial_sparsity: 0.9}}\n", "r.yaml")


# -- hf-sparse compare --set: with and without distillation in one grid -------------------------------
def test_compare_set_variants_plan(tmp_path):
    from hf_sparse.compare.grid import plan_grid
    from hf_sparse.config.recipe import RecipeError
    from tests.test_compare import tiny_family

    paths = tiny_family(tmp_path / "recipes")
    grid = plan_grid([paths["dense"], paths["gmp"]], [0.5], [0], tmp_path / "out",
                     sets=["training.learning_rate=0.002", "distillation.alpha=0.3",
                           "kd:distillation.teacher=self", "kd:distillation.temperature=2"])
    by_label = {r.label: r for r in grid}
    assert list(by_label) == ["dense", "gmp", "gmp+kd"]
    assert by_label["dense"].overrides() == ["training.learning_rate=0.002", "training.seed=0"]
    assert by_label["gmp+kd"].overrides() == ["training.learning_rate=0.002", "distillation.alpha=0.3",
                                              "distillation.teacher=self", "distillation.temperature=2",
                                              "sparsity.target_density=0.5", "training.seed=0"]
    assert by_label["gmp+kd"].run_dir == tmp_path / "out" / "gmp+kd" / "d0.5" / "s0"
    with pytest.raises(RecipeError, match="distillation.alpha"):
        plan_grid([paths["dense"], paths["gmp"]], [0.5], [0], tmp_path / "out", sets=["kd:distillation.alpha=2"])
    with pytest.raises(RecipeError, match="--set variant name 'dense'"):
        plan_grid([paths["dense"], paths["gmp"]], [0.5], [0], tmp_path / "out", sets=["dense:training.seed=1"])


@pytest.mark.slow  # trains three runs in subprocesses: about a minute
def test_compare_grid_says_which_runs_distilled(tmp_path):
    import subprocess
    import sys

    from tests.helpers import launch_env
    from tests.test_compare import tiny_family

    paths = tiny_family(tmp_path / "recipes")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hf_sparse", "compare", str(paths["gmp"]), "--density", "0.5",
                           "--seeds", "0", "--set", "distill:distillation.teacher=self", "--out", str(out)],
                          capture_output=True, text=True, env=launch_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dense" not in json.loads((out / "dense" / "s0" / "results.json").read_text()).get("distillation", {})
    assert json.loads((out / "gmp+distill" / "d0.5" / "s0" / "results.json").read_text())["distillation"][
        "teacher"] == "self"
    md = (out / "summary.md").read_text()
    assert "| gmp+distill |" in md and "| gmp |" in md
    assert "Distilled: gmp+distill (teacher self, alpha 0.5, T 2.0, kl). Without distillation: gmp." in md
    assert "--set distill:distillation.teacher=self" in (out / "README.md").read_text()
