"""Registries refuse a name already taken (a second "gmp" would silently replace the first), unless asked."""

from __future__ import annotations

import pytest

from hf_sparse.data import DATA_SOURCES, register_data
from hf_sparse.methods import METHODS, register_method
from hf_sparse.methods.gmp import GradualMagnitudePruning as GMP
from hf_sparse.models import MODEL_REGISTRY, register_model


def test_a_taken_name_is_refused_and_override_replaces():
    fsdd, lenet = DATA_SOURCES["fsdd"], MODEL_REGISTRY["lenet300_100"]
    with pytest.raises(ValueError, match="data source named 'fsdd' is already registered"):
        register_data("fsdd")(lambda cfg: None)
    with pytest.raises(ValueError, match="model named 'lenet300_100' is already registered"):
        register_model("lenet300_100")(lambda config, data: None)

    class Copy(GMP):
        name = "gmp"

    with pytest.raises(ValueError, match="sparsity method named 'gmp' is already registered"):
        register_method(Copy)
    assert DATA_SOURCES["fsdd"] is fsdd and MODEL_REGISTRY["lenet300_100"] is lenet and METHODS["gmp"] is GMP
    try:
        assert register_method(override=True)(Copy) is Copy and METHODS["gmp"] is Copy
    finally:
        register_method(override=True)(GMP)
    assert METHODS["gmp"] is GMP
    register_method(GMP)  # the same class again is not a conflict
