"""The Hub probe leaves cached repos and offline mode to the libraries and answers in seconds otherwise."""

from __future__ import annotations

import time

from huggingface_hub import constants

from hf_sparse.hub_probe import hub_problem


def test_cached_dataset_and_offline_mode_are_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a probe would fail
    (tmp_path / "datasets--org--cached").mkdir()
    assert hub_problem("org/cached", repo_type="dataset") is None
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    assert hub_problem("org/anything", repo_type="dataset") is None


def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once
    started = time.perf_counter()
    for repo_type in ("dataset", "model"):
        problem = hub_problem("org/missing", repo_type=repo_type, cached_files=("config.json",))
        assert problem and "\n" not in problem
    assert time.perf_counter() - started < 30
