"""Run under ``accelerate launch`` with 2 processes: train every method, record mask digests per step.

Each rank writes ``<out>/rank<r>.json``: {method: [digest after step 1, step 2, ...]}, plus the
final achieved density. tests/test_distributed.py compares the ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.data import load_data
from hf_sparse.methods import METHODS
from hf_sparse.recipe import DataConfig
from tests.helpers import fast_sparsity, make_trainer, mask_digest


class RecordMasks(TrainerCallback):
    def __init__(self, trainer, log: list):
        self.trainer, self.log = trainer, log

    def on_step_end(self, args, state, control, **kwargs):
        self.log.append(mask_digest(self.trainer.sparsifier.method.hard_masks()))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=640, max_eval_samples=64))
    record, rank = {}, 0
    for method in sorted(METHODS):
        trainer = make_trainer(data, out / method, fast_sparsity(method), max_steps=12,
                               per_device_train_batch_size=16, ddp_backend="gloo")
        digests: list[str] = []
        trainer.add_callback(RecordMasks(trainer, digests))
        trainer.train()
        rank = trainer.args.process_index
        record[method] = {"digests": digests, "density": trainer.sparsifier.density(),
                          "world_size": trainer.args.world_size}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
