"""FSDP2 (``fully_shard``) on CPU over gloo against one process, with a plain training loop.

    python tests/fsdp_worker.py OUT [CONFIG ...]

Trains each sparsity config for ``STEPS`` optimizer steps on the same batches and seed twice: in
this process without sharding (``OUT/ref.json``), then in two processes whose LeNet layers are
``fully_shard``-ed, each rank taking half of every batch (``OUT/rank<r>.json``). After every step
the *whole* hard masks are digested (each rank gathers the other's rows). Each FSDP2 config also
runs interrupted: ``RESUME_AT`` steps, the model, optimizer and method state saved per rank, a
fresh model/optimizer/Sparsifier loaded from them, the rest of the steps. Finally the model is
exported from the full state dict on rank 0 (``OUT/export-<config>``; one process writes
``OUT/ref-export-<config>``). Accelerate's Trainer cannot run FSDP on CPU (it enables FSDP only
for accelerator devices), so this drives the same method code that SparseTrainer drives.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse.checkpoint.save_and_load import save_sparse_checkpoint  # noqa: E402
from hf_sparse.config.recipe import DataConfig, SparsityConfig  # noqa: E402
from hf_sparse.grids import shards as sharding  # noqa: E402
from hf_sparse.training.fsdp2 import full_state_dict, model_has_dtensor  # noqa: E402
from hf_sparse.training.sparsifier import Sparsifier  # noqa: E402
from tests.helpers import fast_sparsity, state_digest, tiny_lenet  # noqa: E402

STEPS, RESUME_AT, BATCH = 16, 8, 32
CONFIGS = {
    "gmp/unstructured": fast_sparsity("gmp"),
    "gmp/global": {**fast_sparsity("gmp"), "params": {**fast_sparsity("gmp")["params"], "scope": "global"}},
    "gmp/channel": fast_sparsity("gmp", "channel"),
    "gradual/unstructured": fast_sparsity("gradual"),
    "gradual/paper": {"method": "gradual", "params": {"start_itr": 2, "ramp_itr": 6, "end_itr": 14, "freq": 3}},
    "dns/unstructured": fast_sparsity("dns"),
    "dns/paper": {"method": "dns", "params": {"start_iter": 2, "iter_stop": 14, "gamma": 0.01, "c": 0.5}},
    "dns/channel": fast_sparsity("dns", "channel"),
    "autoprune/unstructured": fast_sparsity("autoprune"),
    # init 3x the step size: with init == lr, Adam's first step lands M on 0 +- rounding, which the
    # data-parallel gradient average rounds differently from one process
    "autoprune/channel": {**fast_sparsity("autoprune", "channel"), "params": {"init": 0.03}},
    "l0/unstructured": fast_sparsity("l0"),
    "l0/channel": fast_sparsity("l0", "channel"),
}
EXPORTED = ("gmp/unstructured", "l0/channel")


def batches() -> list[dict[str, torch.Tensor]]:
    from hf_sparse.data import load_data

    data = load_data(DataConfig(name="fashion_mnist", max_train_samples=STEPS * BATCH, max_eval_samples=8))
    return [data.collator([data.train[i] for i in range(s * BATCH, (s + 1) * BATCH)]) for s in range(STEPS)]


def build(sparsity: dict, world: int):
    model = tiny_lenet()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module)
        fully_shard(model)
    sp = Sparsifier(model, SparsityConfig(**sparsity), seed=0)  # targets resolved by name after wrapping
    sp.setup(STEPS)
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": 0.0}, *sp.param_groups(1e-2)],
                            lr=1e-2)
    return model, sp, opt


def full_rows(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The whole tensor from each rank's dim-0 rows of it (``x`` is this rank's part)."""
    if not sharding.is_sharded(param):
        return x
    world = dist.get_world_size()
    rows = sharding.chunk_rows(param.shape[0], world)
    buf = x.new_zeros((max(rows), *x.shape[1:]), dtype=torch.uint8 if x.dtype == torch.bool else x.dtype)
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]).to(x.dtype)


def whole_masks(sp: Sparsifier) -> list[torch.Tensor]:
    return [full_rows(t.parameter, m) for t, m in zip(sp.targets, sp.method.hard_masks())]


