"""Shared fixtures: a small real Fashion-MNIST bundle and a SparseTrainer factory."""

from __future__ import annotations

import copy

import pytest
import torch

# One intra-op thread, as the README runs training: the suite's models gain little from a second one,
# and beside another busy process two spinning OpenMP threads slow every step down many times.
torch.set_num_threads(1)


#: Modules that start processes of their own (two-rank launches, CLI runs killed or interrupted),
#: longest first. They are collected first and, with ``--no-loadscope-reorder`` (pyproject.toml),
#: scheduled first: xdist would otherwise start the modules with the most tests first and leave
#: one worker alone on a minute-long launch at the end while the other idles.
LONGEST_FIRST = ("test_fsdp_trainer.py", "test_fsdp.py", "test_compare.py", "test_reliability_hub.py",
                 "test_distributed.py", "test_startup.py", "test_reliability_runs.py", "test_pipelines.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Each module starts with the heap frozen (tests.helpers.freeze_heap: a full collection per
    ``Trainer.train()`` otherwise costs more than a test's whole run)."""
    from tests.helpers import freeze_heap

    freeze_heap()
    yield


@pytest.fixture()
def one_thread():
    """Small recurrent kernels run ~10x slower when two intra-op threads fight over a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fmnist_full():
    from hf_sparse.config.recipe import DataConfig
    from hf_sparse.data import load_data

    return load_data(DataConfig(name="fashion_mnist"))


@pytest.fixture()
def fmnist_small(fmnist_full):
    """512 training and 256 test images of the bundled Fashion-MNIST."""
    bundle = copy.copy(fmnist_full)
    bundle.train = fmnist_full.train.select(range(512))
    bundle.eval = fmnist_full.eval.select(range(256))
    return bundle


# -- loopback Hub (tests/hub_server.py): the real huggingface_hub client over HTTP -----------------

HUB_TOKEN = "hf_loopback_test_token"


@pytest.fixture()
def hub():
    """A fresh loopback Hub that accepts ``HUB_TOKEN``; pass ``endpoint=hub.url`` to the client."""
    from tests.hub_server import HubServer

    with HubServer(token=HUB_TOKEN) as server:
        yield server
        assert not server.errors, server.errors  # a crash inside the server is a test failure
