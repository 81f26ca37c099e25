"""`shardquant batch ZOO.toml`: a list of models, each converted into several formats, as jobs.

The zoo file (TOML) has defaults at the top and one `[[model]]` table per model; each (model, format)
is one job:

    [defaults]
    formats = ["nvfp4", "fp8"]
    output = "zoo/{name}-{format}"          # {name}, {format}, {flavor}, {policy}
    expert_policy = "shared"
    push_name = "{name}-{format}"           # with --push-to ORG: the repo ORG/<push_name> (default: the output's name)

    [[model]]
    source = "Qwen/Qwen3-30B-A3B"            # a hub repo id or a local directory
    revision = "main"

    [[model]]
    source = "./models/mixtral"
    name = "mixtral"
    formats = ["nvfp4"]

The whole file is checked before anything runs, and every problem in it is reported at once with
its line. Jobs run in worker processes (one per GPU of `devices`, or `workers` on the CPU), each
paying the start-up (imports, CUDA, kernels) once for all its jobs; a job that fails is recorded
and the others go on. A job whose output is already complete and passes verify is skipped, so a
batch that was stopped resumes by running it again (an unfinished output resumes inside convert,
from its journal). The summary (JSON and Markdown) gives per job: source and output bytes, time,
GB/s, each engine's verdict, the worst SQNR and the error of a failed job. With `push`, each finished,
verified output is uploaded to a hub repo while the next jobs convert (shardquant/publish.py).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import re
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import publish
from .errors import ShardquantError
from .text import show

MODEL_KEYS = {"source": str, "name": str, "revision": str, "formats": list, "flavor": str, "expert_policy": str,
              "rules": str, "output": str, "mx_source": str,
              "scale_search": str, "push_name": str, "staging": str}
DEFAULT_KEYS = {k: t for k, t in MODEL_KEYS.items() if k not in ("source", "name", "revision")}
VERIFY_MODES = ("source", "contract", "none")
TEMPLATE_FIELDS = {"name", "format", "flavor", "policy"}  # of the output and push_name templates
URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")  # an output in an object store, through fsspec
SUMMARY_NAME = "shardquant-batch-summary"  # .json and .md beside the zoo file (or --report DIR)


class ZooError(ShardquantError):
    """The zoo file has problems: every one of them, one per line."""


@dataclass(frozen=True)
class Job:
    name: str
    source: str
    format: str
    output: str
    revision: str | None = None
    flavor: str | None = None
    expert_policy: str = "shared"
    rules: str | None = None
    line: int = 0  # the line of the job's [[model]] table in the zoo file
    mx_source: str = "cast"  # MXFP4 source weights: cast or requantize (plan.py MX_SOURCE)
    scale_search: str = "none"  # block scales by round to nearest, or searched (plan.py SCALE_SEARCH)
    push_name: str | None = None  # the hub repo's name under --push-to's namespace (None: the output's name)
    # an output URI (s3://..., gs://..., file://...: any fsspec protocol): the job converts into `stage`, a
    # local directory, verifies there, then uploads (store_output); None: `output` is a local path
    stage: str | None = None

    @property
    def options(self):
        """The job's conversion choices as the one record convert and plan take (plan.py Options)."""
        from .plan import Options

        return Options(format=self.format, revision=self.revision, expert_policy=self.expert_policy,
                       rules_file=self.rules, flavor=self.flavor, mx_source=self.mx_source,
                       scale_search=self.scale_search)

    @property
    def remote(self) -> bool:
        return self.stage is not None

    @property
    def local_output(self) -> str:
        """Where the conversion writes: the output itself, or its local stage for an output URI."""
        return self.stage or self.output

    @property
    def label(self) -> str:
        return f"{self.name}/{self.format}"

    @property
    def repo_name(self) -> str:
        return self.push_name or Path(self.output.rstrip("/")).name


