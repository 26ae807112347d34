"""Sparse checkpoints on disk: formats, exactness, purging, metadata, model card, CLI (no Hub here)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageClassification

from hf_sparse.checkpoint.formats.bitmask import BITMASK_WEIGHTS, pack_tensor, unpack_tensor
from hf_sparse.checkpoint.save_and_load import (
    CheckpointError,
    inspect_checkpoint,
    load_sparse,
    save_sparse_checkpoint,
)
from hf_sparse.cli.checkpoint import add_subcommands
from hf_sparse.models.build import TimmClassifier
from hf_sparse.models.lenet import LeNetConfig, LeNetForImageClassification

RECIPE = """model:
  source: hf_sparse
  name: lenet300_100
data:
  name: fashion_mnist
sparsity:
  method: gmp
  target_density: 0.1
"""


# -- fakes of a finished sparse run (no training: the weights are zeroed by hand) -------------------


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, names: list[str], density: float) -> None:
    """Keep the largest-magnitude ``density`` fraction of each named weight (what finalize() leaves)."""
    for name in names:
        w = model.get_parameter(name)
        k = max(1, round(density * w.numel()))
        threshold = w.abs().flatten().topk(k).values[-1]
        w.mul_(w.abs() >= threshold)


@torch.no_grad()
def remove_units(model: torch.nn.Module, names: list[str], fraction: float, seed: int = 0) -> None:
    """Zero whole output rows/channels (structured sparsity) and give the biases some weight."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        w = model.get_parameter(name)
        rows = torch.randperm(w.shape[0], generator=g)[: int(fraction * w.shape[0])]
        w[rows] = 0
        bias = model.get_parameter(name.removesuffix("weight") + "bias")
        bias.add_(0.3)  # removed units then output a nonzero constant: purging must fold it


def make_report(model: torch.nn.Module, names: list[str], method: str = "gmp", target: float | None = 0.1) -> dict:
    """What the engine's ``Sparsifier.report`` returns."""
    per_layer = {}
    for name in names:
        w = model.get_parameter(name)
        nz = int(torch.count_nonzero(w))
        per_layer[name] = {"density": nz / w.numel(), "nonzero": nz, "numel": w.numel(), "shape": list(w.shape),
                           "layer_type": "Linear" if w.dim() == 2 else "Conv2d"}
    nonzero = sum(v["nonzero"] for v in per_layer.values())
    numel = sum(v["numel"] for v in per_layer.values())
    all_nz = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {"method": method, "target_density": target, "achieved_density": nonzero / numel,
            "model_density": all_nz / sum(p.numel() for p in model.parameters()), "per_layer": per_layer,
            "structure": None, "hf_sparse_version": "0.1.0"}


LENET_TARGETS = {"300-100": ["fc1.weight", "fc2.weight", "classifier.weight"],
                 "5": ["conv1.weight", "conv2.weight", "fc1.weight", "classifier.weight"]}


def sparse_lenet(variant: str = "300-100", density: float = 0.1, structured: float = 0.0,
                 seed: int = 0) -> tuple[LeNetForImageClassification, dict]:
    torch.manual_seed(seed)
    model = LeNetForImageClassification(LeNetConfig(variant=variant)).eval()
    names = LENET_TARGETS[variant]
    if structured:
        remove_units(model, names[:-1], structured, seed)
    magnitude_prune(model, names, density)
    return model, make_report(model, names)


def sparse_timm(density: float = 0.3) -> tuple[TimmClassifier, dict]:
    import timm

    torch.manual_seed(0)
    wrapper = TimmClassifier(timm.create_model("test_resnet", num_classes=10, in_chans=1), "test_resnet").eval()
    names = [n for n, p in wrapper.named_parameters() if p.dim() == 4 or (p.dim() == 2 and "fc" in n)]
    magnitude_prune(wrapper, names, density)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so buffers must round-trip too
        for m in wrapper.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return wrapper, make_report(wrapper, names, method="dns", target=None)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


X_MNIST = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# -- bitmask ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 3, 3), (0,)])
def test_pack_unpack_is_exact(dtype, shape):
    t = torch.randn(shape).to(dtype)
    t[t.abs() < 0.7] = 0
    packed, values = pack_tensor(t)
    assert packed.dtype == torch.uint8 and packed.numel() == (t.numel() + 7) // 8
    assert torch.equal(unpack_tensor(packed, values, list(shape)), t)


def test_bitmask_is_lossless_and_small(tmp_path):
    model, report = sparse_lenet(density=0.1)
    dense = save_sparse_checkpoint(model, tmp_path / "dense", report=report)
    bitmask = save_sparse_checkpoint(model, tmp_path / "bitmask", report=report, format="bitmask")
    ratio = (bitmask / BITMASK_WEIGHTS).stat().st_size / (dense / "model.safetensors").stat().st_size
    assert ratio <= 0.15, ratio
    assert not (bitmask / "model.safetensors").exists()  # plain from_pretrained must not half-load it
    loaded = load_sparse(bitmask)
    original = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, original[name]), name
    assert torch.equal(logits(loaded, X_MNIST), logits(model, X_MNIST))


