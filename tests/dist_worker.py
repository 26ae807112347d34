"""Run under ``accelerate launch`` with 2 processes: every suite of two-rank checks in one launch
(tests/helpers.two_rank_records starts it once per test session).

    dist_worker.py OUT SUITE...

``methods``  every registered (method, granularity) pair (tests/test_distributed.py): a digest of the
             hard masks and one of the method's whole state (masks, scores, gate logits, multipliers...)
             after every step.
``l0``       the l0 configurations of tests/test_l0.py, recorded the same way.
``distill``  a distilled run (teacher ``self``, gmp), uninterrupted and resumed from its step-6
             checkpoint; digests of the weights and masks after every step (tests/test_distillation.py).

Each rank writes ``OUT/rank<r>.json``: {suite: what that suite recorded}. The tests compare the ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse import SparseTrainer
from hf_sparse.config.recipe import DataConfig
from hf_sparse.data import load_data
from tests.helpers import (
    BACKEND,
    fast_sparsity,
    freeze_heap,
    make_trainer,
    method_granularities,
    state_digest,
    tiny_args,
    tiny_lenet,
)

DISTILL_STEPS = 12
DISTILLATION = {"alpha": 0.7, "temperature": 3.0, "hidden": {"fc2": "fc2"}}


class Record(TrainerCallback):
    """After every step, append ``digest(trainer)`` to ``record``."""

    def __init__(self, trainer: SparseTrainer, record: list, digest):
        self.trainer, self.record, self.digest = trainer, record, digest

    def on_step_end(self, args, state, control, **kwargs):
        self.record.append(self.digest(self.trainer))


def _masks(trainer: SparseTrainer) -> str:
    return state_digest(trainer.sparsifier.method.hard_masks())


def _method_state(trainer: SparseTrainer) -> str:
    return state_digest(trainer.sparsifier.method.state_dict())


def _weights_and_masks(trainer: SparseTrainer) -> str:
    return state_digest({"model": trainer.model.state_dict(), "masks": trainer.sparsifier.method.hard_masks()})


def step_records(data, out: Path, configs: dict[str, dict], steps: int) -> dict[str, dict]:
    """Train each config; {config: {"masks": [...], "state": [...], "density", "world_size"}}."""
    records = {}
    for name, sparsity in sorted(configs.items()):
        trainer = make_trainer(data, out / name, sparsity, max_steps=steps, per_device_train_batch_size=16,
                               ddp_backend=BACKEND)
        records[name] = {"masks": [], "state": []}
        trainer.add_callback(Record(trainer, records[name]["masks"], _masks))
        trainer.add_callback(Record(trainer, records[name]["state"], _method_state))
        trainer.train()
        records[name].update(density=trainer.sparsifier.density(), world_size=trainer.args.world_size)
    return records


def distilled(data, out: Path, **overrides) -> SparseTrainer:
    args = tiny_args(out, max_steps=DISTILL_STEPS, per_device_train_batch_size=16, ddp_backend=BACKEND, **overrides)
    return SparseTrainer(model=tiny_lenet(), args=args, train_dataset=data.train, eval_dataset=data.eval,
                         data_collator=data.collator, sparsity=fast_sparsity("gmp"), teacher="self",
                         distillation=DISTILLATION)


def distill_records(data, out: Path) -> dict:
    straight, resumed = [], []
    a = distilled(data, out, save_strategy="steps", save_steps=6)
    a.add_callback(Record(a, straight, _weights_and_masks))
    a.train()
    b = distilled(data, out)
    b.add_callback(Record(b, resumed, _weights_and_masks))
    b.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    return {"straight": straight, "resumed": resumed, "world_size": a.args.world_size,
            "teacher_digest": state_digest(a.distiller.teacher.state_dict()),
            "soft": float(a.distiller.last["soft"]), "density": a.sparsifier.density()}


def run_suite(name: str, data, out: Path):
    if name == "methods":
        return step_records(data, out, {f"{m}/{g}": fast_sparsity(m, g) for m, g in method_granularities()}, 12)
    if name == "l0":
        from tests.test_l0 import TRAINER_CONFIGS

        return step_records(data, out, TRAINER_CONFIGS, 10)
    if name == "distill":
        return distill_records(data, out)
    raise SystemExit(f"unknown suite {name!r}")


def main(out: Path, suites: list[str]) -> None:
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=640, max_eval_samples=64))
    freeze_heap()  # each Trainer.train() ends in a full gc.collect()
    record = {name: run_suite(name, data, out / name) for name in suites}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
