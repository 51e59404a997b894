"""A small HTTP server on 127.0.0.1 that answers like the Hugging Face hub, for the real client code path.

It serves the endpoints ``huggingface_hub.snapshot_download`` uses — ``/api/models/R/revision/V`` (model
info), ``/api/models/R/tree/V`` (file listing with LFS sha256 and sizes) and ``/R/resolve/V/PATH`` (HEAD
metadata, GET with Range) — and fails the way the hub fails: status codes plus the ``X-Error-Code`` /
``X-Error-Message`` headers that ``huggingface_hub.utils._http.hf_raise_for_status`` reads.

Repositories (``FakeHub.repos``):
    ``test/tiny``       public: the tiny model's files
    ``test/gated``      gated: metadata public; files 401 GatedRepo without a token, 403 GatedRepo with one
    ``test/private``    401 RepoNotFound without a token, 404 RepoNotFound with one (as the hub does)
    ``test/forbidden``  403 with the hub's fine-grained-token message
    ``test/broken``     the tiny model, but GET of the transformer weights answers 500 (a download that fails)
    anything else       404 RepoNotFound
Revisions: ``main`` and :data:`COMMIT`; any other answers 404 RevisionNotFound.
A token equal to ``BAD_TOKEN`` is rejected with 401 "Invalid credentials in Authorization header".
Served requests are recorded in ``FakeHub.requests`` (method, path, had an Authorization header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

BAD_TOKEN = "hf_rejectedTOKENvalue0000000000000"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")


def repo_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self, tiny_files: dict[str, bytes]) -> None:
        self.repos = {"test/tiny": tiny_files, "test/gated": tiny_files, "test/broken": tiny_files}
        self.broken_file = "transformer/diffusion_pytorch_model.safetensors"
        self.requests: list[tuple[str, str, bool]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- responses --------------------------------------------------------------------------------------

    @staticmethod
    def _send(h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str | None, message: str, head: bool) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head)

    def _deny(self, h, repo: str, token: str | None, is_file: bool, head: bool) -> bool:
        """Answer like the hub for the failing repos; True when a response was sent."""
        if token == BAD_TOKEN:
            self._error(h, 401, None, "Invalid credentials in Authorization header", head)
        elif repo == "test/private" or repo not in self.repos and repo != "test/forbidden":
            self._error(h, 404 if token else 401, "RepoNotFound", "Repository not found", head)
        elif repo == "test/forbidden":
            self._error(h, 403, None, "Please enable access to public gated repositories in your fine-grained "
                                      "token settings to view this repository", head)
        elif repo == "test/gated" and is_file:
            if token:
                self._error(h, 403, "GatedRepo", f"Access to model {repo} is restricted and you are not in the "
                                                 "authorized list.", head)
            else:
                self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted. You must have access to "
                                                 "it and be authenticated to access it. Please log in.", head)
        else:
            return False
        return True

    def _handle(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        auth = h.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or None
        self.requests.append((h.command, path, bool(token)))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, rest = "/".join(parts[2:4]), parts[4], parts[6:]
            if self._deny(h, repo, token, is_file=False, head=head):
                return
            if parts[5] not in ("main", COMMIT):
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {parts[5]}", head)
            files = self.repos[repo]
            if kind == "revision":
                info = {"id": repo, "sha": COMMIT, "private": False, "gated": "manual" if repo == "test/gated" else False,
                        "siblings": [{"rfilename": p} for p in files]}
                return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            prefix = "/".join(rest)
            entries = [self._tree_entry(p, data) for p, data in files.items() if p.startswith(prefix)]
            return self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, file = "/".join(parts[:2]), "/".join(parts[4:])
            if self._deny(h, repo, token, is_file=True, head=head):
                return
            data = self.repos[repo].get(file)
            if data is None:
                return self._error(h, 404, "EntryNotFound", f"{file} does not exist", head)
            if repo == "test/broken" and file == self.broken_file and not head:
                return self._error(h, 500, None, "Internal Error", head)
            sha = hashlib.sha256(data).hexdigest()
            etag = sha if file.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if file.endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": len(data)})
            start = 0
            rng = h.headers.get("Range")
            if rng and rng.startswith("bytes=") and not head:
                start = int(rng[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(h, 206, data[start:], headers)
            return self._send(h, 200, data, headers, head)
        self._error(h, 404, None, "not found", head)

    @staticmethod
    def _tree_entry(path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry
