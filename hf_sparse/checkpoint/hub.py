"""Push a sparse checkpoint folder to the Hugging Face Hub and pull it back.

Pushing is ``create_repo`` + one ``create_commit`` of every file in the folder. One commit (not
``upload_folder``'s multi-commit pipeline, which it picks when ``hf_xet`` is installed) keeps a
checkpoint all-or-nothing on the Hub: a failure leaves the repo as it was, never a README whose
weights are missing; the card's metadata is validated by the Hub before any byte of weights is
sent. The local folder is only read. Every failure surfaces as one :class:`HubError` that names
the repo and the cause.

Every Hub request has a timeout (``huggingface_hub``'s own client has none for API calls, so a
Hub that stops answering would hang a push forever): ``HF_SPARSE_HUB_TIMEOUT`` seconds (default
60) for connecting and between bytes; downloads also honour ``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, snapshot_download
from huggingface_hub.utils import _http

from .model_card import REPO_PLACEHOLDER

DEFAULT_COMMIT_MESSAGE = "Upload sparse checkpoint with hf_sparse"


class HubError(RuntimeError):
    """A push or pull failed; the message names the repo and says why (unreachable, auth, server error)."""


DEFAULT_TIMEOUT_S = 60.0


def hub_timeout() -> float:
    """Seconds a Hub request may wait to connect or between two bytes (``HF_SPARSE_HUB_TIMEOUT``)."""
    try:
        value = float(os.environ.get("HF_SPARSE_HUB_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


@contextlib.contextmanager
def _timeouts() -> Iterator[float]:
    """huggingface_hub's shared HTTP client, with a timeout, for the duration of one push or pull."""
    timeout = hub_timeout()
    previous = _http._GLOBAL_CLIENT_FACTORY

    def factory():
        client = previous()
        client.timeout = type(client.timeout)(timeout)
        return client

    _http.set_client_factory(factory)
    saved = constants.HF_HUB_DOWNLOAD_TIMEOUT
    if "HF_HUB_DOWNLOAD_TIMEOUT" not in os.environ:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout
    try:
        yield timeout if "HF_HUB_ETAG_TIMEOUT" not in os.environ else constants.HF_HUB_ETAG_TIMEOUT
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = saved
        _http.set_client_factory(previous)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _cause(exc: BaseException, endpoint: str) -> str:
    """One line on what went wrong, from the exception chain (works with requests- and httpx-based clients)."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if isinstance(exc, ValueError) and "metadata" in str(exc).lower():  # the Hub's README validation
        return "the Hub rejected the model card's metadata: " + " ".join(str(exc).split())
    for e in chain:
        status = _status(e)
        if status in (401, 403):
            return (f"the Hub refused the credentials (HTTP {status}); check the token "
                    "(HF_TOKEN, `hf auth login` or token=) and its write access")
        if status is not None and status >= 500:
            return f"the Hub answered HTTP {status} (server error); retry later"
        if status is not None:
            server = str(e).strip().splitlines()
            return f"the Hub answered HTTP {status}: {server[-1] if server else type(e).__name__}"
    for e in chain:
        name = type(e).__name__
        if "Timeout" in name or isinstance(e, TimeoutError):
            return (f"the Hub at {endpoint} did not answer within {hub_timeout():g} s ({name}); "
                    "retry later, or raise HF_SPARSE_HUB_TIMEOUT")
        if isinstance(e, ConnectionError) or "Connect" in name:
            return f"cannot reach the Hub at {endpoint} ({name}: {e})"
    return f"{type(exc).__name__}: {exc}"


def _operations(folder: Path, repo_id: str) -> list[CommitOperationAdd]:
    ops = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # .cache/, .git/, editor files: not part of the checkpoint
        content: str | bytes = str(path)
        if rel.as_posix() == "README.md":
            text = path.read_text(encoding="utf-8")
            if REPO_PLACEHOLDER in text:  # the card's load snippets get the real repo id (local file unchanged)
                content = text.replace(REPO_PLACEHOLDER, repo_id).encode("utf-8")
        ops.append(CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=content))
    return ops


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE,
                endpoint: str | None = None) -> str:
    """Upload the checkpoint folder to ``repo_id`` (created if needed) in one commit; return the commit URL.

    ``revision`` is a branch (created from main if missing). ``token``/``endpoint`` default to the
    Hub client's own settings (``HF_TOKEN``/login, ``HF_ENDPOINT``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"cannot push {folder} to {repo_id}: not a folder")
    ops = _operations(folder, repo_id)
    if not ops:
        raise HubError(f"cannot push {folder} to {repo_id}: the folder holds no files")
    api = HfApi(endpoint=endpoint, token=token)
    size = sum(Path(op.path_or_fileobj).stat().st_size if isinstance(op.path_or_fileobj, str)
               else len(op.path_or_fileobj) for op in ops)
    print(f"uploading {len(ops)} files ({size / 1e6:.1f} MB) to {repo_id} on {api.endpoint} ...", file=sys.stderr)
    try:
        with _timeouts():
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision,
                                     repo_type="model")
    except Exception as e:  # noqa: BLE001 - every client/transport failure becomes one HubError
        raise HubError(f"push of {folder} to {repo_id} failed: {_cause(e, api.endpoint)}") from e
    return str(info.commit_url)


def pull_from_hub(repo_id: str, *, revision: str | None = None, token: str | None = None,
                  endpoint: str | None = None, cache_dir: str | Path | None = None,
                  local_dir: str | Path | None = None) -> Path:
    """Download the repo's snapshot (into the Hub cache, or ``local_dir``) and return its folder."""
    try:
        with _timeouts() as timeout:  # snapshot_download shows a progress bar per file
            path = snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                     cache_dir=cache_dir, local_dir=local_dir, repo_type="model",
                                     etag_timeout=timeout)
    except Exception as e:  # noqa: BLE001
        raise HubError(f"download of {repo_id} failed: {_cause(e, endpoint or HfApi().endpoint)}") from e
    return Path(path)


__all__ = ["DEFAULT_COMMIT_MESSAGE", "HubError", "pull_from_hub", "push_to_hub"]
