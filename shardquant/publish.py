"""`shardquant batch --push-to ORG`: each finished, verified output uploaded to a hub model repo.

Which jobs: those whose conversion succeeded (or was already complete) and whose output passed verify
in this batch. A failed or unverified job is never pushed, and the summary says why. The repo is
`ORG/<output directory name>`, or `ORG/<push_name>` (a zoo key: a template over {name}, {format},
{flavor}, {policy}, checked with the rest of the zoo by shardquant/batch.py load_zoo).

What is pushed is the output, with the verify results in its card:
- README.md is the output's card with this batch's verify results in its Verify section
  (shardquant/card.py with_verify). Convert writes the card before verify runs, and the output's
  manifest hashes it, so the output's own card cannot carry them;
- scale_manifest.json is the output's, with README.md's and .gitattributes' entries changed in
  its files table, so that the repo, downloaded again, passes `shardquant verify` as the output does;
- .gitattributes (the shards stored by LFS) is added: the hub puts one in every new repo, and one
  the manifest did not list would fail verify ("file-unlisted"); ours replaces it and is listed.
These are put together in a folder of the report directory (PUSH_DIR/<org>--<name>: links to the
output's files, and the three files written there), never in the output: the output's bytes and
manifest stay as convert wrote them. The folder is removed once its push succeeded.

Resuming: the upload is huggingface_hub's resumable one (shardquant/hub.py push_folder), so a push that
was stopped resumes by pushing again, sending only what the hub does not have. A push that succeeded is
recorded in the report directory (RECORD_NAME: repo id -> commit, and the SHA-256 of the output's
manifest, which covers every file of the output). A later batch pushes that repo again only if the
output changed since. So an output skipped as complete whose push did not finish is pushed, and one
whose push did is not (remove its entry from the record to push it again).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ShardquantError

PUSH_DIR = "shardquant-batch-push"  # in the report directory: one folder per repo being pushed
RECORD_NAME = "shardquant-batch-pushed.json"  # in the report directory: the pushes that succeeded
GITATTRIBUTES = ".gitattributes"
# LFS for the files a conversion writes or copies that are binary: the shards, sentencepiece models
GITATTRIBUTES_TEXT = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.model filter=lfs diff=lfs merge=lfs -text\n"
STATUSES = ("pushed", "already pushed", "not pushed", "failed")  # a job's push["status"]


@dataclass(frozen=True)
class Push:
    org: str  # the hub namespace (user or organization) of every repo
    where: Path  # the report directory: push folders and RECORD_NAME
    private: bool = False  # repos created by the push are private


def repo_problem(repo_id: str) -> str | None:
    """Why `repo_id` (or a namespace alone) cannot name a hub repo, or None. Checked locally by
    huggingface_hub's own rule (at most 96 characters of letters, digits, '-', '_' and '.', no '--'
    or '..', no '-' or '.' at either end)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).strip().splitlines()[0]
    return None


def repo_of(push: Push, job) -> str:
    return f"{push.org}/{job.repo_name}"


# ---------------------------------------------------------------------------------------------
# what is pushed


