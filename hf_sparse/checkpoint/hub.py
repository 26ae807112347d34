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
``HF_HUB_DOWNLOAD_TIMEOUT``. A per-read timeout does not stop a Hub that sends one byte a second,
and the client retries some failures, so each push and pull also has a total deadline:
``2 x HF_SPARSE_HUB_TIMEOUT`` plus the bytes to move at ``HF_SPARSE_HUB_MIN_RATE`` bytes per
second (default 1 MB/s). Past it the call is abandoned and a HubError says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, snapshot_download
from huggingface_hub.utils import _http

from .model_card import REPO_PLACEHOLDER

DEFAULT_COMMIT_MESSAGE = "Upload sparse checkpoint with hf_sparse"


class HubError(RuntimeError):
    """A push or pull failed; the message names the repo and says why (unreachable, auth, server error)."""


DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MIN_RATE = 1e6  # bytes per second a transfer is given time for, at least


def _positive_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise HubError(f"{name}={text!r} is not a positive number of seconds" if "TIMEOUT" in name else
                       f"{name}={text!r} is not a positive number")
    return value


def hub_timeout() -> float:
    """Seconds a Hub request may wait to connect or between two bytes (``HF_SPARSE_HUB_TIMEOUT``)."""
    return _positive_env("HF_SPARSE_HUB_TIMEOUT", DEFAULT_TIMEOUT_S)


def hub_deadline(nbytes: int) -> float:
    """Total seconds a push or pull of ``nbytes`` may take: two timeouts plus the transfer at the floor rate."""
    return 2 * hub_timeout() + nbytes / _positive_env("HF_SPARSE_HUB_MIN_RATE", DEFAULT_MIN_RATE)


T = TypeVar("T")


class _DeadlineExceeded(TimeoutError):
    pass


def _within(deadline: float, call: Callable[[], T]) -> T:
    """``call()`` in a worker thread, abandoned after ``deadline`` seconds (_DeadlineExceeded).

    The abandoned thread is a daemon: it ends with its socket's own timeout or with the process.
    """
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome["error"] = e

    worker = threading.Thread(target=work, name="hf-sparse-hub", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise _DeadlineExceeded(f"{deadline:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


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
    if isinstance(exc, _DeadlineExceeded):
        return (f"the Hub at {endpoint} did not finish within {exc} (HF_SPARSE_HUB_TIMEOUT={hub_timeout():g} s "
                "plus the transfer at HF_SPARSE_HUB_MIN_RATE); the call was abandoned")
    for e in chain:
        name = type(e).__name__
        if "Timeout" in name or isinstance(e, TimeoutError):
            return (f"the Hub at {endpoint} did not answer within {hub_timeout():g} s ({name}); "
                    "retry later, or raise HF_SPARSE_HUB_TIMEOUT")
        if isinstance(e, ConnectionError) or "Connect" in name:
            return f"cannot reach the Hub at {endpoint} ({name}: {e})"
    return f"{type(exc).__name__}: {exc}"


def _operations(folder: Path, repo_id: str) -> list[CommitOperationAdd]:
    """One upload per regular file of the folder; a link that leads outside it is refused (its target
    would be uploaded: a secret linked in as notes.txt would land on the Hub)."""
    from .files import checked_file
    from .save_and_load import CheckpointError

    ops = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .cache/, .git/, editor files: not part of the checkpoint
        try:
            checked_file(folder, rel.as_posix())
        except CheckpointError as e:
            raise HubError(f"cannot push {folder} to {repo_id}: {e}") from None
        if not path.is_file():
            continue
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
    def push():
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision, repo_type="model")

    try:
        deadline = hub_deadline(size)
        with _timeouts():
            info = _within(deadline, push)
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - every client/transport failure becomes one HubError
        applied = " (the commit may still be applied: check the repo before pushing again)" \
            if isinstance(e, _DeadlineExceeded) else ""
        raise HubError(f"push of {folder} to {repo_id} failed: {_cause(e, api.endpoint)}{applied}") from e
    return str(info.commit_url)


def pull_from_hub(repo_id: str, *, revision: str | None = None, token: str | None = None,
                  endpoint: str | None = None, cache_dir: str | Path | None = None,
                  local_dir: str | Path | None = None) -> Path:
    """Download the repo's snapshot (into the Hub cache, or ``local_dir``) and return its folder.

    The file list (with sizes) comes first, within two timeouts; then the download, within its deadline.
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        with _timeouts() as timeout:  # snapshot_download shows a progress bar per file
            size = 0
            if not constants.HF_HUB_OFFLINE:  # offline, the snapshot comes from the cache
                info = _within(hub_deadline(0), lambda: api.model_info(repo_id, revision=revision,
                                                                       files_metadata=True))
                size = sum(getattr(f, "size", None) or 0 for f in info.siblings or [])
            path = _within(hub_deadline(size), lambda: snapshot_download(
                repo_id, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
                local_dir=local_dir, repo_type="model", etag_timeout=timeout))
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001
        raise HubError(f"download of {repo_id} failed: {_cause(e, api.endpoint)}") from e
    return Path(path)


__all__ = ["DEFAULT_COMMIT_MESSAGE", "HubError", "pull_from_hub", "push_to_hub"]