@dataclass
class JobResult:
    job: Job
    status: str  # "converted", "skipped" (already complete and verified), "failed"
    seconds: float = 0.0
    source_bytes: int = 0
    output_bytes: int = 0
    engines: dict[str, str] = field(default_factory=dict)  # engine -> verdict
    worst_sqnr_db: float | None = None
    rtn_gain_db: float | None = None  # searched scales: mean SQNR gain over round to nearest
    verified: bool | None = None
    error: str | None = None
    # the verify run as shardquant/card.py VerifyFacts' fields (what a pushed card says); a dict, so that
    # the batch's process reads a worker's result without importing the card's modules
    verify_facts: dict | None = None
    push: dict | None = None  # with push: shardquant/publish.py Pusher's record of this job's push

    @property
    def gb_per_s(self) -> float | None:
        return self.source_bytes / self.seconds / 1e9 if self.status == "converted" and self.seconds > 0 else None


# ---------------------------------------------------------------------------------------------
# The zoo file


def load_zoo(path: str | Path, push_to: str | None = None) -> list[Job]:
    """The jobs of a zoo file, in file order (model by model, format by format). With `push_to` (a hub
    namespace), each job's repo id `push_to/<push name>` must be valid and its own. Raises ZooError
    listing every problem found, each with its line."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    from . import formats
    from .flavors import FLAVORS
    from .plan import MX_SOURCE, SCALE_SEARCH
    from .rules import EXPERT_POLICIES

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZooError(f"{p}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ZooError(f"{p}: not TOML ({e})") from None
    lines = text.splitlines()
    model_lines = [i + 1 for i, ln in enumerate(lines) if re.match(r"\s*\[\[\s*model\s*\]\]", ln)]
    defaults_line = next((i + 1 for i, ln in enumerate(lines) if re.match(r"\s*\[\s*defaults\s*\]", ln)), 1)
    problems: list[str] = []

    def key_line(start: int, key: str) -> int:
        """The line of `key = ...` in the table whose header is line `start` (0: the top of the file,
        before any table); else the table's own line."""
        for i in range(start, len(lines)):
            if re.match(r"\s*\[", lines[i]):
                break
            if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
                return i + 1
        return max(start, 1)

    def check(table: dict, allowed: dict, start: int, what: str) -> dict:
        good = {}
        for k, v in table.items():
            if k not in allowed:
                near = [a for a in allowed if a.replace("_", "") == k.replace("_", "").replace("-", "")]
                problems.append(f"{p}:{key_line(start, k)}: {what}: unknown key {show(k)}"
                                + (f" (did you mean {show(near[0])}?)" if near else
                                   f"; known: {', '.join(sorted(allowed))}"))
                continue
            if not isinstance(v, allowed[k]) or (k == "formats" and not all(isinstance(f, str) for f in v)):
                want = "a list of format names" if allowed[k] is list else "a string"
                problems.append(f"{p}:{key_line(start, k)}: {what}: {k} must be {want}, not {show(v)}")
                continue
            good[k] = v
        at = lambda k: key_line(start, k)  # noqa: E731
        for f in good.get("formats", []):
            if f.lower() not in formats.FORMATS:
                problems.append(f"{p}:{at('formats')}: {what}: unknown format {show(f)}; "
                                f"choose from {', '.join(formats.FORMATS)}")
        if "formats" in good and not good["formats"]:
            problems.append(f"{p}:{at('formats')}: {what}: formats is empty")
        if good.get("flavor") is not None and good["flavor"] not in FLAVORS:
            problems.append(f"{p}:{at('flavor')}: {what}: unknown flavor {show(good['flavor'])}; "
                            f"choose from {', '.join(FLAVORS)}")
        if "expert_policy" in good and good["expert_policy"] not in EXPERT_POLICIES:
            problems.append(f"{p}:{at('expert_policy')}: {what}: expert_policy must be one of "
                            f"{', '.join(EXPERT_POLICIES)}, not {show(good['expert_policy'])}")
        if "scale_search" in good and good["scale_search"] not in SCALE_SEARCH:
            problems.append(f"{p}:{at('scale_search')}: {what}: scale_search must be one of {', '.join(SCALE_SEARCH)}, "
                            f"not {show(good['scale_search'])}")
        if "mx_source" in good and good["mx_source"] not in MX_SOURCE:
            problems.append(f"{p}:{at('mx_source')}: {what}: mx_source must be one of {', '.join(MX_SOURCE)}, "
                            f"not {show(good['mx_source'])}")
        for key in ("output", "push_name"):
            if key not in good:
                continue
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(good[key]) if f is not None}
            except ValueError as e:
                problems.append(f"{p}:{at(key)}: {what}: {key} template {show(good[key])}: {e}")
            else:
                bad = used - TEMPLATE_FIELDS
                if bad:
                    problems.append(f"{p}:{at(key)}: {what}: {key} template names {', '.join(sorted(bad))}; "
                                    f"it may use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))}")
        return good

    unknown_top = [k for k in doc if k not in ("defaults", "model")]
    for k in unknown_top:
        problems.append(f"{p}:{key_line(0, k)}: unknown table or key {show(k)}; a zoo has [defaults] and [[model]]")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append(f"{p}:{defaults_line}: defaults must be a table")
        defaults = {}
    defaults = check(defaults, DEFAULT_KEYS, defaults_line, "[defaults]")
    models = doc.get("model", [])
    if not isinstance(models, list) or not models:
        problems.append(f"{p}: no [[model]] tables: nothing to convert")
        models = []
    jobs: list[Job] = []
    seen_out: dict[str, int] = {}
    seen_repo: dict[str, int] = {}
    base = p.parent
    for i, m in enumerate(models):
        start = model_lines[i] if i < len(model_lines) else 1
        what = f"model {i + 1}"
        m = check(m if isinstance(m, dict) else {}, MODEL_KEYS, start, what)
        if "source" not in m:
            problems.append(f"{p}:{start}: {what}: no source (a hub repo id or a local directory)")
            continue
        src = m["source"]
        local = src.startswith((".", "/", "~")) or (base / src).exists()
        source = str((base / Path(src).expanduser()).resolve()) if local else src
        name = m.get("name") or Path(src.rstrip("/")).name
        merged = {**defaults, **m}
        if "formats" not in merged:
            problems.append(f"{p}:{start}: {what} ({name}): no formats (here or in [defaults])")
            continue
        template = merged.get("output", "{name}-{format}")
        push_line = (key_line(start, "push_name") if "push_name" in m
                     else key_line(defaults_line, "push_name") if "push_name" in defaults else start)
        for f in merged["formats"]:
            fmt = f.lower()
            policy = merged.get("expert_policy", "shared")
            fields = {"name": name, "format": fmt, "flavor": merged.get("flavor") or "default", "policy": policy}
            try:
                out = template.format(**fields)
                push_name = merged["push_name"].format(**fields) if "push_name" in merged else None
            except (KeyError, IndexError, ValueError):
                continue  # reported above
            stage = None
            if URI.match(out):
                why = (_store_problem(out) if push_to is None else
                       "an output in an object store is not pushed to the hub as well; give a local output with --push-to")
                if why is not None:
                    problems.append(f"{p}:{key_line(start, 'output') if 'output' in m else start}: {what} ({name}, "
                                    f"{fmt}): output {show(out)}: {why}")
                    continue
                out = out.rstrip("/")
                key = hashlib.sha256(out.encode()).hexdigest()[:12]
                stage_dir = base / Path(merged.get("staging", "shardquant-batch-staging")).expanduser()
                stage = str((stage_dir / f"{Path(out).name}-{key}").resolve())
            else:
                out = str((base / Path(out).expanduser()).resolve())
            if out in seen_out:
                problems.append(f"{p}:{start}: {what} ({name}): output {out} is also job {seen_out[out]}'s: make the "
                                "output template tell them apart ({name}, {format})")
                continue
            rules = merged.get("rules")
            job = Job(name, source, fmt, out, m.get("revision"), merged.get("flavor"), policy,
                      str((base / rules).resolve()) if rules else None, start, merged.get("mx_source", "cast"),
                      merged.get("scale_search", "none"), push_name, stage)
            if push_to is not None:
                repo = f"{push_to}/{job.repo_name}"
                why = publish.repo_problem(repo)
                if why is not None:
                    problems.append(f"{p}:{push_line}: {what} ({name}, {fmt}): repo id {show(repo)} is not valid "
                                    f"on the hub ({why}); set push_name")
                elif repo in seen_repo:
                    problems.append(f"{p}:{push_line}: {what} ({name}, {fmt}): repo {repo} is also job "
                                    f"{seen_repo[repo]}'s: make push_name tell them apart ({{name}}, {{format}})")
                else:
                    seen_repo[repo] = len(jobs) + 1
            jobs.append(job)
            seen_out[out] = len(jobs)
    if problems:
        def line_of(msg: str) -> int:
            m = re.match(rf"{re.escape(str(p))}:(\d+):", msg)
            return int(m[1]) if m else 0

        problems.sort(key=line_of)  # in file order (stable within a line)
        raise ZooError(f"{len(problems)} problem{'s' * (len(problems) != 1)} in {p}:\n" + "\n".join(problems))
    return jobs


