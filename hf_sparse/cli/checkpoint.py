"""``hf-sparse export | inspect | push``: the checkpoint subcommands, registered into the main CLI.

``hf_sparse.cli`` calls :func:`add_subcommands`; each subcommand's function takes the parsed arguments
and returns the exit status: 0 on success, 2 for bad input (one message on stderr, nothing
written), 1 when a push fails or ``inspect`` finds tensors that disagree with ``sparsity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint.files import (  # numpy and safetensors only; torch comes with the commands that need it
    DENSITY_PLOT,
    SPARSITY_FILE,
    clear_stale_weights,
    copy_extra_files,
    layer_stats,
)
from ..checkpoint.formats import CHECKPOINT_FORMATS, read_state_dict, weight_files
from ..checkpoint.save_and_load import (
    CheckpointError,
    inspect_checkpoint,
    load_sparse,
    read_sparsity,
    save_sparse_checkpoint,
)


def _fail(command: str, message: str, status: int = 2) -> int:
    print(f"hf-sparse {command}: error: {message}", file=sys.stderr)
    return status


def _model_dir(path: Path) -> Path:
    """``RUN_DIR/model`` when given a run directory, else the folder itself; it must hold a model."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file() or (candidate / SPARSITY_FILE).is_file():
            return candidate
    raise CheckpointError(f"{path} holds no model: expected a run directory with model/ inside, "
                          f"or a model folder with config.json or {SPARSITY_FILE}")


def _report_from(folder: Path, sparsity: dict[str, Any]) -> dict[str, Any]:
    """The engine's report (:class:`~hf_sparse.training.report.SparsityReport`, as a dict) from a
    checkpoint's sparsity.json, or from the tensors for a plain folder."""
    from ..training.report import SparsityReport

    if not sparsity:
        state = read_state_dict(folder)
        layers = {k: layer_stats(v) for k, v in state.items() if v.dim() >= 2 and v.is_floating_point()}
        nonzero, numel = sum(v["nonzero"] for v in layers.values()), sum(v["numel"] for v in layers.values())
        return SparsityReport(achieved_density=nonzero / numel if numel else 1.0, per_layer=layers).to_dict()
    layers = sparsity.get("per_layer") or {}
    purged = sparsity.get("purged")
    if purged:  # the tensors are the purged ones now: describe those
        layers = {k: {**layers.get(k, {}), **v} for k, v in purged["per_layer"].items()}
    return SparsityReport.from_dict({**sparsity, "per_layer": layers}).to_dict()


def _card_facts(folder: Path) -> tuple[str | None, str | None]:
    """(dataset, task) from the source checkpoint's card, so a re-export keeps them."""
    if not (folder / "README.md").is_file():
        return None, None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(folder / "README.md").data
    except Exception:  # noqa: BLE001 - a hand-written card need not parse; the facts are optional
        return None, None
    datasets = data.datasets if isinstance(data.datasets, list) else [data.datasets] if data.datasets else []
    return (datasets[0] if datasets else None), data.pipeline_tag


