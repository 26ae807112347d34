"""SparseTrainer under Accelerate's FSDP2 (``fsdp_version: 2``) on two CPU processes over gloo.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_trainer_worker.py OUT   (two ranks)
    python tests/fsdp_trainer_worker.py OUT                                              (the reference)

Each config trains ``STEPS`` steps with a checkpoint at ``RESUME_AT``; a fresh trainer then resumes
from that checkpoint to the end. After every step the whole hard masks are digested. The
reference process trains on the same global batches (one process, twice the per-device batch).
At the end the model is exported with ``save_sparse_model`` (every rank calls it). The configs are
LeNet-300-100 (hidden 32/16) and one timm ``resnet10t``.

Accelerate enables FSDP only on accelerator devices: on CPU it makes the run ``MULTI_CPU`` and
drops the FSDP plugin that Trainer built from ``fsdp_config``. So the worker's trainer puts that
plugin back into the accelerator state right after Trainer created it; from there on Trainer and
Accelerate run their own FSDP2 code (``fully_shard`` by Accelerate's wrap policy, the optimizer
parameter swap, sharded checkpoints through torch.distributed.checkpoint), as they would on GPUs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse.config.recipe import DataConfig  # noqa: E402
from hf_sparse.data import load_data  # noqa: E402
from hf_sparse.training.trainer import SparseTrainer  # noqa: E402
from tests.fsdp_worker import full_rows, method_state_bytes, whole_masks  # noqa: E402
from tests.helpers import BACKEND, fast_sparsity, freeze_heap, state_digest, tiny_args, tiny_lenet  # noqa: E402

STEPS, RESUME_AT, BATCH = 12, 6, 32  # BATCH: per rank
CONFIGS = {
    "gmp/unstructured": fast_sparsity("gmp"),
    "gradual/unstructured": fast_sparsity("gradual"),
    "dns/unstructured": fast_sparsity("dns"),
    "dns/global": {**fast_sparsity("dns"), "params": {**fast_sparsity("dns")["params"], "scope": "global"}},
    "l0/unstructured": fast_sparsity("l0"),
    # init 3x the step size (see tests/fsdp_worker.py); weight decay on: AutoPrune keeps it off W
    "autoprune/unstructured": {**fast_sparsity("autoprune"), "params": {"init": 0.03}},
    "l0/channel": fast_sparsity("l0", "channel"),
    "gmp/timm-resnet10t": fast_sparsity("gmp"),
    # checkpoints in Accelerate's sharded format (torch.distributed.checkpoint folders) instead of
    # its default full state dict
    "l0/unstructured+sharded-checkpoint": fast_sparsity("l0"),
}
#: Configs whose model has BatchNorm: each rank normalises its half of the batch (as under DDP), so
#: the run differs from one process on the whole batch; its ranks still agree with each other.
BATCHNORM = ("gmp/timm-resnet10t",)


def model_for(name: str) -> torch.nn.Module:
    if "timm-" not in name:
        return tiny_lenet()
    import timm

    from hf_sparse.models.build import TimmClassifier

    torch.manual_seed(0)
    return TimmClassifier(timm.create_model("resnet10t", num_classes=10, in_chans=1), "resnet10t")


class FSDPOnCPUTrainer(SparseTrainer):
    """SparseTrainer with the FSDP plugin that Accelerate drops on CPU put back (see the docstring)."""

    def _build_accelerator_args(self, **kwargs):
        self._fsdp_plugin = kwargs.get("fsdp_plugin")
        return super()._build_accelerator_args(**kwargs)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self._fsdp_plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
            # AcceleratorState re-reads distributed_type from PartialState whenever it is constructed
            PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = self._fsdp_plugin
            self.is_fsdp_enabled = True


class RecordMasks(TrainerCallback):
    def __init__(self, trainer: SparseTrainer, record: list):
        self.trainer, self.record = trainer, record

    def on_step_end(self, args, state, control, **kwargs):
        self.record.append(state_digest(whole_masks(self.trainer.sparsifier)))


def fsdp_args(out: Path, world: int, name: str = ""):
    config = {"fsdp_version": 2}
    if name.endswith("+sharded-checkpoint"):
        config["state_dict_type"] = "SHARDED_STATE_DICT"
    fsdp = {"fsdp": True, "fsdp_config": config, "ddp_backend": BACKEND} if world > 1 else {}
    decay = {"weight_decay": 0.1} if name.startswith("autoprune") else {}  # which must skip the targets
    return tiny_args(out, max_steps=STEPS, per_device_train_batch_size=BATCH * (2 // world), save_strategy="steps",
                     save_steps=RESUME_AT, logging_steps=RESUME_AT, **fsdp, **decay)


def trainer_for(name: str, out: Path, data, world: int) -> SparseTrainer:
    return FSDPOnCPUTrainer(model=model_for(name), args=fsdp_args(out, world, name), train_dataset=data.train,
                            data_collator=data.collator, sparsity=CONFIGS[name])


def cli_run(out: Path) -> dict:
    """``hf-sparse train``'s own run (``execute_run``: train, evaluate, export, results.json) of the
    quickstart recipe under FSDP2, with the trainer class above."""
    from hf_sparse.config.recipe import load_recipe
    from hf_sparse.training import run, trainer

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "data.max_train_samples=256", "data.max_eval_samples=64", "training.max_steps=8",
        "training.per_device_train_batch_size=16", "training.disable_tqdm=true", "training.use_cpu=true",
        f"training.ddp_backend={BACKEND}", "training.fsdp=true", "training.fsdp_config={fsdp_version: 2}",
        "sparsity.params.start_fraction=0.0", "sparsity.params.end_fraction=0.5"])
    plain, trainer.SparseTrainer = trainer.SparseTrainer, FSDPOnCPUTrainer
    try:
        results = run.execute_run(run.prepare_run(recipe, out))
    finally:
        trainer.SparseTrainer = plain
    return {"achieved_density": results["achieved_density"], "world_size": results["world_size"]}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=STEPS * BATCH * 2, max_eval_samples=8))
    freeze_heap()  # each Trainer.train() ends in a full gc.collect()
    record = {}
    if world > 1:  # first, a plain SparseTrainer: Accelerate drops FSDP on CPU, and the user is told
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SparseTrainer(model=tiny_lenet(), args=fsdp_args(out / "plain", world), train_dataset=data.train,
                          data_collator=data.collator, sparsity=CONFIGS["gmp/unstructured"])
        record["cpu_warning"] = [str(w.message) for w in caught if "FSDP was requested" in str(w.message)]
        group = FSDPOnCPUTrainer(model=tiny_lenet(), args=fsdp_args(out / "group", world), train_dataset=data.train,
                                 data_collator=data.collator, sparsity={**fast_sparsity("l0"), "granularity": "group"})
        try:  # refused once the model is sharded, before the first step
            group.train()
            record["group_error"] = None
        except ValueError as e:
            record["group_error"] = str(e)
    if world > 1:
        record["cli"] = cli_run(out / "cli")
    for name in CONFIGS:
        slug = name.replace("/", "-").replace("+", "-")
        run_dir = out / f"{'ref' if world == 1 else 'fsdp'}-{slug}"
        trainer = trainer_for(name, run_dir, data, world)
        masks: list[str] = []
        trainer.add_callback(RecordMasks(trainer, masks))
        trainer.train()
        sp = trainer.sparsifier
        entry = {"masks": masks, "density": sp.density(), "metrics": sp.method_metrics(),
                 "state": state_digest(sp.state_dict()), "state_file": sp.state_file(),
                 "weights": state_digest([full_rows(t.parameter, t.param.detach()) for t in sp.targets]),
                 "sharded": [type(t.parameter).__name__ for t in sp.targets],
                 "state_bytes": method_state_bytes(sp, trainer.optimizer)}
        resumed = trainer_for(name, run_dir, data, world)
        resumed_masks: list[str] = []
        resumed.add_callback(RecordMasks(resumed, resumed_masks))
        resumed.train(resume_from_checkpoint=str(run_dir / f"checkpoint-{RESUME_AT}"))
        entry["resumed_masks"] = resumed_masks
        entry["resumed_state"] = state_digest(resumed.sparsifier.state_dict())
        entry["resumed_weights"] = state_digest([full_rows(t.parameter, t.param.detach())
                                                 for t in resumed.sparsifier.targets])
        trainer.save_sparse_model(run_dir / "model")  # every rank: the shards are gathered
        record[name] = entry
    (out / f"{'ref' if world == 1 else f'rank{rank}'}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
