"""A loopback stand-in for the Hugging Face Hub that the real ``huggingface_hub`` client talks to.

It speaks the HTTP protocol the client uses for ``create_repo``, ``create_branch``,
``create_commit`` (preupload answering ``uploadMode: "regular"`` for every file, so neither LFS
nor Xet is involved; NDJSON commit with base64 file entries), README metadata validation,
``model_info``/``repo_info``, ``list_repo_tree`` and ``hf_hub_download``/``snapshot_download``
(``HEAD``/``GET`` on ``resolve`` with ``ETag`` and ``X-Repo-Commit``). Repos live in memory as
git-like commits (path -> bytes).

Fault injection: ``token`` (requests without ``Authorization: Bearer <token>`` on writes, or
with any other token, get 401), ``fail_next_commit`` (the next commit POST is read in full and
answered 500 without applying it), ``delay`` (seconds every request waits before it is answered:
a slow Hub), ``truncate_downloads`` (file downloads announce their full length, send half and
close), ``tamper`` (safetensors downloads have bit 6 of their last byte flipped, an exponent bit
of the last float32, so even a pruned 0.0 becomes 2.0, under the original ETag), and :func:`closed_endpoint` (a port nobody listens on).

Faults of the connection itself, for the client's timeouts and deadlines: ``silent`` (requests are
read and never answered, the connection held open), ``drip`` (every answer is sent one byte per
``drip`` seconds) and ``drop_mid_body`` (every answer with a body announces its full length, sends
half and closes the connection). Each applies to requests whose path contains ``fault_paths``
(default: all). ``heal()`` and ``stop()`` release silent and dripping connections.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(content: bytes) -> str:
    """The git blob id the Hub reports for regular files (and the client computes to skip unchanged ones)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def closed_endpoint() -> str:
    """The URL of a loopback port that nothing listens on ("the Hub is down")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


class HubServer:
    """Start with ``with HubServer() as hub:`` (or ``start()``/``stop()``); the endpoint is ``hub.url``."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.fail_next_commit = False
        self.delay = 0.0
        self.truncate_downloads = False
        self.tamper = False
        self.silent = False
        self.drip = 0.0
        self.drop_mid_body = False
        self.fault_paths = ""
        self.released = threading.Event()  # set by stop(): silent and dripping answers give up
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []  # unexpected exceptions inside the server
        self.lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def heal(self) -> None:
        """Turn the connection faults off and end the answers still hanging or dripping (a dripping
        answer holds the server's lock)."""
        self.silent, self.drip, self.drop_mid_body = False, 0.0, False
        self.released.set()
        with self.lock:  # taken once the dripping handler has given up
            pass
        self.released.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------
    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join([str(self._counter), *parts]).encode()).hexdigest()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        commit = self.repos[repo_id].resolve(revision)
        return dict(commit.files) if commit else {}

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        oid = self._new_oid(repo_id, "initial commit")
        repo.commits[oid] = Commit(oid, None, "initial commit", files)
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return repo


def _front_matter(content: str) -> dict | None:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not m:
        return None
    return yaml.safe_load(m.group(1)) or {}


