"""Hub sources through a local stand-in for the Hugging Face hub: a threaded HTTP server on 127.0.0.1
that huggingface_hub reaches through HF_ENDPOINT, serving repos from directories and recording every
request. Plans read headers only; conversions download only the files they read; interrupted
downloads; every hub failure is one line. Everything offline, caches under tmp_path.

The endpoints and headers are the ones the installed huggingface_hub reads
(.venv/lib/python3.11/site-packages/huggingface_hub: hf_api.py model_info / resolve_revision,
file_download.py get_hf_file_metadata / http_get, utils/_http.py hf_raise_for_status):
- GET api/models/{repo}[/revision/{rev}][?blobs=true]: {"id", "sha", "siblings": [{"rfilename", "size",
  "blobId", "lfs": {"size", "sha256", "pointerSize"}}]};
- HEAD/GET {repo}/resolve/{rev}/{file}: X-Repo-Commit and ETag; LFS files (*.safetensors) answer 302 to a
  second server (the CDN, another origin, so huggingface_hub drops the token) with X-Linked-Etag (the
  SHA-256) and X-Linked-Size; Range answered with 206 and Content-Range;
- errors as X-Error-Code: RepoNotFound (401), GatedRepo (403), RevisionNotFound / EntryNotFound (404).

And what a push reaches (hf_api.py create_repo / list_repo_tree / _validate_yaml, _commit_api.py
_fetch_upload_modes / _send_commit, _upload_pipeline.py), each call recorded with what it carried:
- POST api/repos/create {"name", "organization", "visibility" (or "private")}: a new repo holding a
  .gitattributes, as the hub makes one; 409 when it exists;
- GET api/models/{repo}/tree/{rev}: [{"type": "file", "path", "size", "oid", "lfs"?}];
- POST api/models/{repo}/preupload/{rev}: every file "regular" (so the upload commits the bytes
  inline, without the Xet protocol), with the git blob id of the file the repo has, so an unchanged
  file is not committed again;
- POST api/validate-yaml: no errors;
- POST api/models/{repo}/commit/{rev}: NDJSON "header", "file" (base64) and "deletedFile" lines,
  applied to the repo's directory, which gets a new commit.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardquant import testing
from shardquant.cli import main
from shardquant.source import INDEX_NAME
from shardquant.st import OutTensor, encode_header

TOKEN = "hf_standin_secret"
MANIFEST = "scale_manifest.json"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the stand-in

class Repo:
    def __init__(self, root: Path, *, private: bool = False, gated: bool = False, sha256: dict | None = None,
                 commit: str | None = None):
        self.root = root
        self.commit = commit or hashlib.sha1(str(root).encode()).hexdigest()
        self.files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        self.private, self.gated = private, gated
        self._sha = dict(sha256 or {})

    @staticmethod
    def lfs(name: str) -> bool:
        return name.endswith((".safetensors", ".bin", ".pth"))

    def sha256(self, name: str) -> str:
        if name not in self._sha:
            self._sha[name] = hashlib.sha256(self.files[name].read_bytes()).hexdigest()
        return self._sha[name]

    def oid(self, name: str) -> str:  # stands in for the git blob id
        return hashlib.sha1(f"{name}:{self.files[name].stat().st_size}".encode()).hexdigest()

    def git_oid(self, name: str) -> str:
        """The git blob id, as huggingface_hub computes it for a file it uploads (its _local_oid)."""
        data = self.files[name].read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandIn:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.faults: dict[str, tuple[str, int]] = {}  # file name -> ("drop" | "stall", after bytes), once
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.api_status: int | None = None  # answer every api/models call with this (5xx)
        # file name -> event: a whole-file GET of it (a download, not a header's range) waits for the event
        self.hold: dict[str, threading.Event] = {}
        self.fail: dict[str, int] = {}  # file name -> HTTP status for every whole-file GET of it
        self.store: Path | None = None  # where repos created by a push live (the fixture sets it)
        self.fail_commits: list[int] = []  # HTTP statuses answered to the next commits, one each, changing nothing
        self.hub = _Server(self, "hub")
        self.cdn = _Server(self, "cdn")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_port}"

    def add(self, name: str, root: Path, **kw) -> Repo:
        self.repos[name] = Repo(root, **kw)
        return self.repos[name]

    def by_sha(self, sha: str) -> tuple[Repo, str] | None:
        for r in self.repos.values():
            for n in r.files:
                if r.lfs(n) and r.sha256(n) == sha:
                    return r, n
        return None

    def take_fault(self, name: str, at: int):
        """The fault set for `name` if this response reaches its byte count (then it is used up)."""
        with self.lock:
            fault = self.faults.get(name)
            if fault is not None and at > fault[1]:
                return self.faults.pop(name)
            return None

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def requests(self) -> list[dict]:
        with self.lock:
            return list(self.log)

    def sent(self) -> int:
        return sum(r["sent"] for r in self.requests())

    def calls(self, kind: str) -> list[dict]:
        """Recorded push calls of one kind ("create", "preupload", "commit"), each with its "repo" and
        "body" (what it carried) and "status"."""
        return [r for r in self.requests() if r.get("call") == kind]

    def commit_to(self, repo_id: str, added: dict[str, bytes], deleted: list[str]) -> str:
        """Apply a commit to the repo's directory; its new commit id."""
        with self.lock:
            r = self.repos[repo_id]
            for name in deleted:
                (r.root / name).unlink()
            for name, data in added.items():
                (r.root / name).parent.mkdir(parents=True, exist_ok=True)
                (r.root / name).write_bytes(data)
            commit = hashlib.sha1(f"{r.commit}:{sorted(added)}:{deleted}:{time.monotonic_ns()}".encode()).hexdigest()
            self.repos[repo_id] = Repo(r.root, private=r.private, commit=commit)
            return commit

    def stop(self) -> None:
        self.release.set()
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, stand: StandIn, kind: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stand, self.kind = stand, kind
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle_error(self, request, client_address):  # a client killed mid-response: expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._handle(body=False)

    def do_GET(self):
        self._handle(body=True)

    def do_POST(self):
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        stand: StandIn = self.server.stand
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
        rec = {"server": self.server.kind, "method": self.command, "path": urllib.parse.unquote(url.path),
               "file": None, "range": self.headers.get("Range"), "auth": self.headers.get("Authorization"),
               "status": None, "sent": 0, "t0": time.monotonic(), "t1": None}
        with stand.lock:
            stand.log.append(rec)
        try:
            if self.server.kind == "cdn":
                self._cdn(stand, parts, rec, body)
            elif self.command == "POST":
                self._post(stand, parts, rec)
            elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                self._tree(stand, "/".join(parts[2:4]), parts[5], rec)
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(stand, parts[2:], urllib.parse.parse_qs(url.query), rec)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(stand, parts, rec, body)
            else:
                self._reply(rec, 404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        rec["t1"] = time.monotonic()  # the response sent (or abandoned)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _reply(self, rec: dict, status: int, obj: object, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        rec["status"] = status
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            rec["sent"] += len(data)

    def _repo_or_error(self, stand: StandIn, repo_id: str, rev: str, rec: dict, files: bool) -> Repo | None:
        r = stand.repos.get(repo_id)
        if r is None or (r.private and not self._authorized()):
            self._reply(rec, 401, {"error": "Repository not found"},
                        {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        if files and r.gated and not self._authorized():
            self._reply(rec, 403, {"error": "gated"}, {
                "X-Error-Code": "GatedRepo",
                "X-Error-Message": f"Access to model {repo_id} is restricted and you are not in the authorized list."})
            return None
        if rev not in ("main", r.commit):
            self._reply(rec, 404, {"error": "Invalid rev id"},
                        {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: " + rev})
            return None
        return r

    def _api(self, stand: StandIn, parts: list[str], query: dict, rec: dict) -> None:
        if stand.api_status is not None:
            self._reply(rec, stand.api_status, {"error": "Service Unavailable"})
            return
        repo_id = "/".join(parts[:2])
        rev = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
        r = self._repo_or_error(stand, repo_id, rev, rec, files=False)
        if r is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for n, p in r.files.items():
            s = {"rfilename": n}
            if blobs:
                s.update(size=p.stat().st_size, blobId=r.oid(n))
                if r.lfs(n):
                    s["lfs"] = {"size": p.stat().st_size, "sha256": r.sha256(n), "pointerSize": 134}
            siblings.append(s)
        self._reply(rec, 200, {"id": repo_id, "sha": r.commit, "private": r.private,
                               "gated": "manual" if r.gated else False, "siblings": siblings})

    def _tree(self, stand: StandIn, repo_id: str, rev: str, rec: dict) -> None:
        r = self._repo_or_error(stand, repo_id, rev, rec, files=False)
        if r is None:
            return
        out = []
        for n, p in r.files.items():
            e = {"type": "file", "path": n, "size": p.stat().st_size, "oid": r.oid(n)}
            if r.lfs(n):
                e["lfs"] = {"oid": r.sha256(n), "size": p.stat().st_size, "pointerSize": 134}
            out.append(e)
        self._reply(rec, 200, out)

    def _post(self, stand: StandIn, parts: list[str], rec: dict) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if parts == ["api", "validate-yaml"]:
            self._reply(rec, 200, {"errors": [], "warnings": []})
            return
        if not self._authorized():
            self._reply(rec, 401, {"error": "Invalid credentials in Authorization header"})
            return
        if parts == ["api", "repos", "create"]:
            self._create(stand, json.loads(data), rec)
            return
        if parts[:2] != ["api", "models"] or len(parts) < 6 or parts[4] not in ("preupload", "commit"):
            self._reply(rec, 404, {"error": "not found"})
            return
        repo_id, rev = "/".join(parts[2:4]), parts[5]
        rec.update(call=parts[4], repo=repo_id)
        r = self._repo_or_error(stand, repo_id, rev, rec, files=False)
        if r is None:
            return
        if parts[4] == "preupload":
            files = json.loads(data)["files"]
            rec["body"] = [f["path"] for f in files]
            self._reply(rec, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": r.git_oid(f["path"]) if f["path"] in r.files else None} for f in files]})
            return
        lines = [json.loads(ln) for ln in data.splitlines() if ln.strip()]
        added = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines if ln["key"] == "file"}
        deleted = [ln["value"]["path"] for ln in lines if ln["key"] == "deletedFile"]
        rec["body"] = {"summary": lines[0]["value"]["summary"], "added": sorted(added), "deleted": sorted(deleted)}
        if stand.fail_commits:
            self._reply(rec, stand.fail_commits.pop(0), {"error": "Insufficient storage"})
            return
        commit = stand.commit_to(repo_id, added, deleted)
        self._reply(rec, 200, {"commitUrl": f"{stand.endpoint}/{repo_id}/commit/{commit}", "commitOid": commit,
                               "pullRequestUrl": None})

    def _create(self, stand: StandIn, payload: dict, rec: dict) -> None:
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        private = payload.get("visibility") == "private" or payload.get("private") is True
        rec.update(call="create", repo=repo_id, body=payload)
        if repo_id in stand.repos:
            self._reply(rec, 409, {"error": "You already created this model repo",
                                   "url": f"{stand.endpoint}/{repo_id}"})
            return
        root = stand.store / repo_id
        root.mkdir(parents=True)
        (root / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n"
                                             "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                             "*.zip filter=lfs diff=lfs merge=lfs -text\n")
        stand.add(repo_id, root, private=private)
        self._reply(rec, 200, {"url": f"{stand.endpoint}/{repo_id}", "name": repo_id})

    def _resolve(self, stand: StandIn, parts: list[str], rec: dict, body: bool) -> None:
        repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        rec["file"] = name
        r = self._repo_or_error(stand, repo_id, rev, rec, files=True)
        if r is None:
            return
        if name not in r.files:
            self._reply(rec, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": r.commit})
            return
        size = r.files[name].stat().st_size
        if r.lfs(name):  # the hub sends LFS files to its CDN
            rec["status"] = 302
            self.send_response(302)
            for k, v in {"Location": f"http://127.0.0.1:{stand.cdn.server_port}/{r.sha256(name)}",
                         "X-Repo-Commit": r.commit, "ETag": f'"{r.oid(name)}"',
                         "X-Linked-Etag": f'"{r.sha256(name)}"', "X-Linked-Size": str(size),
                         "Content-Length": "0"}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        headers = {"X-Repo-Commit": r.commit, "ETag": f'"{r.oid(name)}"'}
        if body and not self.headers.get("Range") and "gzip" in self.headers.get("Accept-Encoding", ""):
            data = gzip.compress(r.files[name].read_bytes(), mtime=0)  # as the hub serves text files
            rec["status"] = 200
            self.send_response(200)
            for k, v in {**headers, "Content-Encoding": "gzip", "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            rec["sent"] += len(data)
            return
        self._serve(stand, rec, r.files[name], name, body, headers)

    def _cdn(self, stand: StandIn, parts: list[str], rec: dict, body: bool) -> None:
        found = stand.by_sha(parts[0]) if parts else None
        if found is None:
            self._reply(rec, 404, {"error": "no such object"})
            return
        r, name = found
        rec["file"] = name
        self._serve(stand, rec, r.files[name], name, body, {"ETag": f'"{r.sha256(name)}"'})

    def _serve(self, stand: StandIn, rec: dict, path: Path, name: str, body: bool, headers: dict) -> None:
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if body and rng is None and name in stand.fail:
            self._reply(rec, stand.fail[name], {"error": "Internal failure"})
            return
        if body and rng is None and name in stand.hold:
            stand.hold[name].wait(60)
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end, status = int(a), min(int(b), size - 1) if b else size - 1, 206
        rec["status"] = status
        self.send_response(status)
        for k, v in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start + 1)}.items():
            self.send_header(k, v)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left:
                chunk = f.read(min(left, 8192))
                fault = stand.take_fault(name, rec["sent"] + len(chunk))
                if fault is not None:
                    chunk = chunk[: fault[1] - rec["sent"]]
                    self.wfile.write(chunk)
                    rec["sent"] += len(chunk)
                    self.wfile.flush()
                    if fault[0] == "stall":  # hold the connection open until the client is killed
                        stand.stalled.set()
                        stand.release.wait(60)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(chunk)
                rec["sent"] += len(chunk)
                left -= len(chunk)


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with huggingface_hub pointed at it. huggingface_hub reads HF_ENDPOINT, HF_HOME,
    HF_HUB_CACHE and HF_HUB_OFFLINE once, at import (constants.py), so the constants are patched as
    well as the environment (which subprocesses inherit)."""
    import huggingface_hub.constants as C

    stand = StandIn()
    stand.store = tmp_path / "hub-store"
    for k in list(os.environ):
        if k.startswith(("HF_", "HUGGINGFACE_")):
            monkeypatch.delenv(k)
    home = tmp_path / "hf"
    env = {"HF_ENDPOINT": stand.endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(C, "ENDPOINT", stand.endpoint)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", stand.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(C, "HF_HOME", str(home))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_TELEMETRY", True)
    yield stand
    stand.stop()


def use_cache(monkeypatch, path: Path) -> None:
    """A fresh hub cache for what follows (a second machine, or a wiped cache)."""
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(path))


SKIPPED = {  # in the repo, never downloaded
    "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth", "original/params.json",
    ".gitattributes", "notes.txt", "figures/arch.png",
}
COPIED = {"config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "tokenizer.json", "modeling_tiny.py", "LICENSE", "README.md"}


def tiny_repo(root: Path) -> Path:
    """A Qwen3-MoE-shaped checkpoint in 5 shards, with the files a hub repo has beside it."""
    testing.write_checkpoint(root, testing.qwen3_moe(), shard_bytes=80_000, extra_files={
        "tokenizer.json": json.dumps({"model": {"type": "BPE"}}) + "\n",
        "modeling_tiny.py": "# custom code\n", "LICENSE": "Apache-2.0\n", "README.md": "# tiny\n",
        ".gitattributes": "*.safetensors filter=lfs\n", "notes.txt": "not part of the model\n"})
    shards = sorted(root.glob("model-*.safetensors"))
    (root / "consolidated.safetensors").write_bytes(b"".join(p.read_bytes() for p in shards[:2]))
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (root / "original").mkdir()
    (root / "original" / "consolidated.00.pth").write_bytes(b"\x80\x04pickle")
    (root / "original" / "params.json").write_text("{}\n")
    (root / "figures").mkdir()
    (root / "figures" / "arch.png").write_bytes(b"\x89PNG")
    return root


@pytest.fixture
def tiny(hub, tmp_path):
    return hub.add("org/tiny", tiny_repo(tmp_path / "repo-tiny"))


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def shard_names(repo: Repo) -> list[str]:
    return sorted(set(json.loads((repo.root / INDEX_NAME).read_text())["weight_map"].values()))


def header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def fetched(stand: StandIn) -> set[str]:
    """Files whose bytes were served whole (no Range)."""
    return {r["file"] for r in stand.requests() if r["method"] == "GET" and r["file"] and not r["range"]
            and r["status"] == 200}


def one_line_error(r, repo: str) -> str:
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {repo}"), r.output
    assert "Traceback" not in r.output
    return lines[0]


# ---------------------------------------------------------------------------------------------
# plan: headers only

def test_plan_reads_only_index_config_and_headers(hub, tiny):
    t0 = time.perf_counter()
    r = cli("plan", "org/tiny", "--format", "nvfp4")
    took = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    reqs = hub.requests()
    shards = shard_names(tiny)
    # every shard: two ranges (the length, then the header), never its data
    for s in shards:
        got = [q for q in reqs if q["file"] == s and q["method"] == "GET"]
        assert [q["range"] for q in got if q["server"] == "cdn"] == [
            "bytes=0-7", f"bytes=8-{header_bytes(tiny.files[s]) - 1}"], (s, got)
        assert sum(q["sent"] for q in got) == header_bytes(tiny.files[s])
    assert fetched(hub) == {INDEX_NAME, "config.json"}
    assert not {q["file"] for q in reqs} & SKIPPED
    total = sum(tiny.files[s].stat().st_size for s in shards)
    served = hub.sent()
    small = sum(q["sent"] for q in reqs if q["file"] in (INDEX_NAME, "config.json"))  # gzip-compressed
    api = sum(q["sent"] for q in reqs if q["path"].startswith("/api/"))  # the revision and the file list
    assert served - api - small == sum(header_bytes(tiny.files[s]) for s in shards) and api < 8192
    assert small < sum(tiny.files[f].stat().st_size for f in (INDEX_NAME, "config.json"))
    print(f"\ntiny plan: {len(reqs)} requests, {served} bytes served of a {total}-byte checkpoint, {took:.2f} s")
    # nothing of the weights is in the cache
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not [p for p in cache.rglob("*.safetensors")]
    # the plan says what a conversion would fetch, and what it needs
    need = sum(tiny.files[f].stat().st_size for f in shards + sorted(COPIED - {"config.json"}))  # index, config: cached
    assert f"download: {need / 1e6:.2f} MB" in r.output, r.output
    assert "disk needed:" in r.output and "estimated time:" in r.output and "estimated peak memory:" in r.output
    assert "consolidated.safetensors" in r.output  # the warning names what is left out


def test_dry_run_downloads_nothing(hub, tiny, tmp_path):
    r = cli("convert", "org/tiny", "--format", "fp8", "-o", str(tmp_path / "out"), "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert fetched(hub) == {INDEX_NAME, "config.json"}
    assert all(q["range"] for q in hub.requests() if q["server"] == "cdn")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# convert: exactly the files it reads

def test_convert_downloads_exactly_what_it_reads(hub, tiny, tmp_path):
    out = tmp_path / "out"
    r = cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    shards = set(shard_names(tiny))
    assert fetched(hub) == shards | COPIED | {INDEX_NAME}
    assert not {q["file"] for q in hub.requests()} & SKIPPED
    assert all(q["auth"] is None for q in hub.requests() if q["server"] == "cdn")
    # the same bytes as converting the directory itself; the manifest names the repo and commit
    local = tmp_path / "local"
    assert cli("convert", str(tiny.root), "--format", "nvfp4", "-o", str(local), "-q", "--device", "cpu").exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in local.iterdir() if p.name != "notes.txt")  # hub: copies WANTED only
    for n in names:
        if n not in (MANIFEST, "README.md"):  # these two name the source
            assert (out / n).read_bytes() == (local / n).read_bytes(), n
    man = json.loads((out / MANIFEST).read_text())
    assert (man["source"]["repo"], man["source"]["revision"], man["source"]["path"]) == ("org/tiny", tiny.commit, None)
    assert all(v["checked_against_hub"] for k, v in man["source"]["files"].items() if k.endswith(".safetensors"))
    # a second run: everything is cached, nothing is downloaded
    hub.clear()
    out2 = tmp_path / "out2"
    assert cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out2), "-q", "--device", "cpu").exit_code == 0
    assert fetched(hub) == set()
    assert not [q for q in hub.requests() if q["server"] == "cdn"]


def test_offline_plan_and_convert_from_the_cache(hub, tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    assert cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(tmp_path / "a"), "-q", "--device", "cpu").exit_code == 0
    hub.clear()
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    r = cli("plan", "org/tiny", "--format", "nvfp4")
    assert r.exit_code == 0, r.output
    assert "download: 0.00 MB" in r.output
    assert cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(tmp_path / "b"), "-q", "--device", "cpu").exit_code == 0
    r = cli("verify", str(tmp_path / "b"), "--source", "org/tiny", "-q")  # every tensor against the cached source
    assert r.exit_code == 0, r.output
    assert hub.requests() == []
    for p in (tmp_path / "a").iterdir():
        assert (tmp_path / "b" / p.name).read_bytes() == p.read_bytes(), p.name


def test_private_repo_with_token(hub, tmp_path, monkeypatch):
    hub.add("org/private", tiny_repo(tmp_path / "repo-private"), private=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = cli("convert", "org/private", "--format", "nvfp4", "-o", str(tmp_path / "out"), "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert all(q["auth"] == f"Bearer {TOKEN}" for q in hub.requests() if q["server"] == "hub")
    assert all(q["auth"] is None for q in hub.requests() if q["server"] == "cdn")  # never sent off the hub


# ---------------------------------------------------------------------------------------------
# interrupted downloads

def _reference(hub, tmp_path, monkeypatch) -> Path:
    use_cache(monkeypatch, tmp_path / "cache-ref")
    ref = tmp_path / "ref"
    assert cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(ref), "-q", "--device", "cpu").exit_code == 0
    hub.clear()
    return ref


def _same_dirs(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert (b / p.name).read_bytes() == p.read_bytes(), p.name


def test_connection_dropped_mid_file_resumes(hub, tiny, tmp_path, monkeypatch):
    """The server closes the connection half-way through a shard, once: huggingface_hub asks again
    from the bytes it has written (a Range request), and the output is byte-identical. It writes in
    DOWNLOAD_CHUNK_SIZE pieces (10 MB), so a drop loses up to that much; scaled down here to 8 KiB
    to match these small shards."""
    import huggingface_hub.constants as C

    ref = _reference(hub, tmp_path, monkeypatch)
    use_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(C, "DOWNLOAD_CHUNK_SIZE", 8192)
    victim = shard_names(tiny)[2]
    size = tiny.files[victim].stat().st_size
    half = size // 2 // 8192 * 8192
    hub.faults[victim] = ("drop", half)
    out = tmp_path / "out"
    r = cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    gets = [q for q in hub.requests() if q["file"] == victim and q["method"] == "GET" and q["server"] == "cdn"]
    body = [(q["range"], q["sent"]) for q in gets if q["range"] is None or not q["range"].startswith(("bytes=0-7", "bytes=8-"))]
    assert body == [(None, half), (f"bytes={half}-", size - half)], gets
    _same_dirs(ref, out)


def test_killed_download_resumes(hub, tiny, tmp_path, monkeypatch):
    """A conversion killed while a shard downloads: the next run keeps every file that was complete
    and fetches the rest (huggingface_hub 2 keeps no partial file across processes: the interrupted
    file starts over), and writes the same bytes as an uninterrupted run."""
    ref = _reference(hub, tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    use_cache(monkeypatch, cache)
    victim = shard_names(tiny)[3]
    hub.faults[victim] = ("stall", tiny.files[victim].stat().st_size // 2)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "shardquant.cli", "convert", "org/tiny", "--format", "nvfp4",
                          "-o", str(out), "-q", "--device", "cpu"], cwd=ROOT, env=dict(os.environ),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert hub.stalled.wait(30), p.communicate(timeout=5)[0]
    finally:
        p.kill()
        p.wait()
    hub.release.set()
    snap = cache / "models--org--tiny" / "snapshots" / tiny.commit
    complete = {n for n in tiny.files if (snap / n).exists()}
    assert victim not in complete and INDEX_NAME in complete
    assert not (out / INDEX_NAME).exists()
    hub.clear()
    r = cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    again = fetched(hub)
    assert victim in again and not again & complete, (again, complete)
    _same_dirs(ref, out)
    orphans = sorted(p.name for p in (cache / "models--org--tiny" / "blobs").glob("*.incomplete"))
    print(f"\nkilled mid-{victim}: {len(complete)} files kept from the cache, {sorted(again)} fetched again; "
          f"{len(orphans)} temporary file(s) of the killed process left in the cache's blobs/")


# ---------------------------------------------------------------------------------------------
# downloads and conversion overlap (shardquant/hub.py Downloads, shardquant/convert.py)

JOURNAL = ".shardquant-journal.json"


def read_order(repo: Repo, **kw) -> list[str]:
    """The source shards in the order the conversion first reads them (the order they are downloaded)."""
    from shardquant.convert import _read_order, prepare

    return _read_order(prepare(str(repo.root), "nvfp4", **kw))


def test_conversion_starts_before_the_download_ends(hub, tiny, tmp_path, monkeypatch):
    """The last shard's download is held on the server until the output's first shard is being
    written: a conversion that waited for the whole repo would never get there. Its reads of that
    shard come after the release, and the output is the local conversion's, byte for byte."""
    from shardquant import pipeline
    from shardquant.convert import convert

    last = read_order(tiny)[-1]
    hub.hold[last] = threading.Event()
    reads: list[tuple[float, str]] = []
    read_raw = pipeline.read_raw

    def timed(info, *how):
        reads.append((time.monotonic(), info.file.name))
        return read_raw(info, *how)

    monkeypatch.setattr(pipeline, "read_raw", timed)
    out = tmp_path / "out"
    result: dict = {}

    def go():
        try:
            result["res"] = convert("org/tiny", out, "nvfp4", device="cpu")
        except BaseException as e:  # looked at below
            result["error"] = e

    t0 = time.monotonic()
    worker = threading.Thread(target=go)
    worker.start()
    seen = None
    while seen is None and worker.is_alive() and time.monotonic() < t0 + 30:
        if out.is_dir():
            seen = next((p.name for p in out.iterdir() if p.name.endswith(".sqtmp") and ".safetensors." in p.name), None)
        time.sleep(0.005)
    released = time.monotonic()
    hub.hold[last].set()
    worker.join(60)
    assert seen is not None and "error" not in result, result
    gets = [q for q in hub.requests() if q["file"] == last and q["method"] == "GET" and q["range"] is None]
    assert len(gets) == 1 and gets[0]["status"] == 200
    end = gets[0]["t1"]
    first = reads[0][0]
    assert first < released < end
    assert min(t for t, n in reads if n == last) > released  # never read before it was complete
    starts = {q["file"]: q["t0"] for q in hub.requests() if q["method"] == "GET" and q["range"] is None and q["file"]}
    print(f"\noverlap: first shard download started {starts[read_order(tiny)[0]] - t0:.3f} s, first read "
          f"{first - t0:.3f} s, output temporary {seen} seen {released - t0:.3f} s, {last} download ended "
          f"{end - t0:.3f} s, first read of it {min(t for t, n in reads if n == last) - t0:.3f} s, "
          f"done {time.monotonic() - t0:.3f} s")
    local = tmp_path / "local"
    assert cli("convert", str(tiny.root), "--format", "nvfp4", "-o", str(local), "-q", "--device", "cpu").exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in local.iterdir() if p.name != "notes.txt")
    for n in names:
        if n not in (MANIFEST, "README.md"):  # these two name the source
            assert (out / n).read_bytes() == (local / n).read_bytes(), n
    man = json.loads((out / MANIFEST).read_text())
    assert all(v["checked_against_hub"] for k, v in man["source"]["files"].items() if k.endswith(".safetensors"))


def test_refused_output_is_found_before_any_download(hub, tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("someone else's\n")
    line = one_line_error(cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "-q", "--device", "cpu"),
                          str(out))
    assert "not empty" in line
    assert fetched(hub) == {INDEX_NAME, "config.json"}  # the plan's; no shard, no copied file
    assert not [q for q in hub.requests() if q["method"] == "GET" and q["file"] in shard_names(tiny) and not q["range"]]
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_finished_output_downloads_nothing(hub, tiny, tmp_path, monkeypatch):
    """A re-run onto a finished output from a machine without the weights: checked, nothing fetched
    (the output's record names the hub files by size and SHA-256, shardquant/journal.py recipe)."""
    out = tmp_path / "out"
    assert cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "-q", "--device", "cpu").exit_code == 0
    use_cache(monkeypatch, tmp_path / "empty-cache")
    hub.clear()
    r = cli("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "--device", "cpu")
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    assert fetched(hub) == {INDEX_NAME, "config.json"}


def test_download_failure_mid_conversion_is_one_line(hub, tiny, tmp_path):
    """The last shard's download fails while the first shards convert: one line naming the file;
    the run is resumable, and a second run finishes it."""
    order = read_order(tiny, max_shard_size=40_000)
    victim = order[-1]
    hub.fail[victim] = 403
    out = tmp_path / "out"
    args = ("convert", "org/tiny", "--format", "nvfp4", "-o", str(out), "-q", "--device", "cpu",
            "--max-shard-size", "40KB")
    line = one_line_error(cli(*args), f"org/tiny/{victim}")
    assert "HTTP 403" in line, line
    print(f"\nmid-conversion download failure: {line}")
    assert (out / JOURNAL).exists() and not (out / INDEX_NAME).exists()
    assert {q["file"] for q in hub.requests() if q["method"] == "GET" and not q["range"] and q["status"] == 200} \
        >= set(order[:-1])
    del hub.fail[victim]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    local = tmp_path / "local"
    assert cli("convert", str(tiny.root), *args[2:5], str(local), *args[6:]).exit_code == 0
    for p in out.iterdir():
        if p.name not in (MANIFEST, "README.md"):
            assert (local / p.name).read_bytes() == p.read_bytes(), p.name


def test_killed_mid_conversion_resumes(hub, tiny, tmp_path, monkeypatch):
    """Killed while the last shard downloads and the first output shards are already written: the
    re-run keeps those shards (not rewritten), downloads only what the cache lacks, and the output is
    an uninterrupted run's."""
    opts = ("--format", "nvfp4", "-q", "--device", "cpu", "--max-shard-size", "40KB")
    use_cache(monkeypatch, tmp_path / "cache-ref")
    ref = tmp_path / "ref"
    assert cli("convert", "org/tiny", "-o", str(ref), *opts).exit_code == 0
    hub.clear()
    cache = tmp_path / "cache"
    use_cache(monkeypatch, cache)
    victim = read_order(tiny, max_shard_size=40_000)[-1]
    hub.faults[victim] = ("stall", tiny.files[victim].stat().st_size // 2)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "shardquant.cli", "convert", "org/tiny", "-o", str(out), *opts],
                         cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    finished: dict[str, tuple] = {}
    try:
        assert hub.stalled.wait(30), p.communicate(timeout=5)[0]
        deadline = time.monotonic() + 30
        while not finished and time.monotonic() < deadline:
            try:
                files = json.loads((out / JOURNAL).read_text())["files"]
            except (OSError, ValueError):
                files = {}
            finished = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n, rec in files.items()
                        if rec and n.endswith(".safetensors")}
            time.sleep(0.01)
    finally:
        p.kill()
        p.wait()
    hub.release.set()
    assert finished, "no output shard was finished while the last source shard downloaded"
    assert not (out / INDEX_NAME).exists()
    snap = cache / "models--org--tiny" / "snapshots" / tiny.commit
    complete = {n for n in tiny.files if (snap / n).exists()}
    assert victim not in complete
    hub.clear()
    r = cli("convert", "org/tiny", "-o", str(out), *opts)
    assert r.exit_code == 0, r.output
    again = fetched(hub)
    assert victim in again and not again & complete, (again, complete)
    for n, ident in finished.items():  # kept, not written again
        assert ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) == ident, n
    _same_dirs(ref, out)
    print(f"\nkilled while {victim} downloaded: {sorted(finished)} already finished and kept; "
          f"fetched again: {sorted(again)}")


def test_ctrl_c_while_waiting_for_a_download(hub, tiny, tmp_path):
    """Ctrl-C while the conversion waits for a shard still downloading: one line, status 130, at once."""
    import signal

    victim = read_order(tiny)[-1]
    hub.faults[victim] = ("stall", tiny.files[victim].stat().st_size // 2)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "shardquant.cli", "convert", "org/tiny", "--format", "nvfp4",
                          "-o", str(out), "-q", "--device", "cpu"], cwd=ROOT, env=dict(os.environ),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert hub.stalled.wait(30), p.communicate(timeout=5)[0]
        deadline = time.monotonic() + 30
        while not list(out.glob(".model-*.sqtmp")) and time.monotonic() < deadline:  # converting
            time.sleep(0.01)
        time.sleep(0.3)  # now waiting for the stalled shard
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        text = p.communicate(timeout=10)[0].decode()
        took = time.monotonic() - t
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 130, text
    assert text.strip().startswith("interrupted") and len(text.strip().splitlines()) == 1, text
    assert took < 1.5, took
    print(f"\nCtrl-C while waiting for {victim}: exited in {took:.2f} s: {text.strip()}")


# ---------------------------------------------------------------------------------------------
# hub failures: one line each, through the real HTTP path

def test_gated_repo(hub, tmp_path):
    hub.add("org/gated", tiny_repo(tmp_path / "repo-gated"), gated=True)
    line = one_line_error(cli("plan", "org/gated", "--format", "nvfp4"), "org/gated")
    assert "gated repo; accept its terms on the hub and set HF_TOKEN" in line


def test_private_or_missing_repo(hub, tmp_path):
    hub.add("org/private", tiny_repo(tmp_path / "repo-private"), private=True)
    for repo in ("org/private", "org/missing"):
        line = one_line_error(cli("convert", repo, "--format", "nvfp4", "-o", str(tmp_path / "out")), repo)
        assert "repo not found or not accessible" in line and "HF_TOKEN" in line
    assert not (tmp_path / "out").exists()


def test_revision_not_found(hub, tiny):
    line = one_line_error(cli("plan", "org/tiny", "--format", "nvfp4", "--revision", "v9"), "org/tiny")
    assert "revision 'v9' does not exist on the hub" in line


def test_server_error(hub, tiny):
    hub.api_status = 503
    line = one_line_error(cli("plan", "org/tiny", "--format", "nvfp4"), "org/tiny")
    assert "HTTP 503" in line and "server error" in line and "try again later" in line


def test_hub_unreachable_and_offline(hub, tiny, monkeypatch):
    import huggingface_hub.constants as C

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(C, "ENDPOINT", dead)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    line = one_line_error(cli("plan", "org/tiny", "--format", "nvfp4"), "org/tiny")
    assert "cannot be reached" in line and "ConnectError" in line
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    line = one_line_error(cli("plan", "org/tiny", "--format", "nvfp4"), "org/tiny")
    assert "not in the local cache" in line and "HF_HUB_OFFLINE" in line


def test_index_naming_a_missing_shard(hub, tiny):
    tiny.files.pop(shard_names(tiny)[1])
    line = one_line_error(cli("plan", "org/tiny", "--format", "nvfp4"), "org/tiny")
    assert "names shard" in line and "which the repo does not have" in line


# ---------------------------------------------------------------------------------------------
# a DeepSeek-V3-sized repo (1.3 TB of bf16, all holes) planned through the stand-in

def deepseek_v3_full() -> testing.Model:
    """shared/LAYOUTS.md: hidden 7168, 61 layers (3 dense) + 1 MTP layer, 256 routed experts of 2048,
    MLA q_lora 1536, kv_lora 512, 128 heads (nope 128, rope 64, v 128), vocab 129280."""
    return testing.deepseek_v3(hidden=7168, layers=61, dense_layers=3, experts=256, inter=2048, dense_inter=18432,
                               vocab=129280, q_lora=1536, kv_lora=512, rope=64, nope=128, v_dim=128, heads=128, mtp=1)


def sparse_checkpoint(root: Path, model: testing.Model, shard_bytes: int) -> dict[str, str]:
    """Real headers, index and config; every tensor's data a hole (the file truncated to its size),
    so the checkpoint costs a few MB of disk. Returns fake LFS SHA-256s (nothing is downloaded)."""
    root.mkdir(parents=True)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for n, d, sh in model.specs:
        t = OutTensor(n, d, sh)
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    weight_map, sha = {}, {}
    for i, ts in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        head = encode_header(ts, {"format": "pt"})
        with open(root / name, "wb") as f:
            f.write(head)
            f.truncate(len(head) + sum(t.nbytes for t in ts))
        weight_map.update({t.name: name for t in ts})
        sha[name] = hashlib.sha256(name.encode()).hexdigest()
    index = {"metadata": {"total_size": sum(t.nbytes for ts in shards for t in ts)}, "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    (root / "tokenizer.json").write_text("{}\n")
    return sha


def test_deepseek_v3_sized_plan_is_a_few_mb(hub, tmp_path):
    repo = tmp_path / "repo-dsv3"
    sha = sparse_checkpoint(repo, deepseek_v3_full(), 8 * 10**9)
    r = hub.add("deepseek-ai/DeepSeek-V3-bf16", repo, sha256=sha)
    shards = shard_names(r)
    total = sum(r.files[s].stat().st_size for s in shards)
    assert total > 1.3e12 and len(shards) > 150
    t0 = time.perf_counter()
    res = cli("plan", "deepseek-ai/DeepSeek-V3-bf16", "--format", "nvfp4")
    took = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    reqs = hub.requests()
    served = hub.sent()
    headers = sum(header_bytes(r.files[s]) for s in shards)
    index = r.files[INDEX_NAME].stat().st_size
    index_sent = sum(q["sent"] for q in reqs if q["file"] == INDEX_NAME)
    assert all(q["range"] for q in reqs if q["file"] in shards and q["method"] == "GET")
    assert served - index_sent <= headers + 64 * 1024  # the headers, config.json and two API answers
    assert served < 8e6 and took < 20
    print(f"\nDeepSeek-V3-sized plan: {len(shards)} shards, {total / 1e12:.2f} TB; {len(reqs)} requests, "
          f"{served / 1e6:.2f} MB served: index {index_sent / 1e6:.2f} MB gzipped ({index / 1e6:.2f} MB), "
          f"headers {headers / 1e6:.2f} MB; {took:.1f} s")
    need = total + r.files["tokenizer.json"].stat().st_size  # index and config.json: cached by the plan
    assert f"download: {need / 1e12:.2f} TB ({len(shards) + 1} of the {len(shards) + 3} files" in res.output, res.output
    assert "estimated time:" in res.output
    print("\n".join(l for l in res.output.splitlines() if l.startswith(("download", "disk", "estimated", "total"))))
