"""Run under ``accelerate launch`` with 2 processes: train l0 configurations and record, after every
step, digests of the gate logits and hard masks. tests/test_l0.py compares the ranks."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.data import load_data
from hf_sparse.recipe import DataConfig
from tests.helpers import make_trainer, mask_digest
from tests.test_l0 import TRAINER_CONFIGS


def gate_digest(method) -> str:
    h = hashlib.sha256()
    for g in method.groups:
        h.update(g.log_alpha.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class RecordGates(TrainerCallback):
    def __init__(self, trainer, record: dict):
        self.trainer, self.record = trainer, record

    def on_step_end(self, args, state, control, **kwargs):
        method = self.trainer.sparsifier.method
        self.record["gates"].append(gate_digest(method))
        self.record["masks"].append(mask_digest(method.hard_masks()))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=640, max_eval_samples=64))
    record, rank = {}, 0
    for name, sparsity in sorted(TRAINER_CONFIGS.items()):
        trainer = make_trainer(data, out / name, sparsity, max_steps=10, per_device_train_batch_size=16,
                               ddp_backend="gloo")
        record[name] = {"gates": [], "masks": []}
        trainer.add_callback(RecordGates(trainer, record[name]))
        trainer.train()
        rank = trainer.args.process_index
        record[name]["world_size"] = trainer.args.world_size
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