def validate_card_metadata(content: str) -> list[str]:
    """The checks the Hub applies to README front matter that matter here; returns error messages."""
    try:
        meta = _front_matter(content)
    except yaml.YAMLError as e:
        return [f"YAML parse error: {e}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("tags", "datasets", "metrics", "language"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    for key in ("library_name", "pipeline_tag", "license"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    index = meta.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            return errors + ['"model-index" must be a list']
        for entry in index:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                errors.append('"model-index[].name" must be a string')
                continue
            for result in entry.get("results") or []:
                task, dataset = result.get("task") or {}, result.get("dataset") or {}
                if not isinstance(task.get("type"), str):
                    errors.append('"model-index[].results[].task.type" is required')
                if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                    errors.append('"model-index[].results[].dataset" needs "type" and "name"')
                for metric in result.get("metrics") or []:
                    if not isinstance(metric.get("type"), str) or "value" not in metric:
                        errors.append('"model-index[].results[].metrics[]" needs "type" and "value"')
    return errors


class _Drip:
    """A writer that sends one byte every ``interval`` seconds (a Hub on a dying line)."""

    def __init__(self, raw, interval: float, released: threading.Event):
        self.raw, self.interval, self.released = raw, interval, released

    def write(self, data: bytes) -> int:
        for i in range(len(data)):
            if self.released.is_set():
                raise BrokenPipeError("the loopback Hub stopped")
            self.raw.write(data[i:i + 1])
            self.raw.flush()
            self.released.wait(self.interval)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HubServer

    def log_message(self, format, *args):  # keep test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head and getattr(self, "_drop", False):  # the connection drops mid-body
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _handle(self, method: str) -> None:
        hub = self.server_state
        url = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        with hub.lock:
            hub.requests.append((method, url.path))
        if hub.delay:
            time.sleep(hub.delay)
        faulty = hub.fault_paths in url.path
        if hub.silent and faulty:  # accept, read, never answer
            hub.released.wait(600)
            self.close_connection = True
            return
        if hub.drip and faulty:
            self.wfile = _Drip(self.wfile, hub.drip, hub.released)
        self._drop = hub.drop_mid_body and faulty
        try:
            with hub.lock:
                self._route(method, url.path, parse_qs(url.query), body)
        except HttpError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, json.dumps({"error": e.message, **e.body}).encode(), headers, head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (delay): not a server bug
            self.close_connection = True
        except Exception as e:  # a bug in this server: answer 500 and keep it for the test to see
            hub.errors.append(f"{method} {url.path}: {type(e).__name__}: {e}")
            self._send(500, json.dumps({"error": str(e)}).encode(), head=method == "HEAD")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    # -- auth ---------------------------------------------------------------------------------
    def _check_auth(self, write: bool, repo: Repo | None = None) -> None:
        token = self.server_state.token
        given = self.headers.get("Authorization")
        if token is None:
            return
        if given is not None and given != f"Bearer {token}":
            raise HttpError(401, "Invalid credentials in Authorization header")
        if given is None and (write or (repo is not None and repo.private)):
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.server_state.repos.get(repo_id)
        self._check_auth(write, repo)
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    # -- routes -------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        hub = self.server_state
        routes = [
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("POST", rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$", self._create_branch),
            ("POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", self._commit_files),
            ("GET", rf"^/api/models/{_REPO}(/revision/(?P<rev>[^/]+))?$", self._model_info),
            ("GET", rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(/(?P<sub>.*))?$", self._tree),
            ("GET", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
            ("HEAD", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
        ]
        for verb, pattern, fn in routes:
            m = re.match(pattern, path)
            if verb == method and m:
                args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                return fn(method=method, query=query, body=body, **args)
        if hub.token is not None:
            self._check_auth(write=False)
        raise HttpError(404, f"no route for {method} {path}")

    def _create_repo(self, body: bytes, **_) -> None:
        self._check_auth(write=True)
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        if payload.get("type", "model") not in (None, "model"):
            raise HttpError(400, "the loopback Hub serves model repos only")
        hub = self.server_state
        if repo_id in hub.repos:
            raise HttpError(409, "You already created this model repo", body={"url": f"{hub.url}/{repo_id}"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub.create_repo(repo_id, private)
        self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes, **_) -> None:
        payload = json.loads(body or b"{}")
        errors = validate_card_metadata(payload.get("content", ""))
        self._json(400 if errors else 200, {"errors": [{"message": m} for m in errors], "warnings": []})

    def _create_branch(self, repo: str, branch: str, body: bytes, **_) -> None:
        r = self._repo(repo, write=True)
        if branch in r.branches:
            raise HttpError(409, f"Branch {branch} already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        r.branches[branch] = self._commit(r, start).oid
        self._json(200, {})

    def _preupload(self, repo: str, rev: str, body: bytes, **_) -> None:
        r = self._repo(repo, write=True)
        head = r.resolve(unquote(rev))
        files = []
        for f in json.loads(body)["files"]:
            existing = head.files.get(f["path"]) if head else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(existing) if existing is not None else None})
        self._json(200, {"files": files, "commitOid": head.oid if head else None})

    def _commit_files(self, repo: str, rev: str, body: bytes, **_) -> None:
        hub = self.server_state
        r = self._repo(repo, write=True)
        branch = unquote(rev)
        if branch not in r.branches:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if hub.fail_next_commit:  # the whole payload arrived; fail before applying any of it
            hub.fail_next_commit = False
            raise HttpError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        parent = r.commits[r.branches[branch]]
        files, message = dict(parent.files), ""
        for entry in lines:
            key, value = entry["key"], entry["value"]
            if key == "header":
                message = value.get("summary", "")
                wanted = value.get("parentCommit")
                if wanted and not parent.oid.startswith(wanted):
                    raise HttpError(412, "A commit has happened since the parent commit")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, "file entries must be base64 encoded")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(422, f"the loopback Hub does not accept {key!r} entries (LFS/Xet are not offered)")
        oid = hub._new_oid(repo, message, *sorted(files))
        r.commits[oid] = Commit(oid, parent.oid, message, files)
        r.branches[branch] = oid
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                         "pullRequestUrl": None})

    def _model_info(self, repo: str, rev: str | None = None, **_) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev or "main")
        self._json(200, {
            "_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
            "private": r.private, "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
            "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(commit.files[p]), "blobId": git_blob_oid(commit.files[p])}
                         for p in sorted(commit.files)],
        })

    def _tree(self, repo: str, rev: str, query: dict, sub: str | None = None, **_) -> None:
        r = self._repo(repo)
        commit = self._commit(r, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = (sub.strip("/") + "/") if sub else ""
        entries, dirs = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                content = commit.files[path]
                entries.append({"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path})
        if sub and not entries and not dirs:
            raise HttpError(404, f"{sub} does not exist", "EntryNotFound")
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(dirs)]
        self._json(200, entries)

    def _resolve(self, method: str, repo: str, rev: str, file: str, **_) -> None:
        hub = self.server_state
        r = self._repo(repo)
        commit = self._commit(r, rev)
        content = commit.files.get(file)
        if content is None:
            raise HttpError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{git_blob_oid(content)}"',
                   "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status, body = 200, content
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if m and method == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(content) - 1
            body = content[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(content)}"
        if method == "GET" and hub.tamper and body and file.endswith(".safetensors"):
            body = body[:-1] + bytes([body[-1] ^ 0x40])
        if method == "GET" and hub.truncate_downloads and len(body) > 1:
            headers["Content-Length"] = str(len(body))
            self._send(status, body[: len(body) // 2], headers)
            self.close_connection = True
            return
        self._send(status, body, headers, head=method == "HEAD")
