"""Small builders the tests share (imported as ``tests.helpers``)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from hf_sparse import SparseTrainer
from hf_sparse.models.lenet import LeNetConfig, LeNetForImageClassification

REPO = Path(__file__).resolve().parents[1]

#: ``HF_SPARSE_TEST_DEVICE=cuda`` runs the trainer and multi-process tests on GPUs (nccl), as
#: bench/gpu_check.sh does; by default they run on CPU over gloo.
ON_CUDA = os.environ.get("HF_SPARSE_TEST_DEVICE", "cpu") == "cuda"
BACKEND = "nccl" if ON_CUDA else "gloo"


def launch_env() -> dict[str, str]:
    """Environment of a test's subprocess: the repository importable, one intra-op thread, no GPU
    unless the tests were asked to use one."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if not ON_CUDA:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class ForkedCLI:
    """``hf-sparse ARGS`` in a child forked from the test process: a process of its own, killed,
    interrupted or limited like any other, without the ~5 s a fresh interpreter spends importing
    torch and transformers (most of what a short CLI run costs). Tests of what a *fresh* interpreter
    does (the entry point, imports at startup, settings read at import) start ``python -m
    hf_sparse`` instead.

    The child runs :func:`hf_sparse.cli.main` in ``cwd`` with ``before`` called first (resource
    limits, signal dispositions) and its stdout/stderr in files; it leaves with ``os._exit`` so
    nothing of the test process (fixtures, atexit handlers) runs twice. Popen's methods that the
    tests use: ``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``returncode``.
    """

    def __init__(self, args: Sequence[str], cwd: Path = REPO, before: Callable[[], None] | None = None):
        from hf_sparse.cli import main

        self._dir = Path(tempfile.mkdtemp(prefix="forked-cli-"))
        self._out, self._err = self._dir / "stdout", self._dir / "stderr"
        self.returncode: int | None = None
        self._said: tuple[str, str] | None = None  # (stdout, stderr), once read
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.pid = os.fork()
        if self.pid:
            return
        code = 1
        try:  # the child: never returns into the test
            for fd, path in ((1, self._out), (2, self._err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child's whole life)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.chdir(cwd)
            if before is not None:
                before()
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code if isinstance(code, int) else 1)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked hf-sparse {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the child, then its stdout and stderr (read once; the files are then removed)."""
        self.wait(timeout)
        if self._said is None:
            self._said = self._out.read_text(errors="replace"), self._err.read_text(errors="replace")
            for path in (self._out, self._err):
                path.unlink(missing_ok=True)
            self._dir.rmdir()
        return self._said


def tiny_lenet(seed: int = 0, hidden=(32, 16)) -> LeNetForImageClassification:
    torch.manual_seed(seed)
    return LeNetForImageClassification(LeNetConfig(variant="300-100", hidden_sizes=list(hidden)))


def freeze_heap() -> None:
    """Collect the cycles left so far, then move every live object out of the collector's sight.

    ``Trainer.train()`` ends in Accelerate's ``free_memory()``, a full ``gc.collect()``; over the
    ~500k objects torch, transformers and timm create that costs 0.3-0.8 s per call, more than a
    20-step test run itself. Frozen objects are still freed by reference counting; only cycles among
    them wait for the next ``freeze_heap()``.
    """
    gc.collect()
    gc.freeze()


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(output_dir), max_steps=20, per_device_train_batch_size=32, learning_rate=1e-2,
                  report_to="none", save_strategy="no", logging_steps=5, seed=0, disable_tqdm=True,
                  use_cpu=not ON_CUDA, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


#: A sparsity config per method that prunes within 20 steps (unknown methods get defaults).
FAST_SPARSITY = {
    "gmp": {"method": "gmp", "target_density": 0.3, "params": {"start_step": 2, "end_step": 14, "frequency": 3}},
    "gradual": {"method": "gradual", "target_density": 0.3,
                "params": {"start_itr": 2, "ramp_itr": 6, "end_itr": 14, "freq": 3}},
    "dns": {"method": "dns", "target_density": 0.3,
            "params": {"start_iter": 2, "iter_stop": 14, "gamma": 0.01, "recalibrate_every": 4}},
}


#: The ``sparsity.granularity`` settings every method is tested at (N:M fixes the density at N/M).
GRANULARITIES = {"unstructured": {}, "block": {"granularity": "block", "block_shape": [4, 4]},
                 "2:4": {"granularity": "2:4"}, "channel": {"granularity": "channel"}}


def method_granularities() -> list[tuple[str, str]]:
    """Every registered (method, granularity) pair, e.g. ``("dns", "2:4")``."""
    from hf_sparse.grids import Granularity
    from hf_sparse.methods import METHODS

    return [(m, g) for m in sorted(METHODS) for g, extra in GRANULARITIES.items()
            if Granularity.parse(extra.get("granularity", "unstructured"), extra.get("block_shape")).kind
            in METHODS[m].granularities]


def fast_sparsity(method: str, granularity: str = "unstructured") -> dict:
    sparsity = {**FAST_SPARSITY.get(method, {"method": method, "target_density": 0.3}), **GRANULARITIES[granularity]}
    if granularity == "2:4":
        sparsity.pop("target_density")
    return sparsity


def make_trainer(data, output_dir, sparsity: dict | None, model=None, **arg_overrides) -> SparseTrainer:
    return SparseTrainer(model=model or tiny_lenet(), args=tiny_args(output_dir, **arg_overrides),
                         train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                         compute_metrics=data.compute_metrics, sparsity=sparsity)



def run_steps(method, optimizer: torch.optim.Optimizer, loss: Callable[[int], torch.Tensor], steps: int,
              start: int = 0, scheduler: Any = None, then: Callable[[int], None] | None = None) -> None:
    """Drive a method's (or a Sparsifier's) step hooks around a plain training loop: for each step,
    ``before_forward``, ``loss(step).backward()``, ``after_backward``, the optimizer step,
    ``after_step``, ``zero_grad``, then ``scheduler.step()`` and ``then(step)`` when given.
    ``setup`` and ``finalize`` are the caller's."""
    for step in range(start, start + steps):
        method.before_forward(step)
        loss(step).backward()
        method.after_backward(step)
        optimizer.step()
        method.after_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if then is not None:
            then(step)


def state_digest(state: Any) -> str:
    """SHA-256 over every tensor and plain value of a (nested) ``state_dict``."""
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            for item in x:
                visit(item)
        else:
            h.update(repr(x).encode())

    visit(state)
    return h.hexdigest()


def assert_trainers_equal(straight: SparseTrainer, resumed: SparseTrainer) -> None:
    """A resumed run ended where the uninterrupted one did: equal hard masks and parameters, and sparse."""
    for m1, m2 in zip(straight.sparsifier.method.hard_masks(), resumed.sparsifier.method.hard_masks()):
        assert torch.equal(m1, m2)
    for (n, p1), p2 in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p1, p2), n
    assert straight.sparsifier.density() < 1.0


