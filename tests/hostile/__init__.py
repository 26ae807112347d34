"""The hostile-checkpoint corpus: damaged and booby-trapped variants of a real sparse checkpoint.

:func:`build_corpus` copies a checkpoint folder written by ``save_sparse_checkpoint`` once per
case and damages each copy in one way a careless or hostile user could: links to files outside,
digests removed or rewritten to fit tampered weights, densities that lie, wrong dtypes, headers
that declare huge shapes, truncated or non-safetensors weight files, JSON that is not JSON or has
the wrong types, timm arguments that open files. Every case names the message fragment that
``load_sparse`` must raise as a ``CheckpointError``; ``hf-sparse inspect`` and ``export`` must end
in one line with exit 1 or 2 (never a traceback). The next round of bad inputs starts from here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_sparse.checkpoint.files import file_sha256


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path, Path], None]  # (checkpoint copy, a scratch folder outside it)
    load_error: str  # regex the CheckpointError of load_sparse must match
    kinds: tuple[str, ...] = ("dense", "bitmask")  # the source formats the case applies to


def _weights(folder: Path) -> Path:
    return next(folder / n for n in ("model.safetensors", "model.bitmask.safetensors") if (folder / n).exists())


def _sparsity(folder: Path) -> dict:
    return json.loads((folder / "sparsity.json").read_text())


def _write_sparsity(folder: Path, sparsity) -> None:
    (folder / "sparsity.json").write_text(json.dumps(sparsity))


def _rehash(folder: Path) -> None:
    """Record the digests of the (tampered) weights: what a forger who knows the format would do."""
    sparsity = _sparsity(folder)
    f = _weights(folder)
    sparsity["sha256"] = {f.name: file_sha256(f)}
    _write_sparsity(folder, sparsity)


def _rewrite_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                     meta_change: Callable[[dict], dict] = lambda m: m) -> None:
    f = _weights(folder)
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata() or {})
    tensors = change(load_file(str(f)))
    save_file(tensors, str(f), metadata=meta_change(meta))
    _rehash(folder)


def _symlink_weights_outside(folder: Path, scratch: Path) -> None:
    f = _weights(folder)
    elsewhere = scratch / f"elsewhere-{f.name}"
    shutil.move(f, elsewhere)
    os.symlink(elsewhere, f)


def _drop_digests_and_tamper(folder: Path, scratch: Path) -> None:
    sparsity = _sparsity(folder)
    del sparsity["sha256"]
    _write_sparsity(folder, sparsity)
    f = _weights(folder)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x40
    f.write_bytes(bytes(data))


def _density_lie(folder: Path, scratch: Path) -> None:
    sparsity = _sparsity(folder)
    sparsity["achieved_density"] = 0.01
    _write_sparsity(folder, sparsity)


def _dense_without_per_layer(folder: Path, scratch: Path) -> None:
    def densify(tensors):
        return {k: torch.where(v == 0, torch.full_like(v, 0.01), v) if v.is_floating_point() else v
                for k, v in tensors.items()}

    _rewrite_tensors(folder, densify)
    sparsity = _sparsity(folder)
    del sparsity["per_layer"]
    _write_sparsity(folder, sparsity)


def _cast(dtype: torch.dtype) -> Callable[[Path, Path], None]:
    def damage(folder: Path, scratch: Path) -> None:
        _rewrite_tensors(folder, lambda t: {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()})
    return damage


def _huge_bitmask_shape(folder: Path, scratch: Path) -> None:
    def meta_change(meta: dict) -> dict:
        layout = json.loads(meta["hf_sparse.bitmask"])
        first = sorted(layout)[0]
        layout[first]["shape"] = [200000, 200000]
        return {**meta, "hf_sparse.bitmask": json.dumps(layout)}

    _rewrite_tensors(folder, lambda t: t, meta_change)


def _truncate(folder: Path, scratch: Path) -> None:
    f = _weights(folder)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _rehash(folder)


def _eight_bytes(folder: Path, scratch: Path) -> None:
    _weights(folder).write_bytes(struct.pack("<Q", 16))
    _rehash(folder)


def _header_2_pow_60(folder: Path, scratch: Path) -> None:
    f = _weights(folder)
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    _rehash(folder)


def _pickle_as_safetensors(folder: Path, scratch: Path) -> None:
    torch.save({"fc1.weight": torch.zeros(3)}, _weights(folder))
    _rehash(folder)


def _sparsity_text(text: str) -> Callable[[Path, Path], None]:
    def damage(folder: Path, scratch: Path) -> None:
        (folder / "sparsity.json").write_text(text)
    return damage


def _sparsity_field(key: str, value) -> Callable[[Path, Path], None]:
    def damage(folder: Path, scratch: Path) -> None:
        sparsity = _sparsity(folder)
        if key == "nonzero":
            first = sorted(sparsity["per_layer"])[0]
            sparsity["per_layer"][first]["nonzero"] = value
        else:
            sparsity[key] = value
        _write_sparsity(folder, sparsity)
    return damage


def _wrong_shape(folder: Path, scratch: Path) -> None:
    def change(tensors):
        name = next(k for k in sorted(tensors) if k.endswith("weight") and tensors[k].dim() == 2
                    and "::" not in k)
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
        return tensors

    _rewrite_tensors(folder, change)


def _link_json_to_text(name: str) -> Callable[[Path, Path], None]:
    def damage(folder: Path, scratch: Path) -> None:
        (folder / "notes.txt").write_text("just some notes\n")
        (folder / name).unlink()
        os.symlink("notes.txt", folder / name)
    return damage


#: Every case. A dense LeNet checkpoint and a bitmask one are the sources (``kinds``).
CASES: tuple[Case, ...] = (
    Case("weights_link_outside", _symlink_weights_outside, r"is a link to .*, outside the checkpoint folder"),
    Case("digests_removed_weights_tampered", _drop_digests_and_tamper, r"records no sha256 digests"),
    Case("achieved_density_lie", _density_lie, r"achieved_density: recorded 0.01"),
    Case("dense_weights_per_layer_removed", _dense_without_per_layer, r"per_layer: missing"),
    Case("int8_weights", _cast(torch.int8), r"stored as int8|int8, recorded float32", ("dense",)),
    Case("float16_weights", _cast(torch.float16), r"stored as float16|float16, recorded float32", ("dense",)),
    Case("bitmask_declares_huge_shape", _huge_bitmask_shape, r"declares 40,000,000,000 entries", ("bitmask",)),
    Case("truncated_weights", _truncate, r"not a readable checkpoint"),
    Case("eight_byte_weights", _eight_bytes, r"not a readable checkpoint"),
    Case("header_length_2_pow_60", _header_2_pow_60, r"not a readable checkpoint"),
    Case("pickle_named_safetensors", _pickle_as_safetensors, r"not a readable checkpoint"),
    Case("sparsity_not_json", _sparsity_text("{not json"), r"sparsity.json: not a JSON file"),
    Case("sparsity_is_a_list", _sparsity_text("[1, 2]"), r"sparsity.json: expected a JSON object, found a list"),
    Case("nonzero_is_text", _sparsity_field("nonzero", "lots"), r"nonzero is not a count: 'lots'"),
    Case("sha256_is_a_list", _sparsity_field("sha256", ["abc"]), r"sha256 is not a mapping"),
    Case("model_class_is_a_function", _sparsity_field("model_class", "transformers.pipeline"),
         r"cannot tell which model class"),
    Case("wrong_tensor_shape", _wrong_shape, r"classifier.weight has shape \[11, 100\] in the weights, the model "
                                             r"built from config.json expects \[10, 100\]", ("dense",)),
    Case("config_links_to_text", _link_json_to_text("config.json"), r"config.json: not a JSON file"),
    Case("sparsity_links_to_text", _link_json_to_text("sparsity.json"), r"sparsity.json: not a JSON file"),
)


def build_corpus(sources: dict[str, Path], out: Path) -> dict[str, tuple[Path, Case]]:
    """One damaged copy per (case, source kind) under ``out``: ``{"case/kind": (folder, case)}``."""
    corpus = {}
    scratch = out / "_outside"
    scratch.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        for kind in case.kinds:
            folder = out / case.name / kind
            shutil.copytree(sources[kind], folder)
            case.damage(folder, scratch)
            corpus[f"{case.name}/{kind}"] = (folder, case)
    return corpus


def timm_with_checkpoint_path(folder: Path, target: Path) -> None:
    """A timm checkpoint whose config asks timm to read ``target`` (any file on the machine)."""
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_args", {})["checkpoint_path"] = str(target)
    (folder / "config.json").write_text(json.dumps(config))


__all__ = ["CASES", "Case", "build_corpus", "timm_with_checkpoint_path"]
