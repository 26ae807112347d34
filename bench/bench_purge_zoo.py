"""Structured purge across the timm and transformers zoos: find groups, train a few group steps, purge.

For every architecture of the sweep: find its coupled channel groups
(:func:`hf_sparse.structure.groups.find_groups`, timed, under its time limit), train ``--steps``
steps of ``l0`` at ``granularity: group``, target density 0.5, on random images (batch 2), then
purge a copy (:func:`hf_sparse.structure.purge.purge_copy`) and compare its outputs with the gated
model's on a second random batch. Each architecture ends in one status:

* ``exact``: purged, fewer parameters, outputs within 1e-5 (max abs) of the gated model;
* ``no groups``: nothing removable was found (the method refuses before training, named);
* ``refused before training``: a located refusal while setting up the method (group discovery's
  time limit, the method's own checks), i.e. at ``hf-sparse validate`` / the first step;
* ``refused at export``: purge_copy refused after training (what must not happen);
* ``crashed``: any other exception (a traceback: what must not happen).

The timm sample: every module (family) of ``timm.list_models()`` named in ``REQUIRED`` plus a
seeded sample of the other families, each at its smallest size (fewest parameters among the
family's models, counted on the meta device). The transformers sample: every architecture of
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` built from its default config with depth cut to
1-2 blocks per stage (``shrink``); architectures that cannot be built or run from a config alone
are listed as such.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_purge_zoo.py [--timm 46] [--seed 0] [--steps 3]
        [--only NAME,...] [--skip-timm | --skip-hf] [--timm-list FILE] [--shard I/N]
        [--out runs/bench_purge_zoo/results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sparse.config.recipe import SparsityConfig  # noqa: E402
from hf_sparse.structure.groups import GroupError, find_groups  # noqa: E402
from hf_sparse.structure.purge import PurgeError, output_tensor, purge_copy, purge_tolerance  # noqa: E402
from hf_sparse.training.sparsifier import Sparsifier  # noqa: E402

#: timm families every sweep includes: inverted residuals, ghost modules, squeeze-excite, depthwise and
#: grouped convs, ConvNeXt, ViT/DeiT, windowed hierarchical transformers, MobileViT, RegNet,
#: EfficientNet, DenseNet-style concatenation.
REQUIRED = ("mobilenetv3", "efficientnet", "ghostnet", "senet", "resnet", "regnet", "convnext",
            "vision_transformer", "deit", "swin_transformer", "mobilevit", "densenet")
#: Families left out of the sample: multimodal towers whose smallest member is a large language-model
#: vision encoder (minutes per step on a CPU), not an image classifier one would purge.
SKIP_FAMILIES = ("gemma4_vit", "qwen3_vit", "deepseek_vit", "mobilenetv5")
IMAGE = 64  # input side for models that take any size


def _meta_params(name: str) -> int:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def smallest_in_family(family: str, candidates: int = 12) -> str | None:
    """The family's model with the fewest parameters among its ``candidates`` shortest names
    (size tags like ``_atto``/``_050``/``_tiny`` keep small models among them)."""
    import timm

    names = timm.list_models(module=family)
    small_tags = ("atto", "femto", "pico", "nano", "tiny", "small", "xxs", "xs", "_t", "050", "035", "_s", "lite")
    names = sorted(names, key=lambda n: (not any(t in n for t in small_tags), len(n), n))[:candidates]
    sized = []
    for n in names:
        try:
            sized.append((_meta_params(n), n))
        except Exception:  # noqa: BLE001 - a model that needs extra arguments is not a candidate
            continue
    return min(sized)[1] if sized else None


def timm_zoo(count: int, seed: int) -> list[tuple[str, str]]:
    """(family, smallest model) for the required families plus a seeded sample of the others."""
    import timm

    families = [f for f in timm.list_modules() if f not in SKIP_FAMILIES]
    others = [f for f in families if f not in REQUIRED]
    random.Random(seed).shuffle(others)
    chosen = [f for f in REQUIRED if f in families] + others
    picked = []
    for family in chosen:
        if len(picked) >= count:
            break
        name = smallest_in_family(family)
        if name is not None:
            picked.append((family, name))
    return picked


def build_timm(name: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10)


def timm_inputs(model: nn.Module, batch: int) -> torch.Tensor:
    """Images of the shape :func:`example_inputs` picks (what the method's own group discovery uses)."""
    from hf_sparse.families import example_inputs

    shape = list(example_inputs(model).shape)
    return torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))


