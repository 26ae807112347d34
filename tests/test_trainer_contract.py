"""SparseTrainer overrides (or calls) a few of ``transformers.Trainer``'s private methods, because no
public hook reaches what they do. Each is listed here with its reason; the test pins the source
of the Trainer method as of the tested transformers release, so a release that changes one fails
here first, naming the override to review (then update ``TESTED``), instead of breaking resume or
checkpoints silently.
"""

from __future__ import annotations

import hashlib
import inspect

import transformers
from transformers import Trainer

from hf_sparse.training.trainer import SparseTrainer

#: the transformers release the hashes below were taken from (pyproject's upper bound is the next one)
TESTED = "5.25.0"

#: Trainer method -> (why SparseTrainer depends on it, sha256 prefix of its source in TESTED)
PRIVATE = {
    "_save_checkpoint": ("writes sparsity_state.pt with Trainer's checkpoint and the completion marker "
                         "after it (no callback runs after Trainer's files are written)", "a9111e30faa99339"),
    "_get_output_dir": ("the checkpoint folder _save_checkpoint writes into", "97172085342ac46c"),
    "_run_epoch": ("stops an epoch resumed at max_steps, where Trainer would run one step too many",
                   "357d1a21e7a0d4ab"),
    "_load_from_checkpoint": ("restores the sparsifier's masks, gates and multipliers with the weights; a "
                              "checkpoint that does not fit is one ResumeError", "a2804e8d93a297e3"),
    "_load_rng_state": ("a damaged RNG file is a ResumeError, not a traceback", "d5ebdfc0a0884c4b"),
    "_save_optimizer_and_scheduler": ("under FSDP2 the method's own tensors' optimizer groups are saved "
                                      "beside Trainer's, which cannot shard them", "c5ef974db69ab993"),
    "_load_optimizer_and_scheduler": ("the same groups loaded back, and a foreign optimizer state is a "
                                      "ResumeError", "741032f57d6fb802"),
}


def source_hash(name: str) -> str:
    return hashlib.sha256(inspect.getsource(getattr(Trainer, name)).encode()).hexdigest()[:16]


def test_every_private_override_is_listed_with_its_reason():
    overridden = {name for name, value in vars(SparseTrainer).items()
                  if name.startswith("_") and not name.startswith("__") and callable(value) and hasattr(Trainer, name)}
    assert overridden <= set(PRIVATE), f"private Trainer methods overridden without a reason here: {overridden - set(PRIVATE)}"


def test_the_private_trainer_methods_are_those_of_the_tested_release():
    changed = {name: reason for name, (reason, digest) in PRIVATE.items() if source_hash(name) != digest}
    assert not changed, (
        f"transformers {transformers.__version__} changed Trainer methods SparseTrainer relies on (tested with "
        f"{TESTED}); review each override and update the hashes: {changed}")