def test_dense_loads_with_plain_transformers(tmp_path):
    from transformers import AutoImageProcessor, ViTImageProcessor

    model, report = sparse_lenet(density=0.2)
    processor = ViTImageProcessor(size={"height": 28, "width": 28}, do_normalize=False)
    out = save_sparse_checkpoint(model, tmp_path / "ck", report=report, recipe_yaml=RECIPE, processor=processor,
                                 eval_metrics={"accuracy": 0.81, "loss": 0.5}, dense_reference={"accuracy": 0.85})
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 28, "width": 28}
    plain = AutoModelForImageClassification.from_pretrained(out)
    assert torch.equal(logits(plain, X_MNIST), logits(model, X_MNIST))
    assert {"config.json", "model.safetensors", "sparsity.json", "recipe.yaml", "README.md", "density.png"} <= {
        p.name for p in out.iterdir()}
    assert (out / "recipe.yaml").read_text() == RECIPE
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["format"] == "dense" and sparsity["method"] == "gmp"
    assert sparsity["target_density"] == 0.1 and sparsity["achieved_density"] == report["achieved_density"]
    assert sparsity["per_layer"]["fc1.weight"]["shape"] == [300, 784]
    assert sparsity["per_layer"]["fc1.weight"]["density"] == report["per_layer"]["fc1.weight"]["density"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # transformers needs it
    assert meta["hf_sparse.method"] == "gmp" and meta["hf_sparse.format"] == "dense"
    assert float(meta["hf_sparse.target_density"]) == 0.1
    assert float(meta["hf_sparse.achieved_density"]) == report["achieved_density"]


def test_timm_dense_and_bitmask(tmp_path):
    import timm

    wrapper, report = sparse_timm()
    x = torch.randn(2, 1, 32, 32)
    ref = logits(wrapper.model, x)
    dense = save_sparse_checkpoint(wrapper, tmp_path / "dense", report=report)
    plain = timm.create_model(f"local-dir:{dense}", pretrained=True).eval()  # timm alone, no hf_sparse
    assert torch.equal(logits(plain, x), ref)
    bitmask = save_sparse_checkpoint(wrapper, tmp_path / "bitmask", report=report, format="bitmask")
    for folder in (dense, bitmask):
        loaded = load_sparse(folder)
        assert torch.equal(logits(loaded, x), ref)
        assert set(json.loads((folder / "sparsity.json").read_text())["per_layer"]) == {
            n.removeprefix("model.") for n in report["per_layer"]}
    purged = save_sparse_checkpoint(wrapper, tmp_path / "purged", report=report, format="purged")  # any found groups
    torch.testing.assert_close(logits(load_sparse(purged), x), ref, rtol=0, atol=1e-5)


# -- purged -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["300-100", "5"])
def test_purged_is_smaller_with_the_same_outputs(tmp_path, variant):
    model, report = sparse_lenet(variant, density=0.5, structured=0.7)
    out = save_sparse_checkpoint(model, tmp_path / "purged", report=report, format="purged")
    dense = save_sparse_checkpoint(model, tmp_path / "dense", report=report)
    config = json.loads((out / "config.json").read_text())
    full = LeNetConfig(variant=variant).hidden_sizes
    assert all(s <= 0.31 * f + 1 for s, f in zip(config["hidden_sizes"], full)), config["hidden_sizes"]
    assert (out / "model.safetensors").stat().st_size < 0.5 * (dense / "model.safetensors").stat().st_size
    plain = AutoModelForImageClassification.from_pretrained(out)  # the config describes the new shapes
    torch.testing.assert_close(logits(plain, X_MNIST), logits(model, X_MNIST), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_sparse(out), X_MNIST), logits(model, X_MNIST), rtol=1e-5, atol=1e-5)
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert [len(v) for v in sparsity["purged"]["kept"].values()] == config["hidden_sizes"]
    assert inspect_checkpoint(out)["problems"] == []


def test_purge_refuses_a_structure_that_changes_outputs(tmp_path):
    model, report = sparse_lenet(density=0.5, structured=0.5)
    alive = model.fc1.weight.ne(0).any(1).nonzero().flatten().tolist()
    with pytest.raises(CheckpointError, match="would change the outputs"):
        save_sparse_checkpoint(model, tmp_path / "p", report=report, format="purged",
                               structure={"fc1.weight": alive[1:]})
    with pytest.raises(CheckpointError, match="labels"):
        save_sparse_checkpoint(model, tmp_path / "p", report=report, format="purged",
                               structure={"classifier.weight": [0, 1]})
    assert not (tmp_path / "p").exists()
    out = save_sparse_checkpoint(model, tmp_path / "p", report=report, format="purged",
                                 structure={"fc1.weight": alive})
    assert json.loads((out / "config.json").read_text())["hidden_sizes"][0] == len(alive)