def export_cmd(args: argparse.Namespace) -> int:
    """Re-export a run's (or a folder's) checkpoint in another storage format."""
    staging = None
    try:
        src = _model_dir(Path(args.run_dir))
        final = Path(args.out)
        if final.resolve() == src.resolve() or src.resolve().is_relative_to(final.resolve()):
            raise CheckpointError(f"--out {final} is (or holds) the source checkpoint; choose another folder")
        if final.exists() and not final.is_dir():
            raise CheckpointError(f"--out {final} exists and is not a folder")
        if final.is_dir() and (entries := sorted(p.name for p in final.iterdir())) and not args.overwrite:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise CheckpointError(f"--out {final} is not empty ({shown}); export writes into a new or empty folder: "
                                  "choose another, or pass --overwrite to replace the checkpoint files in it")
        sparsity = read_sparsity(src)
        if args.format == "purged" and sparsity.get("format") == "purged":
            raise CheckpointError(f"{src} is already purged (its layers are the smaller ones); purging it again "
                                  "would lose the recorded plan: copy the folder as it is instead")
        if sparsity.get("library") == "torch":
            raise CheckpointError(f"{src} holds a plain nn.Module's state dict; re-export it from Python: "
                                  "save_sparse_checkpoint(load_sparse(src, model=module), out, ...)")
        model = load_sparse(src)  # first: a damaged or hostile source is refused here, with its reason
        staging = out = _staging_folder(final)  # written whole, checked, then moved into place
        report = _report_from(src, sparsity)
        run_results = Path(args.run_dir) / "results.json"
        eval_metrics = sparsity.get("eval") or (json.loads(run_results.read_text()).get("eval")
                                                if run_results.is_file() else None)
        recipe = src / "recipe.yaml"
        dataset, task = _card_facts(src)
        if getattr(args, "quantize", None) and args.format != "onnx":
            raise CheckpointError("--quantize int8 needs --format onnx")
        if args.format == "onnx" and sparsity.get("format") == "purged":  # already small: add the graph to a copy
            _onnx_from_purged(src, out, args.quantize)
            return _publish(staging, final, args)
        with warnings.catch_warnings():  # the purge summary is printed with the result below
            warnings.filterwarnings("ignore", message="purge removed")
            save_sparse_checkpoint(model, out, report=report, format=args.format, eval_metrics=eval_metrics,
                                   quantize=getattr(args, "quantize", None),
                                   dense_reference=sparsity.get("dense_reference"),
                                   recipe_yaml=recipe.read_text() if recipe.is_file() else None,
                                   dataset=dataset, task=task, measure_speed=True)  # the card states the speed
        copy_extra_files(src, out)
        return _publish(staging, final, args)
    except (CheckpointError, OSError, json.JSONDecodeError) as e:
        return _fail("export", str(e))
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _staging_folder(final: Path) -> Path:
    """A fresh folder beside ``final`` (same filesystem, so the move into place is a rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".export", dir=final.parent))


def _publish(staging: Path, final: Path, args: argparse.Namespace) -> int:
    """Check that the written checkpoint loads, then move it into ``final``: a new folder is renamed into
    place; into an existing one (empty, or with ``--overwrite``) the files are moved one by one, after
    the earlier checkpoint's weight files there are removed (two weight files would contradict each other)."""
    load_sparse(staging)  # every checkpoint export writes must load (digests, densities, dtypes, shapes)
    if not final.exists():
        staging.rename(final)
        return _wrote(final, args.format)
    clear_stale_weights(final)
    for f in sorted(staging.iterdir()):
        target = final / f.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(f, target)
    return _wrote(final, args.format)


def _wrote(out: Path, fmt: str) -> int:
    info = inspect_checkpoint(out)
    size = sum(info["weights_bytes"].values())
    print(f"wrote {out} ({fmt}, weights {size:,} bytes, density {_num(info['measured_density'])})")
    params = (read_sparsity(out).get("purged") or {}).get("params") if fmt == "purged" else None
    if params:  # what the purge removed; under a few percent it names bitmask
        from ..structure.purge import purge_summary

        print(purge_summary(params))
    return 0


def _onnx_from_purged(src: Path, out: Path, quantize: str | None) -> None:
    """``--format onnx`` of a purged checkpoint: copy it as it is and add ``model.onnx`` (purging it again
    would record an empty plan)."""
    from ..checkpoint.onnx_export import add_onnx

    out.mkdir(parents=True, exist_ok=True)
    own = [*weight_files(src), *(src / n for n in (SPARSITY_FILE, "config.json", "README.md", "recipe.yaml",
                                                   DENSITY_PLOT))]
    for f in own:  # the checkpoint's own files; extras as any export carries them (never pickles)
        if f.is_file():
            shutil.copy2(f, out / f.name)
    copy_extra_files(src, out)
    add_onnx(out, quantize=quantize)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _target(info: dict[str, Any]) -> str:
    """The target in its own unit; a gate target (L0 ``count: gates``) beside the gates it kept."""
    if info.get("target_unit") == "gates" and info.get("target_density") is not None:
        kept = info.get("recorded_gate_density")
        return f"{info['target_density']:.4f} of gates" + (f" (kept {kept:.4f} of gates)" if kept is not None else "")
    return _num(info.get("target_density"))


