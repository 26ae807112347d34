"""Structured purge beyond the hand-picked models: a fixed sample of the zoo sweep, and refusals that
come before training.

The sample runs ``bench/bench_purge_zoo.py``'s own per-architecture check (group discovery, a few
``l0`` steps at ``granularity: group`` and density 0.5, purge, outputs against the gated model) on
small members of families the hand-written tests do not cover. Groups whose purge would not be
exact are found when the groups are found (before any training step) and left out; a model left
with none is refused by the method's setup, naming it; discovery has a time limit.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_sparse.config.recipe import SparsityConfig
from hf_sparse.structure.groups import GroupError, find_groups
from hf_sparse.structure.purge import keep_by_magnitude, mask_channels, purge_copy
from hf_sparse.training.sparsifier import Sparsifier

_spec = importlib.util.spec_from_file_location("bench_purge_zoo", Path(__file__).parents[1] / "bench" / "bench_purge_zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def hf_swin() -> nn.Module:
    """A two-stage transformers Swin (windowed attention with a relative-position bias table)."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                     window_size=4, num_labels=10)
    return SwinForImageClassification(cfg)


def half_pruned_purges_exactly(model: nn.Module, x) -> list:
    """The model's groups, after checking that what a structured run leaves (half of every group's
    channels zeroed by magnitude) purges to a smaller model with equal outputs."""
    groups = find_groups(model, x)
    mask_channels(model, groups, keep_by_magnitude(model, groups, 0.5))
    small, info = purge_copy(model, inputs=x, groups=groups)
    assert info["max_abs_diff"] <= 1e-5 and info["params"]["fraction"] < 1
    return groups


SAMPLE = {  # name -> (builder, inputs)
    "timm ghostnet_050": (lambda: zoo.build_timm("ghostnet_050"), zoo.timm_inputs),
    "timm regnetx_002": (lambda: zoo.build_timm("regnetx_002"), zoo.timm_inputs),
    "timm mobilevit_xxs": (lambda: zoo.build_timm("mobilevit_xxs"), zoo.timm_inputs),
    "transformers swin": (hf_swin, zoo.hf_inputs),
}


SLOW = {"timm ghostnet_050", "timm mobilevit_xxs"}  # ~10 s of CPU each: the default run keeps two


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SAMPLE])
def test_zoo_sample_purges_exactly(name):
    build, inputs = SAMPLE[name]
    row = zoo.check(build(), inputs, steps=2)
    assert row["status"] == "exact", row
    assert row["max_abs_diff"] <= 1e-5 and row["params_fraction"] < 1 and row["discovery_s"] < 30


class ChannelCentred(nn.Module):
    """conv -> subtract the mean over channels -> conv -> head: the mean runs over the channels, so a
    removed (zero) channel still counts in it, and no parameter tells the tracer so."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        x = x - x.mean(1, keepdim=True)
        return self.head(x.mean((2, 3)))


def test_an_inexact_group_is_left_out_with_a_reason(caplog):
    model, x = ChannelCentred(), torch.randn(1, 3, 8, 8)
    unverified = find_groups(model, x, verify=False)
    assert [g.name for g in unverified] == ["conv"]
    with caplog.at_level(logging.WARNING, logger="hf_sparse.structure.groups"):
        assert find_groups(model, x) == []
    assert "1 of 1 channel groups of ChannelCentred left out (not removable exactly): conv (its purge changes the outputs by" in caplog.text


def test_a_model_without_exact_groups_is_refused_before_training():
    """The method's setup (what prepare_run and the first step run) refuses, before any step."""
    config = SparsityConfig(method="l0", target_density=0.5, granularity="group",
                            targets={"layer_types": ["Conv2d", "Linear"]})
    with pytest.raises(ValueError, match=r"no coupled channel group .* left out as not removable exactly: conv "
                                         r"\(its purge changes the outputs by"):
        Sparsifier(ChannelCentred(), config, seed=0)


def test_exact_groups_stay_beside_inexact_ones():
    """Only the failing group goes: a residual net's groups all stay, and purge_copy still works."""
    model = zoo.build_timm("resnet10t").eval()
    x = zoo.timm_inputs(model, 1)
    assert len(find_groups(model, x)) == len(find_groups(model, x, verify=False))


def test_discovery_stops_at_its_time_limit():
    model = zoo.build_timm("resnet10t").eval()
    with pytest.raises(GroupError, match=r"took longer than 0.001 s of CPU time \(the limit\)"):
        find_groups(model, zoo.timm_inputs(model, 1), time_limit=0.001)


