"""The run directory's guards: one run at a time (a lock file), and no user file replaced unasked.

``hf-sparse train`` writes ``checkpoint-N/``, ``model/`` and ``results.json`` into its output
directory. Two runs writing there at once would interleave their checkpoints and models, and a
fresh run would replace whatever ``model/`` already held. So a run

- takes the lock file ``.hf-sparse.lock`` (its pid, host and start time) before it writes
  anything; a second run is refused while the holder lives, and a lock left by a process that
  died (same host, pid gone) is taken over with a warning;
- starts fresh only in an empty (or absent) directory: anything already there is named in the
  refusal, unless ``--overwrite`` (then the earlier run's ``checkpoint-*``, ``model`` and
  ``results.json`` are removed, and nothing else) or ``--resume`` (then ``model/`` must be one
  that hf_sparse wrote).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_FILE = ".hf-sparse.lock"
#: What an earlier run left that ``--overwrite`` may remove (and nothing else).
RUN_OUTPUTS = ("checkpoint-*", "model", "model.partial", "model.old", "results.json", "results.json.partial")


class RunDirError(ValueError):
    """The output directory cannot be used as it is; the message says what is in the way."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock file for the duration of a run."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.held = False
        self.created = False  # the run made the directory: released empty, it goes again

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return self
        raise RunDirError(f"{self.path.parent} is locked by another run ({self.path} keeps reappearing)")

    def _take_over_if_stale(self) -> None:
        holder = _read_lock(self.path)
        if holder is None:  # written halfway, or junk: a lock that nobody can hold
            if time.time() - self.path.stat().st_mtime < 5:  # its writer may still be filling it in
                raise RunDirError(f"{self.path.parent} is being used by another run (lock file {self.path})")
        else:
            pid, host = holder.get("pid"), holder.get("host")
            if host != self.me["host"]:
                raise RunDirError(f"{self.path.parent} is in use by a run on host {host} (pid {pid}, since "
                                  f"{holder.get('started')}); if that run is gone, delete {self.path}")
            if isinstance(pid, int) and _alive(pid):
                raise RunDirError(f"{self.path.parent} is in use by another run (pid {pid} on {host}, since "
                                  f"{holder.get('started')}); wait for it, or choose another --output-dir")
            print(f"hf-sparse: warning: taking over the lock of {self.path.parent} from pid {pid}, which is "
                  "no longer running", file=sys.stderr)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and (_read_lock(self.path) or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False
        if self.created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _is_hf_sparse_checkpoint(folder: Path) -> bool:
    return (folder / "sparsity.json").is_file()


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse (RunDirError) when the run would replace files it did not write; with ``overwrite``,
    remove the earlier run's outputs (and only those)."""
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if resume:
        model = run_dir / "model"
        if model.exists() and not _is_hf_sparse_checkpoint(model) and not overwrite:
            raise RunDirError(f"{model} exists and was not written by hf_sparse (no sparsity.json); the run would "
                              "replace it at its end: move it away, or pass --overwrite")
        return
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise RunDirError(f"{run_dir} is not empty ({shown}); a new run would replace files in it: choose "
                          "another --output-dir, continue the run there with --resume, or pass --overwrite")
    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def open_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create the run directory, take its lock and check what it holds; the caller releases the lock.

    An output path that cannot be a directory (a file, below a file, read-only, under /proc) is
    a RunDirError naming it.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as e:
        raise RunDirError(f"cannot use {run_dir} as the run directory: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename and str(e.filename) != str(run_dir) else "")) from None
    lock.created = created
    try:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["LOCK_FILE", "RunDirError", "RunLock", "check_run_dir", "open_run_dir"]