def format_table(info: dict[str, Any]) -> str:
    """The per-layer table ``hf-sparse inspect`` prints."""
    lines = [
        f"checkpoint: {info['path']}",
        f"format: {info['format']}   method: {info['method'] or '-'}   target density: {_target(info)}"
        f"   recorded density: {_num(info['recorded_density'])}   measured density: {_num(info['measured_density'])}"
        " (of weights)",
        "weights: " + ", ".join(f"{k} ({v:,} bytes)" for k, v in info["weights_bytes"].items()),
        "",
    ]
    rows = [("layer", "shape", "density", "nonzero", "numel")]
    rows += [(r["name"], "x".join(map(str, r["shape"])), f"{r['density']:.4f}", f"{r['nonzero']:,}",
              f"{r['numel']:,}") for r in info["layers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += [f"MISMATCH {p}" for p in info["problems"]]
    return "\n".join(lines)


def format_groups(groups: list, model, source: str) -> str:
    """The channel-group table ``hf-sparse inspect --groups`` prints."""
    rows = [("group", "channels", "entries per channel", "tensors (out + in)")]
    for g in groups:
        outs = sorted({s.tensor for s in g.slices if s.role == "out"})
        ins = sorted({s.tensor for s in g.slices if s.role == "in"})
        rows.append((g.name, str(g.channels), f"{g.entries_per_channel(model):,}", f"{len(outs)} + {len(ins)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{source}: {len(groups)} channel groups, {sum(g.channels for g in groups):,} channels", ""]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _inspect_groups(args: argparse.Namespace) -> int:
    """``inspect --groups RECIPE``: build the recipe's model and print its coupled channel groups."""
    from ..config.recipe import RecipeError, load_recipe
    from ..models.build import TimmClassifier
    from ..structure.groups import find_groups
    from ..training.run import prepare_run

    try:
        recipe = load_recipe(args.path, args.set)
        run = prepare_run(recipe, "unused-output-dir")
    except RecipeError as e:
        return _fail("inspect", str(e))
    model = run.model.model if isinstance(run.model, TimmClassifier) else run.model
    batch = run.data.collator([run.data.eval[0]])
    inputs = batch["pixel_values"] if isinstance(run.model, TimmClassifier) else \
        {k: v for k, v in batch.items() if k != "labels"}
    groups = find_groups(model, inputs, exclude=recipe.sparsity.targets.exclude)
    print(format_groups(groups, model, args.path))
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    """Print per-layer shapes and densities measured from the tensors (with ``--groups``: a recipe's
    model's channel groups)."""
    if getattr(args, "groups", False):
        return _inspect_groups(args)
    try:
        info = inspect_checkpoint(args.path, revision=args.revision)
    except (CheckpointError, OSError) as e:
        return _fail("inspect", str(e))
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    if info["problems"]:
        print(f"hf-sparse inspect: the tensors disagree with {SPARSITY_FILE}", file=sys.stderr)
        return 1
    return 0


def push_cmd(args: argparse.Namespace) -> int:
    """Push a checkpoint folder (or a run directory's model/) to the Hub."""
    from ..checkpoint.hub import HubError, push_to_hub

    try:
        folder = _model_dir(Path(args.path))
    except CheckpointError as e:
        return _fail("push", str(e))
    try:
        url = push_to_hub(folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message)
    except HubError as e:
        return _fail("push", str(e), status=1)
    print(f"pushed {folder} to {args.repo_id}: {url}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export``, ``inspect`` and ``push``; each parser's ``func`` default is its command."""
    p = subparsers.add_parser("export", help="re-export a sparse checkpoint in another storage format",
                              description="Write RUN_DIR's checkpoint (RUN_DIR/model, or RUN_DIR itself when it is "
                                          "a model folder) to --out in the chosen format.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=list(CHECKPOINT_FORMATS), default="dense",
                   help="dense (zeros, plain transformers/timm), bitmask (compact, lossless), "
                        "purged (structured: smaller layers), onnx (purged or dense weights plus model.onnx, "
                        "checked against PyTorch)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="with --format onnx: also write model.int8.onnx (ONNX Runtime's quantiser; accuracy "
                        "before/after on the recipe's eval split)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="export into a folder that is not empty: its earlier checkpoint's weight files are "
                        "removed and the new checkpoint's files replace those of the same name; others stay")
    p.set_defaults(func=export_cmd)

    p = subparsers.add_parser("inspect", help="per-layer shapes and densities of a sparse checkpoint")
    p.add_argument("path", metavar="PATH", help="a checkpoint folder or a Hub repo id (with --groups: a recipe)")
    p.add_argument("--revision", default=None, help="Hub revision (for a repo id)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--groups", action="store_true",
                   help="PATH is a recipe: print its model's coupled channel groups (what structured pruning removes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --groups: override a recipe value (repeatable)")
    p.set_defaults(func=inspect_cmd)

    p = subparsers.add_parser("push", help="push a sparse checkpoint to the Hugging Face Hub",
                              description="Token and endpoint come from the Hub client's settings "
                                          "(HF_TOKEN or `hf auth login`, HF_ENDPOINT).")
    p.add_argument("path", metavar="PATH", help="a checkpoint folder, or a run directory with model/ inside")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default="Upload sparse checkpoint with hf_sparse")
    p.set_defaults(func=push_cmd)


__all__ = ["add_subcommands", "export_cmd", "format_groups", "format_table", "inspect_cmd", "push_cmd"]