def stage(output: Path, folder: Path, facts) -> tuple[list[str], int]:
    """Put together in `folder` what is pushed for `output`, whose verify run found `facts`
    (shardquant/card.py VerifyFacts): the output's files as links, the card with the verify results,
    the manifest that lists it, .gitattributes. Returns the files' names and their bytes. Anything
    else in `folder` is removed, but for huggingface_hub's own records (.cache)."""
    from . import card
    from .manifest import MANIFEST_NAME, dumps

    try:
        doc = json.loads((output / MANIFEST_NAME).read_bytes())
        files = dict(doc["files"])
        want = files[card.CARD_NAME]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardquantError(f"{output}/{MANIFEST_NAME}: cannot be read as shardquant's manifest ({e})") from None
    try:
        text = (output / card.CARD_NAME).read_bytes()
    except OSError as e:
        raise ShardquantError(f"{output}/{card.CARD_NAME}: cannot read ({e.strerror or e})") from None
    if hashlib.sha256(text).hexdigest() != want:
        raise ShardquantError(f"{output}/{card.CARD_NAME}: changed since the manifest was written; run the batch "
                              "again to verify the output")
    src = doc.get("source") or {}
    written = {card.CARD_NAME: card.with_verify(text.decode("utf-8"), facts, src.get("repo"),
                                                src.get("revision")).encode(),
               GITATTRIBUTES: GITATTRIBUTES_TEXT.encode()}
    for name, data in written.items():
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    # a local source's absolute path says where on this machine it lay (a user's home, a project's
    # name): the published manifest keeps its directory name only; its files' SHA-256 stay the record
    pub_src = {**src, "path": Path(src["path"]).name} if isinstance(src.get("path"), str) else src
    written[MANIFEST_NAME] = dumps({**doc, "source": pub_src, "files": dict(sorted(files.items()))}).encode()
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(files) + [MANIFEST_NAME]
    tops = {n.split("/", 1)[0] for n in names}
    for p in folder.iterdir():
        if p.name not in tops and p.name != ".cache":
            _remove(p)
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            _remove(p)
        if name in written:
            p.write_bytes(written[name])
        else:
            p.symlink_to(os.path.abspath(output / name))
    size = sum(files[n]["size"] for n in files) + len(written[MANIFEST_NAME])
    return names, size


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def manifest_sha256(output: Path) -> str | None:
    """The SHA-256 of the output's manifest (which holds every other file's), or None without one."""
    from .manifest import MANIFEST_NAME

    try:
        return hashlib.sha256((output / MANIFEST_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


def load_record(where: Path) -> dict[str, dict]:
    """The pushes that succeeded: repo id -> {"commit", "manifest_sha256", "output"}. A record that
    cannot be read counts as empty (its repos are pushed again, which sends only what changed)."""
    try:
        doc = json.loads((where / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, dict)} if isinstance(doc, dict) else {}


def _save_record(where: Path, record: dict[str, dict]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, where / RECORD_NAME)


# ---------------------------------------------------------------------------------------------
# pushing, beside the conversions


class Pusher:
    """Pushes results one after another on a thread of the batch's own process while later jobs
    convert: submit() each result as its job ends, then finish(results) to wait for them all.
    Each result gets `push` ({"repo", "status" of STATUSES, and "commit", "files", "bytes", "reason"
    or "error"}); a failed push is also the job's error. on_event("pushed", job, result) is called
    after each push, from the thread."""

    def __init__(self, push: Push, on_event=None):
        self.push, self.on_event = push, on_event
        self.record = load_record(push.where)
        self.todo: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="shardquant-batch-push", daemon=True)
        self.thread.start()

    def submit(self, result) -> None:
        self.todo.put(result)

    def finish(self, results: list) -> None:
        self.todo.put(None)
        self.thread.join()
        for r in results:  # jobs that never ended (their worker died) were never submitted
            if r.push is None:
                r.push = self._one(r)

    def _work(self) -> None:
        while (r := self.todo.get()) is not None:
            r.push = self._one(r)
            if self.on_event:
                self.on_event("pushed", r.job, r)

    def _one(self, r) -> dict:
        repo = repo_of(self.push, r.job)
        if r.status == "failed":
            return {"repo": repo, "status": "not pushed", "reason": "the job failed"}
        if r.verified is not True or r.verify_facts is None:
            return {"repo": repo, "status": "not pushed", "reason": "not verified"}
        out = Path(r.job.output)
        try:
            sha = manifest_sha256(out)
            done = self.record.get(repo)
            if sha is not None and done is not None and done.get("manifest_sha256") == sha:
                return {"repo": repo, "status": "already pushed", "commit": done.get("commit")}
            got = self._upload(r, repo, out)
            self.record[repo] = {"commit": got["commit"], "manifest_sha256": sha, "output": str(out)}
            _save_record(self.push.where, self.record)
            return got
        except ShardquantError as e:
            error = str(e)
        except OSError as e:
            error = f"{e.filename or out}: {e.strerror or e}"
        except Exception as e:  # a bug: recorded, the batch goes on
            error = f"{type(e).__name__}: {e}"
        r.error = r.error or f"push to {repo}: {error}"
        return {"repo": repo, "status": "failed", "error": error}

    def _upload(self, r, repo: str, out: Path) -> dict:
        from . import __version__, hub

        folder = self.push.where / PUSH_DIR / repo.replace("/", "--")
        from .card import VerifyFacts

        names, size = stage(out, folder, VerifyFacts(**r.verify_facts))
        commit = hub.push_folder(folder, repo, names, private=self.push.private,
                                 message=f"shardquant {__version__}: {r.job.label}")
        shutil.rmtree(folder, ignore_errors=True)
        return {"repo": repo, "status": "pushed", "commit": commit, "files": len(names), "bytes": size}


def cell(push: dict | None) -> str:
    """A job's push in one line (the summary's Markdown table, the batch's progress lines)."""
    if push is None:
        return "-"
    repo, status = push["repo"], push["status"]
    if status in ("pushed", "already pushed"):
        return f"{status} to {repo} at {str(push.get('commit'))[:12]}"
    if status == "not pushed":
        return f"not pushed ({push['reason']})"
    return f"push to {repo} FAILED: {push['error']}"


def counts(results: list) -> dict[str, int] | None:
    """How many jobs' pushes ended how (None when the batch pushed nothing)."""
    if all(r.push is None for r in results):
        return None
    return {s.replace(" ", "_"): sum(r.push is not None and r.push["status"] == s for r in results) for s in STATUSES}


def plan_line(job, plan, push: Push) -> str:
    """--dry-run: what would be pushed for a job planned as `plan`: repo id, files and bytes."""
    from .convert import finish_names

    repo = repo_of(push, job)
    sha = manifest_sha256(Path(job.output))
    done = load_record(push.where).get(repo)
    if sha is not None and done is not None and done.get("manifest_sha256") == sha:
        return f"{job.label}: already pushed to {repo} at {str(done.get('commit'))[:12]}"
    n = len(plan.shards) + len(finish_names(plan)) + 1  # and .gitattributes
    return (f"{job.label}: would push to {repo}{' (private)' if push.private else ''}: {n} files, "
            f"{_decimal(plan.output_bytes)} of weights")


def _decimal(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"
