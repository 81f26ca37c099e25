"""Hub sources: plan without downloading, then download exactly what the conversion reads.

A plan needs the index, config.json and every shard's safetensors header, nothing more. The repo's
file list (with each file's size and, for LFS files, its SHA-256) comes from one model-info call;
the index and config.json are fetched with hf_hub_download (into the hub cache, where the
conversion finds them again); each shard header is read with two HTTP range requests (its 8-byte
length, then the header) and parsed by the same strict parser as a local file (shardquant/st.py
parse_header). Revisions, tokens, HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE are all
huggingface_hub's own handling; only the range reads are written here (see _read_range).

A conversion downloads, with hf_hub_download into the same cache, the shards the index names,
config.json, tokenizer, generation and processor files, chat templates, custom code (*.py), license
and README files (WANTED): never another weight file beside them (e.g. consolidated.safetensors),
nor anything in a subfolder. Downloads and conversion overlap (Downloads): the output is claimed
first (shardquant/convert.py), then the files download in the background, small files first, then
the shards in the order the conversion first reads them, DOWNLOAD_THREADS at a time; every read of a
source file waits until that file is complete (shardquant/pipeline.py _Counter,
shardquant/provenance.py), so the conversion starts as soon as its first shard is in. Each shard's header is
checked against the plan once it is local. huggingface_hub resumes a connection dropped mid-file
within the same call (Range from the bytes it has); a file whose download was killed is downloaded
again from its start, while every file that was complete stays in the cache and is not fetched
again, and the output's journal resumes the conversion (its fingerprint names hub files by the
hub's size and SHA-256, shardquant/journal.py, so it needs no file on disk).

Pushes (`shardquant batch --push-to`, shardquant/publish.py) go through push_folder: the repo created
if missing, the folder uploaded with the installed huggingface_hub's resumable folder upload, and the
repo left holding exactly the folder's files. Every call goes through the client _api() returns.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HeaderError, ShardquantError, SourceError
from .source import (
    INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME, Checkpoint, _check_name, _read_index, _read_json, assemble,
)
from .st import TensorInfo, header_length, parse_header, read_header
from .text import show

# Besides the index and its shards, the top-level files a conversion reads (copied into the output, or
# config.json, which gains quantization_config). Anything else in the repo is not downloaded.
WANTED = (
    "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "*.model",  # sentencepiece (tokenizer.model, spiece.model)
    "*processor_config.json",  # preprocessor_config.json, processor_config.json: what a multimodal model's processor loads
    "chat_template*",  # chat_template.jinja, chat_template.json
    "*.py",  # custom code (trust_remote_code)
    "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "README*",  # terms that travel with the weights
)
HEADER_THREADS = 16  # shard headers read at once (each two small requests: latency, not bandwidth)
DOWNLOAD_THREADS = 4  # files downloaded at once, started in index order


@dataclass
class HubFiles:
    """What a conversion reads from a hub repo at one commit."""

    repo: str
    commit: str
    sizes: dict[str, int]  # file name -> bytes: the index, the shards and the WANTED files
    sha256: dict[str, str] = field(default_factory=dict)  # LFS files: the hub's SHA-256
    skipped: list[str] = field(default_factory=list)  # the repo's other files: never downloaded

    def missing_bytes(self, root: Path) -> int:
        return sum(n or 0 for f, n in self.sizes.items() if not os.path.exists(root / f))

    def missing(self, root: Path) -> list[str]:
        return [f for f in self.sizes if not os.path.exists(root / f)]


def wanted(name: str) -> bool:
    """A top-level file of the repo that the conversion copies (or rewrites: config.json)."""
    return "/" not in name and not name.startswith(".") and any(fnmatch.fnmatchcase(name, p) for p in WANTED)


def open_remote(repo: str, revision: str | None) -> Checkpoint:
    """Plan a hub checkpoint from its index, config.json and shard headers; download no weights."""
    with hub_errors(repo, revision):
        return _open_remote(repo, revision)


def download(ck: Checkpoint, progress: bool = False) -> None:
    """Download the files of a hub plan that are not in the cache yet and wait for all of them
    (`verify --source`); each shard's header is checked against the plan."""
    d = start_download(ck, progress=progress)
    try:
        d.wait_all()
    finally:
        d.close()