def train(model, sp, opt, data, steps: range, rank: int, world: int, record: list | None = None) -> None:
    for step in steps:
        batch = {k: v.chunk(world)[rank] for k, v in data[step].items()}
        sp.before_forward(step)
        model(**batch).loss.backward()
        sp.after_backward(step)
        opt.step()
        sp.after_step(step, opt)
        opt.zero_grad()
        if record is not None:
            record.append(state_digest(whole_masks(sp)))


def tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def method_state_bytes(sp: Sparsifier, opt) -> int:
    """Bytes of the method's state plus the optimizer state of its own tensors (gate logits)."""
    own = [p for g in sp.param_groups(1e-2) for p in g["params"]]
    return tensor_bytes(sp.method.state_dict()) + sum(tensor_bytes(opt.state.get(p, {})) for p in own)


def _to_local(x):
    return sharding.local(x).clone() if isinstance(x, torch.Tensor) else x


def save_all(folder: Path, model, sp, opt) -> None:
    """Each rank's shards: model parameters, optimizer state and the method state."""
    folder.mkdir(parents=True, exist_ok=True)
    opt_state = opt.state_dict()
    opt_state["state"] = {i: {k: _to_local(v) for k, v in s.items()} for i, s in opt_state["state"].items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"model": {n: _to_local(p.detach()) for n, p in model.named_parameters()}, "optimizer": opt_state},
               folder / f"train-rank{rank}.pt")
    torch.save(sp.state_dict(), folder / sp.state_file())


def load_all(folder: Path, model, sp, opt) -> None:
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    saved = torch.load(folder / f"train-rank{rank}.pt", weights_only=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            sharding.local(p).copy_(saved["model"][n])
    params = [p for g in opt.param_groups for p in g["params"]]
    state = saved["optimizer"]
    for i, s in state["state"].items():
        p = params[int(i)]
        if sharding.is_sharded(p):
            s.update({k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False)
                      for k, v in s.items() if k != "step"})
    opt.load_state_dict(state)
    sp.load_state_dict(torch.load(folder / sp.state_file(), weights_only=True))


def export(model, sp, folder: Path, rank: int) -> None:
    sp.finalize()
    report = sp.report(model).to_dict()
    full = full_state_dict(model) if model_has_dtensor(model) else model.state_dict()
    if rank == 0:
        plain = tiny_lenet()
        plain.load_state_dict(full)
        save_sparse_checkpoint(plain, folder, report=report)


def run(rank: int, world: int, out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    data = batches()
    record = {}
    tag = "ref" if world == 1 else f"rank{rank}"
    for name in names:
        model, sp, opt = build(CONFIGS[name], world)
        masks: list[str] = []
        train(model, sp, opt, data, range(STEPS), rank, world, masks)
        entry = {"masks": masks, "state_bytes": method_state_bytes(sp, opt),
                 "state": state_digest(sp.state_dict()),
                 "weights": state_digest([full_rows(t.parameter, t.param.detach()) for t in sp.targets]),
                 "density": sp.density(), "metrics": sp.method_metrics()}
        if world > 1:  # interrupted at RESUME_AT, resumed in a fresh model, optimizer and Sparsifier
            folder = out / "ckpt" / name.replace("/", "-")
            m2, sp2, opt2 = build(CONFIGS[name], world)
            train(m2, sp2, opt2, data, range(RESUME_AT), rank, world)
            save_all(folder, m2, sp2, opt2)
            dist.barrier()
            m3, sp3, opt3 = build(CONFIGS[name], world)
            load_all(folder, m3, sp3, opt3)
            resumed: list[str] = []
            train(m3, sp3, opt3, data, range(RESUME_AT, STEPS), rank, world, resumed)
            entry["resumed_masks"] = resumed
            entry["resumed_state"] = state_digest(sp3.state_dict())
            entry["resumed_weights"] = state_digest([full_rows(t.parameter, t.param.detach()) for t in sp3.targets])
            entry["state_file"] = sp3.state_file()
        if name in EXPORTED:
            export(model, sp, out / f"{'ref-' if world == 1 else ''}export-{name.replace('/', '-')}", rank)
        record[name] = entry
    (out / f"{tag}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(CONFIGS)
    out.mkdir(parents=True, exist_ok=True)
    run(0, 1, out, names)
    os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(29400 + os.getpid() % 500)
    # forked, not spawned: the ranks start from this process's imports (two fresh interpreters
    # importing torch and hf_sparse cost more CPU than the training); no process group exists yet
    mp.start_processes(run, args=(2, out, names), nprocs=2, start_method="fork")