def assert_ranks_resume_exactly(ranks: list[dict], name: str, resume_at: int) -> None:
    """Each rank's resumed run equals its uninterrupted one bitwise (masks after every step from
    ``resume_at``, the final method state and weights), resumed from its own state file."""
    for rank, r in enumerate(ranks):
        assert r[name]["resumed_masks"] == r[name]["masks"][resume_at:]
        assert r[name]["resumed_state"] == r[name]["state"]  # masks, real weights, gates, multipliers
        assert r[name]["resumed_weights"] == r[name]["weights"]
        assert r[name]["state_file"] == f"sparsity_state-rank{rank}-of-{len(ranks)}.pt"


#: The suites of tests/dist_worker.py; one launch records them all.
TWO_RANK_SUITES = ("methods", "l0", "distill")
_two_rank_launch: list[list[dict]] = []  # what ranks 0 and 1 recorded, once the launch has run


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), so launches running side by side under
    ``pytest -n`` do not meet on accelerate's default port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str) -> list[str]:
    """The command line of a two-process CPU ``accelerate launch`` of ``args`` (gloo; ``--multi_gpu``
    is what starts two processes on a CPU machine, ``--cpu`` starts one), on a port of its own."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *args]


def two_rank_records(suite: str, out_dir: Path, timeout: int = 900) -> list[dict]:
    """What ranks 0 and 1 recorded for ``suite`` of tests/dist_worker.py.

    The first call runs every suite in one ``accelerate launch`` of 2 CPU processes (gloo;
    ``--multi_gpu`` is what starts two processes on a CPU machine, ``--cpu`` starts one) writing
    under ``out_dir``; later calls in the session reuse what it recorded."""
    if not _two_rank_launch:
        cmd = accelerate_launch(str(REPO / "tests" / "dist_worker.py"), str(out_dir), *TWO_RANK_SUITES)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _two_rank_launch.append([json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)])
    return [rank[suite] for rank in _two_rank_launch[0]]
