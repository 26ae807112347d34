"""Shared fixtures: a small real Fashion-MNIST bundle and a SparseTrainer factory."""

from __future__ import annotations

import copy

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_full():
    from hf_sparse.data import load_data
    from hf_sparse.recipe import DataConfig

    return load_data(DataConfig(name="fashion_mnist"))


@pytest.fixture()
def fmnist_small(fmnist_full):
    """512 training and 256 test images of the bundled Fashion-MNIST."""
    bundle = copy.copy(fmnist_full)
    bundle.train = fmnist_full.train.select(range(512))
    bundle.eval = fmnist_full.eval.select(range(256))
    return bundle