# ---------------------------------------------------------------------------------------------
# Running jobs


def run_job(job: Job, device: str = "auto", verify_mode: str = "source", gpu_memory: int | None = None) -> JobResult:
    """One job in this process: convert (or find it complete), then verify. Never raises a
    ShardquantError: a failure is the result's error. gpu_memory: the device memory its quantizers may
    be held in (None: the device's free memory at start, shardquant/backend.py)."""
    from .card import VerifyFacts
    from .convert import convert
    from .verify import verify

    t0 = time.perf_counter()
    try:
        if job.remote and stored_complete(job.output):
            return JobResult(job, "skipped", error=None)
        r = convert(job.source, job.local_output, options=job.options, device=device, gpu_memory=gpu_memory)
        res = JobResult(job, "skipped" if r.complete else "converted", seconds=r.seconds,
                        source_bytes=r.plan.source_bytes, output_bytes=r.plan.output_bytes)
        if verify_mode != "none":
            rep = verify(job.local_output, job.source if verify_mode == "source" and not r.complete else None,
                         revision=job.revision, device=device)
            res.verified = rep.ok
            res.verify_facts = asdict(VerifyFacts.of(rep))
            eng = getattr(rep, "engines", None)
            res.engines = {v.engine.name: v.status for v in eng.verdicts} if eng is not None else {}
            finite = [t.sqnr_db for t in rep.tensors if t.sqnr_db == t.sqnr_db]
            res.worst_sqnr_db = min(finite) if finite else None
            gains = [g for t in rep.tensors if (g := t.rtn_gain_db) is not None and g == g and abs(g) != float("inf")]
            res.rtn_gain_db = sum(gains) / len(gains) if gains else None
            if not rep.ok:
                res.status = "failed"
                res.error = "verify: " + "; ".join(f"{v.rule} {v.name}: {v.detail}" for v in rep.violations[:3])
        if job.remote and res.status != "failed":
            store_output(Path(job.stage), job.output)
            res.status = "converted"  # a stage found complete was not yet stored
        return res
    except ShardquantError as e:
        return JobResult(job, "failed", seconds=time.perf_counter() - t0, error=str(e))
    except Exception as e:  # a bug: recorded, the batch goes on
        return JobResult(job, "failed", seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# Outputs in an object store (fsspec)


def _store_problem(uri: str) -> str | None:
    """Why fsspec cannot write to `uri` on this machine (unknown protocol, its package not installed),
    or None. Checked when the zoo is read, so a batch does not fail at its first upload."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        return f"no filesystem for {protocol}:// ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def stored_complete(uri: str) -> bool:
    """An output in an object store is complete when its scale manifest is there: store_output puts
    the manifest last, after every other file."""
    import fsspec

    from .manifest import MANIFEST_NAME

    fs, root = fsspec.core.url_to_fs(uri)
    return fs.exists(f"{root}/{MANIFEST_NAME}")


def store_output(stage: Path, uri: str) -> None:
    """Upload a finished, verified output from its local stage to `uri` (fsspec: s3://, gs://, az://,
    file://, ...): every file of the output's manifest but the manifest, then the manifest, so an
    interrupted upload never looks complete (stored_complete); then delete the stage, which this
    batch's conversion wrote. Raises ShardquantError naming the URI."""
    import shutil

    import fsspec

    from .manifest import MANIFEST_NAME

    files = sorted(f.relative_to(stage).as_posix() for f in stage.rglob("*") if f.is_file() and not f.is_symlink())
    if MANIFEST_NAME not in files:
        raise ShardquantError(f"{stage}: no {MANIFEST_NAME}: not a finished output, not uploaded to {uri}")
    try:
        fs, root = fsspec.core.url_to_fs(uri)
        if fs.exists(f"{root}/{MANIFEST_NAME}"):  # a previous, different output: no longer complete
            fs.rm(f"{root}/{MANIFEST_NAME}")
        for rel in [f for f in files if f != MANIFEST_NAME] + [MANIFEST_NAME]:
            fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(stage / rel), f"{root}/{rel}")
    except Exception as e:  # the filesystem's own errors (botocore, gcsfs, OSError, ...): one line
        raise ShardquantError(f"upload to {uri}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    shutil.rmtree(stage)


def shared_gpu_memory(device: str, share: int, budget_of=None) -> int | None:
    """The device memory one of `share` workers on `device` may hold quantizers in: the device's own
    budget (its free memory at start, shardquant/backend.py) divided among them, as they start together
    and each would otherwise plan on all of it. None for one worker, or a device without a budget (the
    CPU). `budget_of(device)` gives the whole budget (default: a backend's, made here)."""
    if share <= 1:
        return None
    if budget_of is None:
        from .backend import get_backend

        def budget_of(d: str) -> int | None:
            return get_backend(d, None).device_budget
    whole = budget_of(device)
    return None if whole is None else whole // share


def _worker(device: str, verify_mode: str, jobs: multiprocessing.Queue, results: multiprocessing.Queue,
            share: int = 1) -> None:
    """A worker process: jobs one after another on one device, start-up paid once; `share` workers
    use that device together (their GPU memory divided: shared_gpu_memory)."""
    try:
        gpu_memory = shared_gpu_memory(device, share)
    except ShardquantError:
        gpu_memory = None  # the device cannot start: each job says why
    while True:
        item = jobs.get()
        if item is None:
            return
        i, job = item
        results.put(("start", i, None))
        r = run_job(job, device, verify_mode, gpu_memory)
        results.put(("done", i, r))


class _HubSources:
    """Hub sources of a batch: downloaded ahead of their jobs on a thread of the batch's own process,
    in job order, while the bytes downloaded ahead and not yet converted stay within `budget`; with
    `evict`, each source's files that this batch downloaded (those missing from the hub cache when it
    started) are deleted once every job of that source has succeeded. Local sources are left alone."""

    def __init__(self, jobs: list[Job], budget: int | None, evict: bool):
        import threading

        self.budget, self.evict = budget, evict
        self.left: dict[tuple, int] = {}
        self.failed: set[tuple] = set()
        self.cks: dict[tuple, object] = {}
        self.before: dict[tuple, set[str]] = {}  # blobs the hub cache held for the repo before the batch
        self.ahead = 0
        self.cv = threading.Condition()
        self.errors: dict[tuple, str] = {}
        for j in jobs:
            if not Path(j.source).is_dir():
                self.left[(j.source, j.revision)] = self.left.get((j.source, j.revision), 0) + 1
        self.stop = False
        self.thread = threading.Thread(target=self._work, name="shardquant-batch-downloads", daemon=True)
        if self.left:
            self.thread.start()

    def _work(self) -> None:
        from . import hub
        from .source import open_checkpoint

        for key in list(self.left):
            before = _cached_blobs(key[0])  # what the cache held before this batch touched the repo
            try:
                ck = open_checkpoint(key[0], key[1], download=False)
            except ShardquantError as e:  # its jobs fail on their own, with the same error
                self.errors[key] = str(e)
                continue
            if ck.hub is None:
                continue
            size = sum(ck.hub.sizes[f] or 0 for f in ck.hub.missing(ck.root))
            with self.cv:
                self.cks[key], self.before[key] = ck, before
                # wait while earlier sources still hold the budget (one source is always let through)
                self.cv.wait_for(lambda: self.stop or self.budget is None or self.ahead == 0
                                 or self.ahead + size <= self.budget)
                if self.stop:
                    return
                self.ahead += size
            try:
                hub.download(ck)
            except ShardquantError as e:
                self.errors[key] = str(e)

    def done(self, job: Job, ok: bool) -> None:
        """A job ended: once its source's last job has, the source's budget is freed and (evict) its
        downloaded files deleted."""
        key = (job.source, job.revision)
        if key not in self.left:
            return
        with self.cv:
            self.left[key] -= 1
            if not ok:
                self.failed.add(key)
            if self.left[key]:
                return
            ck = self.cks.get(key)
            if ck is not None:
                ours = [f for f in ck.hub.sizes if Path(os.path.realpath(Path(ck.root) / f)).name not in self.before[key]]
                self.ahead = max(0, self.ahead - sum(ck.hub.sizes[f] or 0 for f in ours))
            self.cv.notify_all()
        if ck is not None and self.evict and key not in self.failed:
            _evict(ck, ours)

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()


def _cached_blobs(repo: str) -> set[str]:
    """Names of the blobs the hub cache holds for a model repo now."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name

    try:
        blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
        return {p.name for p in blobs.iterdir()}
    except (OSError, HFValidationError):  # none yet, or not a repo id (a missing local directory: its jobs fail)
        return set()


def _evict(ck, names: list[str]) -> None:
    """Delete from the hub cache the files of `ck` named (those this batch downloaded): each
    snapshot link and the blob it points to, only where the blob lies in the repo's own blobs folder."""
    root = Path(ck.root)
    blobs = root.parent.parent / "blobs"
    for name in names:
        link = root / name
        try:
            target = Path(os.path.realpath(link))
            if link.is_symlink():
                link.unlink()
            if target.parent == blobs.resolve() and target.is_file():
                target.unlink()
        except OSError:
            pass  # a cache file another process removed or holds: left as it is


def worker_places(device: str, devices: list[str] | None, workers: int) -> list[str]:
    """The device of each worker process: `workers` per entry of `devices`, grouped by device, else
    `workers` on `device`."""
    return [d for d in devices for _ in range(max(1, workers))] if devices else [device] * max(1, workers)


def run(jobs: list[Job], *, device: str = "auto", devices: list[str] | None = None, workers: int = 1,
        verify_mode: str = "source", on_event=None, download_budget: int | None = None,
        evict_source: bool = False, push=None) -> list[JobResult]:
    """Every job, in worker processes: `workers` per entry of `devices` (e.g. ["cuda:0", "cuda:1"]), else
    `workers` on `device`. Two workers sharing a GPU overlap one job's start-up and reads with the other's
    last writes (docs/benchmarks/README.md, "A zoo through shardquant batch"). on_event(kind, job,
    result) is called here as jobs start ("start") and end ("done"). A worker that dies takes only its
    job with it: it is recorded as failed and the others go on. Hub sources download ahead of their jobs within `download_budget` bytes (None: no
    bound), and with `evict_source` the files a source's jobs downloaded are deleted from the hub
    cache once all its jobs succeeded (_HubSources). With `push` (shardquant/publish.py Push), each
    job's output is pushed as the job ends, if it succeeded and verified (on_event "pushed", from
    the pushing thread); run returns once every push has ended."""
    if verify_mode not in VERIFY_MODES:
        raise ShardquantError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify_mode!r}")
    places = worker_places(device, devices, workers)
    ctx = multiprocessing.get_context("spawn")
    todo: multiprocessing.Queue = ctx.Queue()
    done: multiprocessing.Queue = ctx.Queue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    procs = []
    started = places[: max(1, len(jobs))]
    for place in started:
        todo.put(None)
        pr = ctx.Process(target=_worker, args=(place, verify_mode, todo, done, started.count(place)), daemon=True)
        pr.start()
        procs.append(pr)
    results: dict[int, JobResult] = {}
    sources = _HubSources(jobs, download_budget, evict_source)
    pusher = publish.Pusher(push, on_event) if push is not None else None
    try:
        while len(results) < len(jobs):
            try:
                kind, i, r = done.get(timeout=1.0)
            except queue.Empty:
                if not any(pr.is_alive() for pr in procs):  # every worker gone: the rest failed with them
                    for j in range(len(jobs)):
                        if j not in results:
                            results[j] = JobResult(jobs[j], "failed", error="its worker process died")
                    break
                continue
            if kind == "start":
                if on_event:
                    on_event("start", jobs[i], None)
            else:
                results[i] = r
                sources.done(jobs[i], r.status != "failed")
                if on_event:
                    on_event("done", jobs[i], r)
                if pusher is not None:
                    pusher.submit(r)
    finally:
        sources.close()
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
            pr.join(timeout=5)
    out = [results[i] for i in range(len(jobs))]
    if pusher is not None:
        pusher.finish(out)
    return out


# ---------------------------------------------------------------------------------------------
# The summary


def summary(results: list[JobResult]) -> dict:
    rows = []
    for r in results:
        d = {"model": r.job.name, "format": r.job.format, "flavor": r.job.flavor, "source": r.job.source,
             "revision": r.job.revision, "output": r.job.output, "status": r.status,
             "source_bytes": r.source_bytes, "output_bytes": r.output_bytes, "seconds": round(r.seconds, 3),
             "gb_per_s": None if r.gb_per_s is None else round(r.gb_per_s, 3), "verified": r.verified,
             "engines": r.engines, "worst_sqnr_db": None if r.worst_sqnr_db is None else round(r.worst_sqnr_db, 2),
             "rtn_gain_db": None if r.rtn_gain_db is None else round(r.rtn_gain_db, 3),
             "error": r.error, "push": r.push}
        rows.append(d)
    counts = {s: sum(r.status == s for r in results) for s in ("converted", "skipped", "failed")}
    doc = {"jobs": rows, "counts": counts}
    pushes = publish.counts(results)
    if pushes is not None:
        doc["push_counts"] = pushes
    return doc


def markdown(doc: dict) -> str:
    c = doc["counts"]
    pushes = doc.get("push_counts")
    head = f"# shardquant batch: {c['converted']} converted, {c['skipped']} already complete, {c['failed']} failed"
    if pushes is not None:
        head += (f"; pushed {pushes['pushed']}, already pushed {pushes['already_pushed']}, push failed "
                 f"{pushes['failed']}")
    out = [head, "",
           "| model | format | status | source MB | output MB | s | GB/s | worst SQNR dB | engines | error |"
           + (" pushed |" if pushes is not None else ""),
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if pushes is not None else "")]
    for j in doc["jobs"]:
        eng = ", ".join(f"{k}: {v}" for k, v in sorted(j["engines"].items())) or "-"
        cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        esc = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        err = esc(j["error"] or "")
        out.append(f"| {j['model']} | {j['format']} | {j['status']} | {j['source_bytes'] / 1e6:.1f} | "
                   f"{j['output_bytes'] / 1e6:.1f} | {j['seconds']:.1f} | {cell(j['gb_per_s'], '.2f')} | "
                   f"{cell(j['worst_sqnr_db'], '.2f')} | {eng} | {err or '-'} |"
                   + (f" {esc(publish.cell(j['push']))} |" if pushes is not None else ""))
    return "\n".join(out) + "\n"


def write_summary(results: list[JobResult], where: Path) -> tuple[Path, Path]:
    """SUMMARY_NAME.json and .md in `where` (each written whole, then renamed into place)."""
    doc = summary(results)
    where.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(doc, indent=2, sort_keys=True) + "\n"), (".md", markdown(doc))):
        final = where / (SUMMARY_NAME + suffix)
        tmp = where / f".{SUMMARY_NAME}{suffix}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final)
        paths.append(final)
    return paths[0], paths[1]