# -- transformers ---------------------------------------------------------------------------------------------

def shrink(config: Any) -> Any:
    """The config with 1-2 blocks per stage (widths stay): ``num_hidden_layers`` 2, every stage
    depth 1; nested vision/text configs alike; EfficientNet at its B0 coefficients."""
    if hasattr(config, "depth_coefficient"):  # EfficientNet's default config is B7 at 600x600: B0 at 224
        config.depth_coefficient = config.width_coefficient = 1.0
        config.image_size, config.hidden_dim = 224, 1280
    for key, value in list(vars(config).items()):
        if hasattr(value, "to_dict") and key.endswith("_config"):
            shrink(value)
        elif key in ("num_hidden_layers", "num_layers", "encoder_layers", "num_self_attends_per_block") \
                and isinstance(value, int) and value > 2:
            setattr(config, key, 2)
        elif key in ("depths", "depth", "num_blocks", "layers", "block_repeats") and isinstance(value, (list, tuple)) \
                and value and all(isinstance(v, int) for v in value):
            setattr(config, key, type(value)([1] * len(value)))
    return config


def hf_zoo() -> list[tuple[str, str]]:
    """(model_type, class name) of every transformers image-classification architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    out = []
    for model_type, cls in names.items():
        for c in (cls if isinstance(cls, tuple) else (cls,)):
            out.append((model_type, c))
    return out


def build_hf(model_type: str, cls_name: str) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, cls_name)
    try:
        config = shrink(AutoConfig.for_model(model_type))
        config.num_labels = 10
        torch.manual_seed(0)
        return cls(config)
    except Exception:  # noqa: BLE001 - some configs tie their per-stage lists together: the default depth
        config = AutoConfig.for_model(model_type)
        config.num_labels = 10
        torch.manual_seed(0)
        return cls(config)


def hf_inputs(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    from hf_sparse.families import example_inputs

    one = example_inputs(model)
    if not isinstance(one, dict):
        one = {"pixel_values": one}
    gen = torch.Generator().manual_seed(batch)
    return {k: torch.randn(batch, *v.shape[1:], generator=gen) if v.is_floating_point() else
            v.expand(batch, *v.shape[1:]).clone() for k, v in one.items()}  # masks and grids stay as they are


# -- one architecture -----------------------------------------------------------------------------------------

SPARSITY = SparsityConfig(method="l0", target_density=0.5, granularity="group",
                          targets={"layer_types": ["Conv2d", "Linear"]},
                          params={"control": "constrained", "init_drop_rate": 0.5, "gate_lr": 0.1})


def check(model: nn.Module, make_inputs: Callable[[nn.Module, int], Any], steps: int = 3) -> dict[str, Any]:
    """Groups, a few l0 group steps at 0.5, purge, compare: one row of the sweep (see the module doc)."""
    row: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    stage = "inputs"
    try:
        model.eval()
        x1 = make_inputs(model, 1)
        stage = "discovery"
        started, cpu = time.perf_counter(), time.process_time()
        try:
            groups = find_groups(model, x1)
        except GroupError as e:  # a clear refusal (cannot trace, over the time limit): before training
            row.update(status="refused before training", error=str(e).splitlines()[0][:300])
            return row
        finally:
            row["discovery_s"] = round(time.perf_counter() - started, 2)
            row["discovery_cpu_s"] = round(time.process_time() - cpu, 2)
        row["groups"] = len(groups)
        row["channels"] = sum(g.channels for g in groups)
        if not groups:
            row["status"] = "no groups"
            return row
        stage = "setup"
        model.train()
        try:
            sp = Sparsifier(model, SPARSITY, seed=0)
        except (ValueError, GroupError) as e:
            row.update(status="refused before training", error=str(e).splitlines()[0][:300])
            return row
        stage = "training"
        opt = torch.optim.Adam([{"params": list(model.parameters())}, *sp.param_groups(0.01)], lr=1e-3)
        x, y = make_inputs(model, 2), torch.arange(2)
        sp.setup(steps)
        for step in range(steps):
            sp.before_forward(step)
            nn.functional.cross_entropy(output_tensor(model, x).flatten(1)[:, :10], y).backward()
            sp.after_backward(step)
            opt.step()
            sp.after_step(step, opt)
            opt.zero_grad()
        sp.finalize()
        model.eval()
        stage = "purge"
        try:  # the trained groups (the export rediscovers the same ones; once is enough here)
            small, info = purge_copy(model, inputs=x1, groups=[g.channel_group for g in sp.method.grids])
        except PurgeError as e:
            row.update(status="refused at export", error=str(e).splitlines()[0][:300])
            return row
        with torch.no_grad():
            reference = output_tensor(model, x)
            diff = float((output_tensor(small, x) - reference).abs().max())
        tolerance = purge_tolerance(reference)  # 1e-5, relative to outputs larger than 1
        row.update(params_fraction=round(info["params"]["fraction"], 4), max_abs_diff=diff,
                   max_abs_output=round(float(reference.abs().max()), 3),
                   status="exact" if diff <= tolerance and info["params"]["fraction"] < 1 else
                   "not smaller" if diff <= tolerance else "wrong")
    except Exception as e:  # noqa: BLE001 - a sweep row records the crash
        row.update(status="crashed", stage=stage, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                   where=traceback.format_exc().strip().splitlines()[-3][:200])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timm", type=int, default=46, help="timm families in the sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated model names (timm) or model types (hf)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-timm", action="store_true")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th architecture from the I-th (parallel runs)")
    parser.add_argument("--timm-list", help="JSON file of [family, model or null] pairs: reuse (or, if absent, "
                                            "write) the timm sample")
    parser.add_argument("--out", default="runs/bench_purge_zoo/results.json")
    args = parser.parse_args()
    shard, shards = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(1)
    only = [s for s in args.only.split(",") if s]
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(rows, indent=1))

    jobs: list[tuple[str, str, str]] = []
    if not args.skip_timm:
        listed = Path(args.timm_list) if args.timm_list else None
        if only:
            zoo = [("?", n) for n in only]
        elif listed is not None and listed.is_file():
            zoo = [tuple(pair) for pair in json.loads(listed.read_text())]
        else:
            zoo = timm_zoo(args.timm, args.seed)
            if listed is not None:
                listed.write_text(json.dumps(zoo))
        jobs += [("timm", family, name) for family, name in zoo]
    if not args.skip_hf:
        jobs += [("transformers", t, c) for t, c in hf_zoo() if not only or t in only]
    for zoo_name, family, name in jobs[shard::shards]:
        if zoo_name == "timm":
            try:
                name = name or smallest_in_family(family)  # a list may name the family only
                model = build_timm(name)
            except Exception as e:  # noqa: BLE001
                record({"zoo": "timm", "family": family, "model": name, "status": "not buildable", "error": str(e)[:200]})
                continue
            record({"zoo": "timm", "family": family, "model": name, **check(model, timm_inputs, args.steps)})
        else:
            model_type, cls_name = family, name
            try:
                model = build_hf(model_type, cls_name)
                hf_inputs(model, 1)
            except Exception as e:  # noqa: BLE001
                record({"zoo": "transformers", "family": model_type, "model": cls_name, "status": "not buildable",
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
                continue
            record({"zoo": "transformers", "family": model_type, "model": cls_name,
                    **check(model, hf_inputs, args.steps)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
