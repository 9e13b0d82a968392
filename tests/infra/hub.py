"""A stand-in for huggingface.co: a real HTTP server on loopback that speaks enough of the Hugging Face hub's API for
`huggingface_hub` (pointed at it by `HF_ENDPOINT`) to check access, describe a repository and download a snapshot.

No machine here reaches the internet, so this is the one hand-written stand-in of the hub path; everything on the
client side is the real `huggingface_hub` the trainer uses. What it serves is what that client (2.x) requests, read
from its code (`HfApi.auth_check`, `model_info`, `list_repo_tree`, `get_hf_file_metadata`, `http_get`):

- `GET /api/models/<repo>/auth-check`: 200, or the refusals below;
- `GET /api/models/<repo>[/revision/<rev>]`: the model info (`sha`, `gated`, `siblings`, with `?blobs=true` sizes,
  git blob ids and LFS SHA-256s);
- `GET /api/models/<repo>/tree/<rev>[/<path>]`: the file list (`type`, `path`, `size`, `oid`, `lfs`);
- `HEAD`/`GET /<repo>/resolve/<rev>/<path>`: the file, with `X-Repo-Commit`, `ETag` (the blob id, or the SHA-256
  of an LFS file), `Content-Length`, byte ranges.

Access as the hub answers it (messages as huggingface.co words them, seen in users' reports): a token the hub does
not know gets 401 "Invalid credentials in Authorization header" on any request; a gated repository's metadata is
public, its files and access check are not — 401 `GatedRepo` without a token ("... You must have access to it and be
authenticated to access it. Please log in."), 403 `GatedRepo` for a token whose user has not been granted access
("... is restricted and you are not in the authorized list. Visit ... to ask for access."); an unknown repository
is `RepoNotFound` (401 anonymous, 404 authenticated), an unknown revision `RevisionNotFound`. Files of
`*.safetensors`, `*.bin`, `*.model` are served as LFS files. Every request is recorded (`requests`), so a test can
tell that a pod asked nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt")
PUBLIC_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class HubFile:
    path: str
    source: Path
    size: int
    blob_id: str  # git's blob sha1
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users allowed to download a gated repo


@dataclass
class HubRequest:
    method: str
    path: str
    status: int
    user: str | None
    at: float = field(default_factory=time.time)  # wall clock, comparable with Kubernetes timestamps


class HubServer:
    """`HubServer().start()`; `add_repo(repo_id, folder, gated=..., granted=...)`, `add_token(token, user)`."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.tokens: dict[str, str] = {}
        self.requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_token(self, token: str, user: str) -> None:
        self.tokens[token] = user

    def add_repo(self, repo_id: str, folder: Path, gated: bool = False, granted: set[str] | None = None) -> str:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            sha256 = hashlib.sha256(data).hexdigest() if path.suffix in LFS_SUFFIXES else None
            files[relative] = HubFile(relative, path, len(data), blob_id, sha256)
        commit = hashlib.sha1("".join(f"{f.path}{f.etag}" for f in files.values()).encode()).hexdigest()
        self.repos[repo_id] = HubRepo(repo_id, files, commit, gated, set(granted or ()))
        return commit

    def grant(self, repo_id: str, user: str) -> None:
        self.repos[repo_id].granted.add(user)

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def record(self, request: HubRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def requests_for(self, repo_id: str) -> list[HubRequest]:
        with self._lock:
            return [r for r in self.requests if f"/{repo_id}/" in r.path + "/"]


class _Refusal(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        self.status, self.message, self.code = status, message, code


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: the hub records its requests itself
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    # ---- routing ----------------------------------------------------------------------------------------------

    def _serve(self, body: bool) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        user = None
        try:
            user = self._user()
            if match := _API.match(path):
                repo = self._repo(match["repo"], user)
                self._api(repo, match["rest"] or "", query, user)
            elif match := _RESOLVE.match(path):
                repo = self._repo(match["repo"], user)
                self._allowed(repo, user)
                self._file(repo, self._revision(repo, match["rev"]), match["path"], body)
            else:
                raise _Refusal(404, f"no route for {path}")
            status = 200
        except _Refusal as refusal:
            status = refusal.status
            self._refuse(refusal, body)
        self.server_hub.record(HubRequest(self.command, path, status, user))

    def _user(self) -> str | None:
        header = self.headers.get("Authorization") or ""
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        user = self.server_hub.tokens.get(token)
        if user is None:
            raise _Refusal(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, user: str | None) -> HubRepo:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            raise _Refusal(404 if user else 401, "Repository not found", "RepoNotFound")
        return repo

    def _allowed(self, repo: HubRepo, user: str | None) -> None:
        if not repo.gated:
            return
        if user is None:
            raise _Refusal(
                401,
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in.",
                "GatedRepo",
            )
        if user not in repo.granted:
            raise _Refusal(
                403,
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {PUBLIC_HUB}/{repo.repo_id} to ask for access.",
                "GatedRepo",
            )

    @staticmethod
    def _revision(repo: HubRepo, revision: str) -> str:
        if revision not in ("main", repo.commit):
            raise _Refusal(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commit

    # ---- the API ----------------------------------------------------------------------------------------------

    def _api(self, repo: HubRepo, rest: str, query: dict, user: str | None) -> None:
        if rest == "/auth-check":
            self._allowed(repo, user)
            return self._json({"access": "granted"})
        if rest == "" or rest.startswith("/revision/"):
            if rest:
                self._revision(repo, rest.removeprefix("/revision/"))
            blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
            return self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "disabled": False,
                    "gated": "manual" if repo.gated else False,
                    "library_name": "diffusers",
                    "siblings": [_sibling(f, blobs) for f in repo.files.values()],
                }
            )
        if match := re.match(r"^/tree/(?P<rev>[^/]+)(?P<path>/.*)?$", rest):
            self._revision(repo, match["rev"])
            prefix = (match["path"] or "").strip("/")
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            return self._json(_tree(repo, prefix, recursive))
        raise _Refusal(404, f"no API route for {rest}")

    def _file(self, repo: HubRepo, commit: str, path: str, body: bool) -> None:
        item = repo.files.get(path)
        if item is None:
            raise _Refusal(404, f"{path} does not exist in {repo.repo_id}", "EntryNotFound")
        data = item.source.read_bytes()
        start = 0
        if match := re.match(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = min(int(match.group(1)), len(data))
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{item.etag}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data[start:])

    def _json(self, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _refuse(self, refusal: _Refusal, body: bool) -> None:
        data = json.dumps({"error": refusal.message}).encode()
        self.send_response(refusal.status)
        if refusal.code:
            self.send_header("X-Error-Code", refusal.code)
        self.send_header("X-Error-Message", refusal.message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _lfs(item: HubFile) -> dict | None:
    return {"oid": item.sha256, "sha256": item.sha256, "size": item.size, "pointerSize": 134} if item.sha256 else None


def _sibling(item: HubFile, blobs: bool) -> dict:
    sibling: dict = {"rfilename": item.path}
    if blobs:
        sibling.update(size=item.size, blobId=item.blob_id)
        if (lfs := _lfs(item)) is not None:
            sibling["lfs"] = lfs
    return sibling


def _tree(repo: HubRepo, prefix: str, recursive: bool) -> list[dict]:
    entries, folders = [], set()
    for item in repo.files.values():
        if prefix and not item.path.startswith(prefix + "/"):
            continue
        relative = item.path[len(prefix) + 1 :] if prefix else item.path
        if "/" in relative and not recursive:
            folders.add(f"{prefix}/{relative.split('/', 1)[0]}".strip("/"))
            continue
        parts = item.path.split("/")
        folders.update("/".join(parts[:n]) for n in range(1, len(parts)) if recursive)
        entry = {"type": "file", "oid": item.blob_id, "size": item.size, "path": item.path}
        if (lfs := _lfs(item)) is not None:
            entry["lfs"] = lfs
        entries.append(entry)
    directories = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
    return directories + entries
