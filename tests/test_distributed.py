"""Two real processes through ``accelerate launch`` (one launch for the whole session, see
tests/helpers.two_rank_records): masks and method state identical on both ranks after every step,
for every method and granularity, for the l0 configurations of tests/test_l0.py, and for a
distilled run, which also resumes exactly. Every reader of the launch is in this module, so under
``pytest -n`` (``--dist loadscope``) one worker runs them all and the launch runs once."""

from __future__ import annotations

import pytest

from tests.helpers import method_granularities, two_rank_records
from tests.test_l0 import TRAINER_CONFIGS

pytestmark = pytest.mark.dist


def test_masks_identical_on_two_ranks(tmp_path):
    ranks = two_rank_records("methods", tmp_path)
    pairs = [f"{m}/{g}" for m, g in method_granularities()]
    assert set(ranks[0]) == set(pairs)
    for method in pairs:
        a, b = ranks[0][method], ranks[1][method]
        assert a["world_size"] == 2
        assert len(a["masks"]) == len(a["state"]) == 12
        assert a["masks"] == b["masks"], method
        assert a["state"] == b["state"], method  # scores, thresholds, multipliers: bit-identical
        assert a["density"] == b["density"] and a["density"] < 1.0, method


def test_distilled_run_agrees_on_two_ranks_and_resumes_exactly(tmp_path):
    a, b = two_rank_records("distill", tmp_path)
    assert a["world_size"] == b["world_size"] == 2
    assert len(a["straight"]) == 12 and a["straight"] == b["straight"]  # weights and masks equal after every step
    assert a["resumed"] == a["straight"][6:] and b["resumed"] == b["straight"][6:]
    assert a["teacher_digest"] == b["teacher_digest"] and a["soft"] > 0
    assert a["density"] < 0.5  # pruned while distilling (the schedule ends at step 14)


def test_l0_gates_identical_on_two_ranks(tmp_path):
    ranks = two_rank_records("l0", tmp_path, timeout=600)
    assert set(ranks[0]) == set(TRAINER_CONFIGS)
    for name in TRAINER_CONFIGS:
        a, b = ranks[0][name], ranks[1][name]
        assert a["world_size"] == 2 and len(a["state"]) == 10
        assert a["state"] == b["state"], name  # log_alpha, weights, multipliers bit-identical after every step
        assert a["masks"] == b["masks"], name
