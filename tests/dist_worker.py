"""Run under ``accelerate launch`` with 2 processes: train a suite of sparsity configs and record,
after every step, a digest of the hard masks and one of the method's whole state (masks, scores,
gate logits, multipliers...).

    dist_worker.py methods OUT   every registered (method, granularity) pair (tests/test_distributed.py)
    dist_worker.py l0 OUT        the l0 configurations of tests/test_l0.py

Each rank writes ``OUT/rank<r>.json``: {config: {"masks": [...], "state": [...], "density", "world_size"}}.
The tests compare the two ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.config.recipe import DataConfig
from hf_sparse.data import load_data
from tests.helpers import BACKEND, fast_sparsity, make_trainer, method_granularities, state_digest


def suite(name: str) -> tuple[dict[str, dict], int]:
    """(config name -> sparsity section, steps to train)."""
    if name == "methods":
        return {f"{m}/{g}": fast_sparsity(m, g) for m, g in method_granularities()}, 12
    if name == "l0":
        from tests.test_l0 import TRAINER_CONFIGS

        return TRAINER_CONFIGS, 10
    raise SystemExit(f"unknown suite {name!r}")


class RecordState(TrainerCallback):
    def __init__(self, trainer, record: dict):
        self.trainer, self.record = trainer, record

    def on_step_end(self, args, state, control, **kwargs):
        method = self.trainer.sparsifier.method
        self.record["masks"].append(state_digest(method.hard_masks()))
        self.record["state"].append(state_digest(method.state_dict()))


def main(suite_name: str, out: Path) -> None:
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=640, max_eval_samples=64))
    configs, steps = suite(suite_name)
    record, rank = {}, 0
    for name, sparsity in sorted(configs.items()):
        trainer = make_trainer(data, out / name, sparsity, max_steps=steps, per_device_train_batch_size=16,
                               ddp_backend=BACKEND)
        record[name] = {"masks": [], "state": []}
        trainer.add_callback(RecordState(trainer, record[name]))
        trainer.train()
        rank = trainer.args.process_index
        record[name].update(density=trainer.sparsifier.density(), world_size=trainer.args.world_size)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