# -- checks on load, model card -------------------------------------------------------------------------


def test_load_warns_when_tensors_disagree_with_sparsity_json(tmp_path):
    from safetensors.torch import load_file, save_file

    model, report = sparse_lenet(density=0.1)
    out = save_sparse_checkpoint(model, tmp_path / "ck", report=report)
    f = out / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    tensors["fc1.weight"][tensors["fc1.weight"] == 0] = 1e-3  # revive every pruned weight
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 differs"):
        load_sparse(out)
    sparsity = json.loads((out / "sparsity.json").read_text())
    sparsity["sha256"]["model.safetensors"] = hashlib.sha256(f.read_bytes()).hexdigest()  # a consistent forgery
    (out / "sparsity.json").write_text(json.dumps(sparsity))
    with pytest.raises(CheckpointError, match="densities differ .*fc1.weight"):
        load_sparse(out)
    with pytest.warns(UserWarning, match="fc1.weight"):
        load_sparse(out, verify=False)
    assert inspect_checkpoint(out)["problems"]


def test_model_card_front_matter_parses(tmp_path):
    from huggingface_hub import ModelCard

    model, report = sparse_lenet(density=0.1)
    out = save_sparse_checkpoint(model, tmp_path / "ck", report=report, recipe_yaml=RECIPE,
                                 eval_metrics={"eval_accuracy": 0.8, "eval_loss": 0.6, "eval_runtime": 1.5},
                                 dense_reference={"eval_accuracy": 0.85}, dataset="zalando-datasets/fashion_mnist")
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "hf_sparse"
    assert {"sparse", "pruning", "gmp"} <= set(data.tags)
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    assert data.pipeline_tag == "image-classification"
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"accuracy": 0.8, "loss": 0.6}  # runtime is not a quality metric
    assert data.eval_results[0].dataset_name == "zalando-datasets/fashion_mnist"
    # the round trip: data -> YAML -> data is stable
    assert ModelCard(card.content).data.to_dict() == data.to_dict()
    text = card.text
    assert "![Per-layer density](density.png)" in text
    assert "| `fc1.weight` | 300×784 |" in text
    assert "| accuracy | 0.8000 | 0.8500 |" in text
    assert "method: gmp" in text and "hf_sparse.load_sparse(" in text


# -- CLI ---------------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-sparse")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_export_and_inspect(tmp_path, capsys):
    model, report = sparse_lenet(density=0.1, structured=0.5)
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "preprocessor_config.json").write_text('{"do_normalize": false}')
    save_sparse_checkpoint(model, run_dir / "model", report=report, recipe_yaml=RECIPE,
                           eval_metrics={"accuracy": 0.8})
    assert json.loads((run_dir / "model" / "sparsity.json").read_text())["runtime_speed"] is None  # not asked for
    before = folder_hashes(run_dir)
    for fmt in ("bitmask", "purged"):
        assert run_cli(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        out = tmp_path / fmt
        sparsity = json.loads((out / "sparsity.json").read_text())
        assert sparsity["format"] == fmt
        assert "measured" in sparsity["runtime_speed"] and "## Speed" in (out / "README.md").read_text()  # export times it
        assert (out / "recipe.yaml").read_text() == RECIPE
        assert (out / "preprocessor_config.json").is_file()  # processor files travel along
        torch.testing.assert_close(logits(load_sparse(out), X_MNIST), logits(model, X_MNIST), rtol=1e-5, atol=1e-5)
    assert folder_hashes(run_dir) == before
    capsys.readouterr()

    assert run_cli(["inspect", str(tmp_path / "bitmask")]) == 0
    table = capsys.readouterr().out
    assert "format: bitmask" in table and "method: gmp" in table
    fc1 = next(line for line in table.splitlines() if line.startswith("fc1.weight"))
    nz = report["per_layer"]["fc1.weight"]["nonzero"]
    assert "300x784" in fc1 and f"{nz:,}" in fc1 and f"{nz / 235200:.4f}" in fc1


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert run_cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    wrapper, report = sparse_timm()
    save_sparse_checkpoint(wrapper, tmp_path / "timm", report=report)
    assert run_cli(["export", str(tmp_path / "timm"), "--format", "purged", "--out", str(tmp_path / "timm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source checkpoint" in err
    assert not (tmp_path / "o").exists()
    assert run_cli(["inspect", str(tmp_path / "nowhere" / "x")]) == 2
    with pytest.raises(SystemExit) as e:
        run_cli(["export", str(tmp_path / "timm"), "--format", "zip", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
