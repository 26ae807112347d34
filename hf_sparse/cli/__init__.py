"""hf-sparse: train or validate a recipe; export, inspect and push sparse checkpoints.

Every heavy import (torch, transformers, timm) happens inside the command that needs it, so
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .checkpoint import add_subcommands
from .compare import add_subcommand as add_compare_subcommand
from .predict import add_subcommand as add_predict_subcommand
from .rundir import RunDirError, open_run_dir
from .sensitivity import add_subcommand as add_sensitivity_subcommand

#: What ``hf-sparse --help`` says (the module docstring is for readers of the code).
DESCRIPTION = "Train sparse models from a YAML recipe; export, inspect and push sparse checkpoints."


def _train(args: argparse.Namespace) -> int:
    from ..config.recipe import load_recipe
    from ..training.run import execute_run, is_finished_run, prepare_run, summary_table

    recipe = load_recipe(args.recipe, args.set)
    output_dir = Path(args.output_dir or recipe.training.get("output_dir") or f"runs/{Path(args.recipe).stem}")
    rank0 = os.environ.get("RANK", "0") == "0"
    if args.resume == "last" and is_finished_run(output_dir):
        if rank0:
            print(f"{output_dir} holds a finished run (results.json and model/ are written); nothing to resume")
        return 0
    run = prepare_run(recipe, output_dir)
    resume = _resume_point(args.resume, output_dir, rank0) if args.resume else None
    lock = open_run_dir(output_dir, resume=resume is not None, overwrite=args.overwrite) if rank0 else None
    try:
        results = execute_run(run, resume_from_checkpoint=resume)
    except Exception as e:  # noqa: BLE001 - only write failures are handled; the rest is re-raised
        if (reason := _write_failure(e)) is None:
            raise
        fix = "free space" if "space" in reason or "too large" in reason.lower() or "full" in reason else "fix that"
        raise RunFailed(f"writing into {output_dir} failed: {reason}; a checkpoint cut short is never resumed "
                        f"from: {fix}, then continue with --resume") from None
    finally:
        if lock is not None:
            lock.release()
    if run.args.should_save:
        from ..training.trainer import checkpoint_step

        print(summary_table(results, recipe.sparsity, resumed_from=checkpoint_step(Path(resume)) if resume else None))
        print(f"run directory: {output_dir}")
    return 0


class RunFailed(RuntimeError):
    """A run stopped on a fault of its surroundings (a full disk); exit status 1 with the message."""


def _write_failure(e: BaseException) -> str | None:
    """'no space left on the device'-style reason when ``e`` is a failed write, else None.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] ...
    unexpected pos``, without a word of disk space.
    """
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{e.strerror} ({e.filename})" if e.filename else str(e.strerror)
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{e.strerror} ({e.filename})" if e.filename else str(e.strerror)
    text = str(e)
    if isinstance(e, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text
                                        or "file write failed" in text):
        return "the disk is full (or a file size limit was reached) while a checkpoint was being written"
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:  # safetensors' own writer
        return text[text.index("I/O error"):].strip()
    return None


def _resume_point(wanted: str, output_dir: Path, rank0: bool) -> str:
    """The checkpoint ``--resume`` continues from: the newest complete one, or the one named."""
    from ..config.recipe import RecipeError
    from ..training.trainer import CHECKPOINT_COMPLETE, is_complete_checkpoint, newest_complete_checkpoint

    if wanted != "last":
        if not Path(wanted).is_dir():
            raise RecipeError(f"{wanted} is not a checkpoint folder", "<command line>", ("--resume",))
        if not is_complete_checkpoint(wanted) and not (Path(wanted) / "trainer_state.json").is_file():
            raise RecipeError(f"{wanted} is not a checkpoint folder (no trainer_state.json); name a "
                              "checkpoint-N folder of a run, or use --resume alone", "<command line>", ("--resume",))
        if not is_complete_checkpoint(wanted):
            raise RecipeError(f"{wanted} is incomplete (no {CHECKPOINT_COMPLETE}: the run was stopped while writing "
                              "it); resume from an earlier checkpoint, or use --resume alone for the newest "
                              "complete one", "<command line>", ("--resume",))
        return wanted
    found, skipped = newest_complete_checkpoint(output_dir) if output_dir.is_dir() else (None, [])
    if rank0:
        for folder in skipped:
            print(f"skipping {folder}: incomplete (the run was stopped while writing it)", file=sys.stderr)
    if found is None:
        raise RecipeError(f"no complete checkpoint to resume from in {output_dir}", "<command line>", ("--resume",))
    if rank0:
        print(f"resuming from {found}", file=sys.stderr)
    return str(found)


def _validate(args: argparse.Namespace) -> int:
    from ..config.recipe import load_recipe
    from ..training.run import prepare_run

    recipe = load_recipe(args.recipe, args.set)
    prepare_run(recipe, "unused-output-dir")
    print(f"{args.recipe}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"action": "extend", "nargs": "+", "default": [], "metavar": "KEY=VALUE",
                 "help": "override recipe keys, e.g. --set sparsity.target_density=0.1 training.seed=1 (repeatable)"}

    train = sub.add_parser("train", help="train a recipe and write the run directory")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("--output-dir", help="run directory (default: training.output_dir or runs/<recipe name>)")
    train.add_argument("--set", **overrides)
    train.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                       help="resume from CHECKPOINT, or from the last checkpoint in the run directory")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in a run directory that is not empty (the earlier run's checkpoint-*, "
                            "model/ and results.json are removed; other files stay)")
    train.set_defaults(func=_train)

    validate = sub.add_parser("validate", help="check a recipe (schema, data, model, targets) without training")
    validate.add_argument("recipe")
    validate.add_argument("--set", **overrides)
    validate.set_defaults(func=_validate)

    add_subcommands(sub)
    add_compare_subcommand(sub)
    add_predict_subcommand(sub)
    add_sensitivity_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `hf-sparse inspect ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 1
    except Exception as e:
        recipe = sys.modules.get("hf_sparse.config.recipe")  # a RecipeError implies that module is loaded
        trainer = sys.modules.get("hf_sparse.training.trainer")
        if trainer is not None and isinstance(e, trainer.TrainingDiverged):
            print(f"hf-sparse: error: {e}; no model was saved", file=sys.stderr)
            return 1
        hub = sys.modules.get("hf_sparse.checkpoint.hub")
        if isinstance(e, RunFailed) or (hub is not None and isinstance(e, hub.HubError)):
            print(f"hf-sparse: error: {e}", file=sys.stderr)  # a push at the end of a run: model/ is saved
            return 1
        if isinstance(e, RunDirError):
            print(f"hf-sparse: error: --output-dir: {e}", file=sys.stderr)
            return 2
        if trainer is not None and isinstance(e, trainer.ResumeError):
            print(f"hf-sparse: error: --resume: {e}", file=sys.stderr)
            return 2
        if recipe is None or not isinstance(e, recipe.RecipeError):
            raise
        for problem in (e, *e.others):  # every problem the validation pass found, one located line each
            print(f"hf-sparse: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
