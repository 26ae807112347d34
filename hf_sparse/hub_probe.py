"""One quick question to the Hub before a download that would otherwise wait for minutes.

Without a connection, transformers, timm and datasets each retry for a long time (about a minute
for timm's weights, ~20 s for ``datasets.load_dataset``) before failing. A repo that is cached, or
any repo when ``HF_HUB_OFFLINE`` is set (the libraries then read their caches), is left to them;
otherwise one metadata request with a 10 s timeout says whether the Hub answers.
"""

from __future__ import annotations

from pathlib import Path

PROBE_TIMEOUT_S = 10


def hub_problem(repo_id: str, *, repo_type: str = "model", cached_files: tuple[str, ...] = (),
                revision: str | None = None) -> str | None:
    """None when ``repo_id`` can be read (cached, offline mode, or the Hub answers), else why not.

    A model counts as cached when one of ``cached_files`` is in the Hub cache; a dataset when its
    repo folder is (datasets downloads through the same cache).
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.is_offline_mode():
        return None
    if repo_type == "dataset":
        if (Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}").is_dir():
            return None
    elif any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in cached_files):
        return None
    try:
        if repo_type == "dataset":
            HfApi().dataset_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
        else:
            HfApi().model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - offline, DNS, 404, auth: the caller words one located answer
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None
