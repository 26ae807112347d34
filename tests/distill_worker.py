"""Run under ``accelerate launch`` with 2 processes: a distilled run (teacher ``self``, gmp), uninterrupted
and resumed from its step-6 checkpoint; record digests of the weights and masks after every step.

    distill_worker.py distill OUT

Each rank writes ``OUT/rank<r>.json``; tests/test_distillation.py compares the ranks and the two runs.
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
from tests.helpers import BACKEND, fast_sparsity, state_digest, tiny_args, tiny_lenet

STEPS = 12
DISTILLATION = {"alpha": 0.7, "temperature": 3.0, "hidden": {"fc2": "fc2"}}


class Record(TrainerCallback):
    def __init__(self, trainer: SparseTrainer, record: list):
        self.trainer, self.record = trainer, record

    def on_step_end(self, args, state, control, **kwargs):
        self.record.append(state_digest({"model": self.trainer.model.state_dict(),
                                         "masks": self.trainer.sparsifier.method.hard_masks()}))


def trainer(data, out: Path, **overrides) -> SparseTrainer:
    args = tiny_args(out, max_steps=STEPS, per_device_train_batch_size=16, ddp_backend=BACKEND, **overrides)
    return SparseTrainer(model=tiny_lenet(), args=args, train_dataset=data.train, eval_dataset=data.eval,
                         data_collator=data.collator, sparsity=fast_sparsity("gmp"), teacher="self",
                         distillation=DISTILLATION)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=640, max_eval_samples=64))
    straight, resumed = [], []
    a = trainer(data, out / "a", save_strategy="steps", save_steps=6)
    a.add_callback(Record(a, straight))
    a.train()
    b = trainer(data, out / "a")
    b.add_callback(Record(b, resumed))
    b.train(resume_from_checkpoint=str(out / "a" / "checkpoint-6"))
    record = {"straight": straight, "resumed": resumed, "world_size": a.args.world_size,
              "teacher_digest": state_digest(a.distiller.teacher.state_dict()),
              "soft": float(a.distiller.last["soft"]), "density": a.sparsifier.density()}
    (out / f"rank{a.args.process_index}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[2]))