def check_space(ck: Checkpoint) -> None:
    """Refuse before anything is written when the hub cache cannot hold what is left to download."""
    hf = ck.hub
    assert hf is not None
    need = sum(hf.sizes[f] or 0 for f in hf.missing(ck.root))
    if need:
        where = _existing_parent(ck.root)
        free = shutil.disk_usage(where).free
        if free < need:
            raise SourceError(f"{hf.repo}: the download needs {need / 1e9:.2f} GB in the hub cache ({where}) but only "
                              f"{free / 1e9:.2f} GB are free; set HF_HUB_CACHE to a larger disk")


def start_download(ck: Checkpoint, order: list[str] = (), progress: bool = False,
                   background: bool = False) -> "Downloads":
    """Start downloading, in the background, the files of a hub plan that are not in the cache yet:
    small files first, then the shards in `order` (the order the conversion first reads them), then
    any others by name. Shards already in the cache have their header checked here."""
    check_space(ck)
    return Downloads(ck, list(order), progress and not background)


class PushError(ShardquantError):
    """A push to the hub failed: one line naming the repo, and what to do."""


def push_folder(folder: Path, repo_id: str, names: list[str], *, private: bool = False, message: str) -> str:
    """Make the hub model repo `repo_id` hold exactly the files `names` of `folder`: created if missing
    (private with `private`; an existing repo keeps its visibility), the folder uploaded by
    _upload_call's method, then any other file of the repo deleted. Returns the repo's commit
    afterwards. Calling it again after an interruption resumes the upload: files the hub has are
    not sent again. The token is huggingface_hub's own (HF_TOKEN, or the one `hf auth login` saved)."""
    from huggingface_hub import CommitOperationDelete

    api = _api()
    with push_errors(repo_id), _progress_bars(False):  # the batch prints one line per push
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if _upload_call(api) == "upload_large_folder":
            api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", private=private,
                                    print_report=False)
        else:
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message)
        extra = sorted(set(api.list_repo_files(repo_id, repo_type="model")) - set(names))
        if extra:  # an earlier push of another output, or files put there by hand
            api.create_commit(repo_id, [CommitOperationDelete(path_in_repo=f) for f in extra], repo_type="model",
                              commit_message=f"{message}: remove {len(extra)} file(s) the output does not have")
        return api.model_info(repo_id).sha


def _api():
    """The hub client of every push call (tests put a huggingface_hub 1.x-shaped one here)."""
    from huggingface_hub import HfApi

    return HfApi()


def _upload_call(api) -> str:
    """The resumable folder upload of the installed huggingface_hub. Where upload_folder is the
    streamed multi-commit upload (huggingface_hub/_upload_pipeline.py, installed 2.4.0: "Interrupted
    uploads are resumable by simply re-running the same call"; used when hf_xet is installed), it is
    that one: 2.x has no upload_large_folder, and later 1.x releases deprecate it. Before it (1.x), an
    upload_folder is one commit that starts over, and upload_large_folder is the resumable one."""
    if hasattr(api, "upload_large_folder") and not _folder_upload_resumes():
        return "upload_large_folder"
    return "upload_folder"


def _folder_upload_resumes() -> bool:
    import importlib.util

    try:
        from huggingface_hub.utils._runtime import is_xet_available
    except ImportError:
        return False
    return importlib.util.find_spec("huggingface_hub._upload_pipeline") is not None and is_xet_available()


def token_present() -> bool:
    """A hub token is set or saved (read locally: HF_TOKEN, or the file `hf auth login` writes)."""
    from huggingface_hub import get_token

    return get_token() is not None


