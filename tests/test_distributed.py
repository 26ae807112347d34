"""Two real processes through ``accelerate launch``: masks and method state identical on both ranks
after every step."""

from __future__ import annotations

from hf_sparse.methods import METHODS
from tests.helpers import two_rank_records


def test_masks_identical_on_two_ranks(tmp_path):
    ranks = two_rank_records("methods", tmp_path)
    assert set(ranks[0]) == set(METHODS)
    for method in METHODS:
        a, b = ranks[0][method], ranks[1][method]
        assert a["world_size"] == 2
        assert len(a["masks"]) == len(a["state"]) == 12
        assert a["masks"] == b["masks"], method
        assert a["state"] == b["state"], method  # scores, thresholds, multipliers: bit-identical
        assert a["density"] == b["density"] and a["density"] < 1.0, method
