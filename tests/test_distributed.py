"""Two real processes through ``accelerate launch``: masks and method state identical on both ranks
after every step."""

from __future__ import annotations

from tests.helpers import method_granularities, two_rank_records


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