def test_swin_relative_position_table_is_not_a_value_channel():
    """DepGraph couples the relative-position bias table (positions x heads) with the value
    projection's channels; those slices cannot hold the channels, so that group is not used."""
    model = hf_swin().eval()
    groups = find_groups(model, zoo.hf_inputs(model, 1), verify=False)
    sizes = dict(model.state_dict())
    for g in groups:
        for s in g.slices:
            assert int(s.index.max()) < sizes[s.tensor].shape[s.dim], (g.name, s.tensor)
    small, info = purge_copy(model, inputs=zoo.hf_inputs(model, 1))
    assert info["max_abs_diff"] <= 1e-5


def test_swin_heads_are_grouped_with_their_bias_table_column():
    """Swin's attention is in the family table: one group per head spans its q/k/v rows, its output
    projection columns and its column of the relative-position bias table, and half the heads purge
    exactly (the table loses the same columns)."""
    model = hf_swin().eval()
    x = zoo.hf_inputs(model, 1)
    heads = {g.name: g for g in half_pruned_purges_exactly(model, x) if g.name.endswith(".heads")}
    assert set(heads) == {f"swin.encoder.layers.{i}.blocks.0.attention.heads" for i in (0, 1)}
    assert [g.channels for g in heads.values()] == [2, 4]
    table = "swin.encoder.layers.1.blocks.0.attention.relative_position_bias.relative_position_bias_table"
    assert any(s.tensor == table and s.dim == 1 for s in heads["swin.encoder.layers.1.blocks.0.attention.heads"].slices)


def cpu_seconds(fn):
    import time

    started = time.process_time()
    out = fn()
    return out, time.process_time() - started


@pytest.mark.parametrize("name", ["visformer_tiny", pytest.param("halonet_h1", marks=pytest.mark.slow)])
def test_attention_reshapes_that_never_converge_are_cut_short(name, caplog):
    """DepGraph's index propagation around a conv attention's head reshape either never repeats
    (Visformer) or multiplies its index lists each pass (HaloNet): discovery took over 30 s and was
    refused. Such a root is now left out with a warning naming it, and the rest is found in seconds."""
    model = zoo.build_timm(name).eval()
    with caplog.at_level(logging.WARNING, logger="hf_sparse.structure.groups"):
        groups, seconds = cpu_seconds(lambda: find_groups(model, zoo.timm_inputs(model, 1)))
    assert groups and seconds < 15, (len(groups), seconds)
    warned = [r.getMessage() for r in caplog.records if "the tracer cannot collect them" in r.getMessage()]
    assert warned and "attn" in warned[0] and "_Runaway" in warned[0], caplog.text


def test_a_concat_of_unknown_width_leaves_the_rest_traceable():
    """CSPNet's focus stem concatenates space-to-depth slices whose widths DepGraph cannot infer (it
    raised TypeError): that concat stays unmapped and the other groups are found and proven."""
    model = zoo.build_timm("cs3darknet_focus_s").eval()
    x = zoo.timm_inputs(model, 1)
    assert len(half_pruned_purges_exactly(model, x)) >= 10


def test_one_failing_root_does_not_end_discovery():
    """transformers Hiera: one root's index mapping divides by zero inside DepGraph; that root is
    left out and the model's other groups purge exactly."""
    model = zoo.build_hf("hiera", "HieraForImageClassification").eval()
    x = zoo.hf_inputs(model, 1)
    assert half_pruned_purges_exactly(model, x)


def test_tensors_cached_by_the_traced_forward_do_not_stop_copies():
    """transformers LeViT caches its attention biases in eval mode; cached under autograd they made
    every later deepcopy fail. Discovery detaches them, so groups are found and purged."""
    model = zoo.build_hf("levit", "LevitForImageClassification").eval()
    x = zoo.hf_inputs(model, 1)
    assert half_pruned_purges_exactly(model, x)


class Broken(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], 7, -1)  # 8 channels x 4 x 4 = 128 values: no multiple of 7


class BrokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), Broken())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(self.conv(x)).mean(1))


def test_a_model_that_cannot_be_traced_is_refused_naming_the_module():
    with pytest.raises(GroupError, match=r"cannot trace BrokenNet to find its channel groups at block\.1 \(Broken\)"):
        find_groups(BrokenNet(), torch.randn(1, 3, 4, 4))