@contextlib.contextmanager
def push_errors(repo_id: str):
    """huggingface_hub's failures while pushing as one PushError line naming the repo."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    org = repo_id.split("/", 1)[0]
    again = "run the batch again to resume the push"
    try:
        yield
    except ShardquantError:
        raise
    except OfflineModeIsEnabled:
        raise PushError(f"{repo_id}: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it") from None
    except HFValidationError as e:
        raise PushError(f"{repo_id}: not a valid hub repo id ({_first(e)})") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403, 404):
            raise PushError(f"{repo_id}: the hub refused (HTTP {status}): the token cannot write to {org} (check "
                            "HF_TOKEN or `hf auth login`, and the token's write access to that namespace)") from None
        if status is not None and status >= 500:
            raise PushError(f"{repo_id}: the hub answered HTTP {status}, a server error ({_first(e)}); "
                            f"{again}") from None
        raise PushError(f"{repo_id}: the hub refused a request (HTTP {status}: {_first(e)})") from None
    except Exception as e:  # transport errors, a file that cannot be read: one line
        raise PushError(f"{repo_id}: push failed ({type(e).__name__}: {_first(e)}); {again}") from None


class Downloads:
    """The files of a hub plan, downloading DOWNLOAD_THREADS at a time on daemon threads (as
    hf_hub_download writes them: a file appears under its name in the snapshot only once complete).
    wait(path) blocks until that file is complete and its header checked, or raises its download's
    error as one line naming it; after a failure no further file is started and waiting for any of
    them raises that failure. close() (the conversion ends, fails or is interrupted) wakes every
    waiter; files under way finish on their threads, or die with the process."""

    POLL = 0.2  # seconds between checks while waiting: Ctrl-C (shardquant/interrupt.py) is seen at once

    def __init__(self, ck: Checkpoint, order: list[str], progress: bool):
        hf = ck.hub
        assert hf is not None
        self.repo, self.commit, self.root, self.hf = hf.repo, hf.commit, ck.root, hf
        self._planned: dict[str, dict[str, TensorInfo]] = {s.name: {} for s in ck.shards}
        for t in ck.tensors.values():
            self._planned[t.file.name][t.name] = t
        self._lock = threading.Lock()
        self._events = {f: threading.Event() for f in hf.sizes}
        self._errors: dict[str, str] = {}
        self._failed: str | None = None
        self._closed = False
        todo = set(hf.missing(ck.root))
        for f, ev in self._events.items():
            if f not in todo:
                ev.set()
        for s in ck.shards:  # in the cache already: the bytes the plan was made from?
            if s.name not in todo:
                self._check(s.name)
        rank = {n: i for i, n in enumerate(order)}
        self._queue = sorted(todo, key=lambda f: (f in self._planned, rank.get(f, len(rank)), f))
        self._bars = contextlib.ExitStack()
        self._bars.enter_context(_progress_bars(progress))
        self._threads = [threading.Thread(target=self._work, name="shardquant-download", daemon=True)
                         for _ in range(min(DOWNLOAD_THREADS, len(self._queue)))]
        for t in self._threads:
            t.start()

    def _check(self, name: str) -> None:
        """A shard's size and header are the ones planned: the bytes the plan was made from are the bytes
        that will be converted."""
        if name not in self._planned:
            return
        p = self.root / name
        if os.path.getsize(p) != self.hf.sizes[name] or read_header(p) != self._planned[name]:
            raise SourceError(f"{self.repo}/{show(name, quote=False)}: the downloaded file differs from the one planned "
                              f"(size or header); delete it from the hub cache ({p}) and run again")

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._failed is not None or self._closed or not self._queue:
                    return
                name = self._queue.pop(0)
            error = None
            try:
                with hub_errors(self.repo, self.commit):
                    _fetch(self.repo, self.commit, name)
                    self._check(name)
            except ShardquantError as e:
                msg = str(e)
                head = f"{self.repo}: "
                error = (f"{self.repo}/{show(name, quote=False)}: {msg[len(head):]}" if msg.startswith(head)
                         else msg)
            except BaseException as e:  # hub_errors lets nothing else through; still one line
                error = f"{self.repo}/{show(name, quote=False)}: download failed ({type(e).__name__}: {_first(e)})"
            with self._lock:
                if error is not None:
                    self._errors[name] = error
                    if self._failed is None:
                        self._failed = error
                        for n in self._queue:  # never started: waiting for them gives this failure
                            self._errors[n] = error
                            self._events[n].set()
                        self._queue.clear()
                self._events[name].set()

    def ready(self, path) -> bool:
        """The file is complete (or not one of the hub plan's files)."""
        name = Path(path).name
        ev = self._events.get(name)
        return ev is None or (ev.is_set() and name not in self._errors)

    def wait(self, path) -> None:
        """Block until the file is complete; its download's failure as a SourceError."""
        name = Path(path).name
        ev = self._events.get(name)
        if ev is None:
            return
        while not ev.wait(self.POLL):
            pass
        error = self._errors.get(name)
        if error is not None:
            raise SourceError(error)

    def wait_all(self) -> None:
        for name in self._events:
            self.wait(self.root / name)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            for n, ev in self._events.items():
                if not ev.is_set():
                    self._errors.setdefault(n, f"{self.repo}/{show(n, quote=False)}: the download was stopped")
                    ev.set()
        self._bars.close()


def _open_remote(repo: str, revision: str | None) -> Checkpoint:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    api = HfApi()
    if hasattr(api, "resolve_revision"):  # huggingface_hub >= 1.26: also caches revision -> commit under refs/
        commit = api.resolve_revision(repo, revision=revision).resolved
    else:
        commit = api.model_info(repo, revision=revision).sha
    root = Path(constants.HF_HUB_CACHE).expanduser().resolve() / repo_folder_name(
        repo_id=repo, repo_type="model") / "snapshots" / commit
    warnings: list[str] = []
    listing, sha = _listing(api, repo, commit, root, warnings)

    def label(p: Path) -> str:
        return f"{repo}/{show(p.name, quote=False)}"

    top = {f for f in listing if "/" not in f}
    weights = sorted(f for f in top if f.endswith(".safetensors"))
    weight_map: dict[str, str] | None = None
    if INDEX_NAME in top:
        index_path = Path(_fetch(repo, commit, INDEX_NAME))
        weight_map = _read_index(index_path)
        names = sorted(set(weight_map.values()))
        for n in names:
            p = Path(n)
            if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
                raise HeaderError(f"{repo}/{INDEX_NAME}: shard path {show(n)} leaves the source directory")
            if n not in listing:
                raise HeaderError(f"{repo}/{INDEX_NAME}: names shard {show(n)}, which the repo does not have"
                                  + (f" at revision {revision}" if revision else ""))
        shard_names = names
    elif SINGLE_NAME in top:
        shard_names = [SINGLE_NAME]
    elif len(weights) == 1:
        shard_names = weights
    elif weights:
        raise SourceError(f"{repo}: {len(weights)} .safetensors files but no {INDEX_NAME}")
    elif any(f.endswith(PICKLE_SUFFIXES) for f in top):
        raise SourceError(f"{repo}: only pickle checkpoints (.bin/.pt) in this repo; shardquant never unpickles. "
                          "Use a repo that ships .safetensors")
    else:
        raise SourceError(f"{repo}: no safetensors checkpoint in this repo")
    shards = [root / n for n in shard_names]
    paths = {n: root / n for n in shard_names}

    def header(s: Path) -> tuple[dict[str, TensorInfo], int | None]:
        if os.path.isfile(s):  # already in the cache: no traffic
            h, size = read_header(s), os.path.getsize(s)
        else:
            h, size = _remote_header(repo, commit, s, listing[s.name], label(s))
        where = f"{label(s)}: header"
        for name in h:
            _check_name(name, where)
        return h, size

    headers = {}
    with ThreadPoolExecutor(min(HEADER_THREADS, len(shards)), thread_name_prefix="shardquant-header") as pool:
        for s, (h, size) in zip(shards, pool.map(header, shards)):
            headers[s] = h
            listing[s.name] = size if listing[s.name] is None else listing[s.name]
    tensors = assemble(weight_map, paths, shards, headers, label)

    config = None
    if "config.json" in top:
        config = _read_json(Path(_fetch(repo, commit, "config.json")))
    else:
        warnings.append(f"{repo} has no config.json: the output will have none, and engines need one to load it")
    unused = [f for f in weights if f not in shard_names]
    if unused:
        which = (f"{INDEX_NAME} does not name" if weight_map is not None
                 else f"only {show(shard_names[0], quote=False)} is read, not")
        listed = ", ".join(show(n) for n in unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        warnings.append(f"{repo}: {which} {listed}: not converted, not copied and not downloaded")
    extra_names = sorted(f for f in top if wanted(f) and f not in shard_names and f != INDEX_NAME)
    reads = ([INDEX_NAME] if weight_map is not None else []) + shard_names + extra_names
    hf = HubFiles(repo, commit, {f: listing[f] for f in reads}, {f: sha[f] for f in reads if f in sha},
                  sorted(f for f in listing if f not in set(reads)))
    return Checkpoint(root, tensors, shards, config, repo=repo, revision=commit,
                      extra_files=[root / f for f in extra_names], warnings=warnings, hub=hf)


def _listing(api, repo: str, commit: str, root: Path, warnings: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Every file of the repo at `commit`: {name: size}, {name: SHA-256 of LFS files}. From the hub
    (one model-info call); offline or with the hub unreachable, from the cached snapshot."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        from httpx2 import TransportError
    except ImportError:  # huggingface_hub before 2 builds on httpx
        from httpx import TransportError

    error: Exception | None = None
    if not constants.is_offline_mode():
        try:
            info = api.model_info(repo, revision=commit, files_metadata=True)
            sizes, sha = {}, {}
            for s in info.siblings or []:
                sizes[s.rfilename] = s.lfs.size if s.lfs else s.size
                if s.lfs:
                    sha[s.rfilename] = s.lfs.sha256
            return sizes, sha
        except (TransportError, OfflineModeIsEnabled) as e:
            error = e
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code < 500:
                raise
            error = e
    if not root.is_dir():  # not cached: the reason the hub could not be asked is the error
        if error is not None:
            raise error
        raise OfflineModeIsEnabled(f"{repo}: not cached")
    if error is not None:
        warnings.append(f"{repo}: the hub cannot be reached ({type(error).__name__}): planned from the cached "
                        f"snapshot {commit[:12]}")
    sizes, sha = {}, {}
    for p in sorted(root.iterdir()):
        if p.is_file():
            sizes[p.name] = p.stat().st_size
            blob = Path(os.path.realpath(p))
            if blob.parent.name == "blobs" and len(blob.name) == 64:
                sha[p.name] = blob.name
    return sizes, sha


def _fetch(repo: str, commit: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=commit)


def _remote_header(repo: str, commit: str, path: Path, size: int | None,
                   where: str) -> tuple[dict[str, TensorInfo], int | None]:
    """A hub file's safetensors header, from two range requests: its length, then the header."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo, path.name, revision=commit)
    head, total = _read_range(url, 0, 8)
    size = total if size is None else size
    if size is None:
        raise SourceError(f"{where}: the hub gives no size for this file")
    n = header_length(head, size, where)
    raw, _ = _read_range(url, 8, n)
    return parse_header(path, raw, n, size, where), size


def _read_range(url: str, start: int, length: int) -> tuple[bytes, int | None]:
    """`length` bytes of a hub file from `start`, and the file's size when the server says it.

    Written here because huggingface_hub has no call that returns raw bytes of a file's range:
    HfApi.parse_safetensors_file_metadata reads a header the same way (a GET with a Range header
    through get_session) but returns its own lenient parse without the header's length, and
    HfFileSystem adds a paths-info request per file and read-ahead buffering. Everything else is
    the library's: URL (hf_hub_url: HF_ENDPOINT, revision), headers (build_hf_headers: HF_TOKEN or
    the saved token, user agent), its shared session (proxies, redirects to the CDN, which drop the
    token), its retries on 429/5xx and dropped connections, its error types (hf_raise_for_status).
    A server that ignores Range is read only as far as needed, then the connection is closed."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{start + length - 1}"
    headers["Accept-Encoding"] = "identity"  # byte offsets are of the file itself
    with http_stream_backoff("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        hf_raise_for_status(r)
        total = None
        skip = 0
        cr = r.headers.get("Content-Range", "")
        if r.status_code == 206 and cr.startswith("bytes "):
            span, _, whole = cr[6:].partition("/")
            first = span.partition("-")[0]
            if not first.isdigit() or int(first) != start:
                raise SourceError(f"{url}: asked for bytes from {start}, got {cr!r}")
            total = int(whole) if whole.isdigit() else None
        elif r.status_code == 200:  # Range ignored: the whole file from byte 0
            skip = start
            cl = r.headers.get("Content-Length")
            total = int(cl) if cl and cl.isdigit() else None
        buf = bytearray()
        for chunk in r.iter_bytes():
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            buf += chunk
            if len(buf) >= length:
                break
    return bytes(buf[:length]), total


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    if not enabled and not was:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was:
            enable_progress_bars()


@contextlib.contextmanager
def hub_errors(repo: str, revision: str | None):
    """huggingface_hub's failures as one line naming the repo, and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, RevisionResolutionError,
    )

    offline = (f"{repo}: not in the local cache and the hub cannot be reached "
               "(HF_HUB_OFFLINE is set or the network is down); download it first or unset HF_HUB_OFFLINE")
    try:
        yield
    except ShardquantError:
        raise
    except HFValidationError as e:  # a ValueError: e.g. 'org/a..b', 'models/name-'
        raise SourceError(f"{repo}: no such directory, and not a valid hub repo id ({_first(e)})") from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo}: revision {revision!r} does not exist on the hub") from None
    except GatedRepoError:
        raise SourceError(f"{repo}: gated repo; accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{repo}: repo not found or not accessible (check the name; private repos need HF_TOKEN)"
        ) from None
    except RemoteEntryNotFoundError as e:
        raise SourceError(f"{repo}: a file listed by the hub is missing ({_first(e)})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SourceError(offline) from None
    except RevisionResolutionError as e:  # not cached, and the hub could not be asked: why it could not
        cause = e.__cause__
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            raise SourceError(_server_error(repo, cause.response.status_code, cause)) from None
        if cause is None or isinstance(cause, OfflineModeIsEnabled):
            raise SourceError(offline) from None
        raise SourceError(f"{repo}: the hub cannot be reached ({type(cause).__name__}: {_first(cause)}); "
                          "check the network and HF_ENDPOINT, or use a local copy (HF_HUB_OFFLINE=1 reads the cache)"
                          ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and status >= 500:
            raise SourceError(_server_error(repo, status, e)) from None
        raise SourceError(f"{repo}: the hub refused a request (HTTP {status}: {_first(e)})") from None
    except Exception as e:  # proxy and transport errors, a full disk: one line, and what to try
        raise SourceError(
            f"{repo}: download failed ({type(e).__name__}: {_first(e)}); check the network and HF_ENDPOINT, "
            "or use a local copy (HF_HUB_OFFLINE=1 reads the cache)"
        ) from None


def _server_error(repo: str, status: int, e: Exception) -> str:
    return (f"{repo}: the hub answered HTTP {status}, a server error ({_first(e)}); try again later, check the "
            "network and HF_ENDPOINT, or use the cache (HF_HUB_OFFLINE=1)")


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
