"""The typed `convert()` API: plan, then stream every source byte through the quantizers into
shards written header first. The CLI is a thin mirror of this function."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from . import card, flavors, formats, manifest, trace
from .background import in_background
from .errors import OutputError, ShardquantError, SourceError
from .plan import Options, Plan, prepare
from .source import INDEX_NAME, Checkpoint, check_fetch, start_fetch
from .journal import JOURNAL_NAME, Journal, recipe
from .lock import LOCK_NAME, Lock
from .output import Claim, claim_output
from .writer import OutputDir

# Device bytes a quantizer may keep resident between amax and quantize; None: AUTO_GPU_FRACTION of the
# device's free memory at start (shardquant/backend.py), so the largest shared expert groups (15-23 GB
# in DeepSeek-V3 and Kimi-K2) are read once on a large GPU.
DEFAULT_GPU_MEMORY = None


@dataclass
class Result:
    plan: Plan
    output: Path | None
    seconds: float
    bytes_read: int
    backend: str
    resumed: int = 0  # shards kept from an interrupted run
    complete: bool = False  # the output was already finished: checked, nothing written
    hashed_extra: int = 0  # source bytes read only to hash them (headers, padding, kept shards' tensors)
    device: str = ""  # where the arithmetic ran (backend.describe): "the CPU with NumPy 2.4.6, 16 threads"
    reread_bytes: int = 0  # of bytes_read, second reads of groups read twice (over --memory-budget)
    resumed_bytes: int = 0  # bytes of unfinished shards kept from an interrupted run's last checkpoint


def get_backends(device: str, devices, gpu_memory) -> list:
    """shardquant/backend.py get_backends, imported on first use: `plan` needs no backend (start-up)."""
    from .backend import get_backends as backends

    return backends(device, devices, gpu_memory)


def convert(
    src: str,
    output: str | Path,
    fmt: str | None = None,
    *,
    options: Options | None = None,
    device: str = "auto",
    devices: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    gpu_memory: int | None = DEFAULT_GPU_MEMORY,
    verify: bool = False,
    progress: bool = False,
    on_start=None,
    **choices,
) -> Result:
    """Convert checkpoint `src` (directory or hub repo id) into `output` with `options` (plan.py
    Options; or its fields by name, and `fmt` for its format). on_start(plan, where), if
    given, is called once the plan and the device are settled, before the output is touched (the
    command line prints the warnings and its start line there).

    >>> convert("examples/tiny-moe", "out/tiny-nvfp4", "nvfp4")  # doctest: +SKIP
    """
    # The GPU starts (CuPy's import, the CUDA context, the kernels: shardquant/cuda) while the source's
    # headers are read and the plan is made; the plan asks for the GPU's budget only if a quantizer
    # exceeds --memory-budget (shardquant/plan.py make_plan).
    # the backends and the pipeline are imported here, not at the top: `plan` needs neither (start-up)
    from .backend import NumpyBackend, describe
    from .pipeline import warm_start
    from .startup import early_warm_start

    opts = Options.of(options, fmt, **choices)  # a misspelt choice is a TypeError before anything starts
    trace.mark("convert")
    if not dry_run:
        early_warm_start(src)
    starting = in_background(lambda: get_backends(device, devices, gpu_memory))

    def budget_of(backends: list) -> int | None:
        return min(b.device_budget for b in backends) if backends[0].device_budget is not None else None

    def planned(device_memory) -> Plan:
        return prepare(src, options=opts, device_memory=device_memory)

    plan = planned(lambda: budget_of(starting.result()))
    out = Path(output).expanduser()
    no_kernel = _no_kernel(plan, opts)
    held = _Held()
    try:
        with ExitStack() as stack:
            if not dry_run and not starting.done():
                if not no_kernel:
                    # The plan is final whatever device starts (it is made again only for a format without a
                    # GPU kernel, below): the output is claimed now, while the GPU starts, and then the disk
                    # reads ahead. In that order: the claim's fsyncs would wait behind every read the hint
                    # queued (shardquant/startup.py hint; docs/benchmarks/README.md "claimed before the hint").
                    held.claim(stack, out, plan, force)
                if not held.claimed or not held.claimed[1].complete:
                    warm_start(plan)  # the disk reads ahead while the GPU starts
                recipe(plan)  # made once per plan (shardquant/journal.py), asked at the claim
            try:
                backends = starting.result()
            except BaseException:
                held.abandon()
                raise
            budget = budget_of(backends)
            if plan.device_memory is None:
                plan.device_memory = budget  # no decision depended on it (make_plan)
            trace.mark("planned")
            if budget is not None and no_kernel:
                if device != "auto" or devices:
                    raise ShardquantError(f"{no_kernel[0]} has no GPU kernel yet; use --device cpu (or auto)")
                backends, budget = [NumpyBackend()], None
                plan = planned(None)
                plan.warnings.append(f"{no_kernel[0]} has no GPU kernel yet: converting on the CPU")
            if budget is not None:
                for g in plan.groups:
                    if not g.two_pass and not g.on_device and g.cast is None and g.source_bytes > budget:
                        plan.warnings.append(
                            f"quantizer {g.key} ({g.source_bytes / 1e9:.1f} GB) exceeds --gpu-memory: members past "
                            "the budget are uploaded again from host memory for the second pass")
            if getattr(backends[0], "fallback", None):
                plan.warnings.append(f"--device auto: converting on the CPU: {backends[0].fallback}")
            if dry_run:
                return Result(plan, None, 0.0, 0, backends[0].name, device=describe(backends))
            # A hub source is downloaded while it is converted, and only once the output is ours: opened,
            # locked and claimed first, so a refused output is found before anything is fetched.
            od, claim = held.claimed or held.claim(stack, out, plan, force)
            return _convert_locked(plan, od, claim, backends, verify, progress, on_start)
    finally:
        held.remove_directory()


def _no_kernel(plan: Plan, opts: Options) -> list[str]:
    """What of the plan has no GPU kernel: "--format F" or "--scale-search S for --format F"."""
    from .backend import gpu_searches

    out = [f"--format {f}" for f in plan.formats if not formats.declared(f).kernel]
    return out + [f"--scale-search {opts.scale_search} for --format {f}" for f in plan.formats
                  if opts.scale_search != "none" and opts.scale_search not in gpu_searches(f)]


class _Held:
    """The output as this conversion holds it: opened, locked (until the stack it was claimed on
    closes) and claimed (shardquant/output.py claim_output)."""

    def __init__(self) -> None:
        self.claimed: tuple[OutputDir, Claim] | None = None
        self._abandoned = False

    def claim(self, stack: ExitStack, out: Path, plan: Plan, force: bool) -> tuple[OutputDir, Claim]:
        _check_apart(out, plan.checkpoint)
        check_fetch(plan.checkpoint)  # a hub source: room in the hub cache for what is left to download
        od = OutputDir.open(out)
        stack.callback(od.close)
        lock = stack.enter_context(Lock(od))  # released before the directory is closed
        trace.mark("locked")
        claim = claim_output(od, plan, force, lock.previous_tokens)
        trace.mark("claimed")
        self.claimed = od, claim
        return self.claimed

    def abandon(self) -> None:
        """The device failed to start after the claim: a fresh start's journal, the one file written,
        is removed (and the directory, once unlocked, if this run created it); an unfinished or
        replaced conversion keeps its journal, and the next run resumes it."""
        if self.claimed is None:
            return
        od, claim = self.claimed
        j = claim.journal
        if j is not None and not j.files and j.runs == [od.token] and not claim.done and not claim.partial:
            od.remove(JOURNAL_NAME)
            od.sync()
            self._abandoned = True

    def remove_directory(self) -> None:
        if self._abandoned and self.claimed[0].created:
            try:
                os.rmdir(self.claimed[0].path)  # only if empty: nothing but what this run wrote was there
            except OSError:
                pass


def _convert_locked(plan: Plan, od: OutputDir, claim: Claim, backends: list, verify: bool, progress: bool,
                    on_start=None) -> Result:
    from .backend import describe
    from .pipeline import run

    plan.warnings += claim.warnings
    name, where = backends[0].name, describe(backends)
    if claim.complete:
        if verify:
            _verify(od)
        return Result(plan, od.path, 0.0, 0, name, resumed=len(plan.shards), complete=True, device=where)
    _check_space(od.path, plan, claim.done)
    if on_start is not None:  # the output is ours to write: now say what runs where
        on_start(plan, where)
    t0 = time.perf_counter()
    # a hub source: exactly the files the plan reads, downloading in the background from here; the
    # pipeline waits for each file before reading it (shardquant/hub.py Downloads)
    gate = start_fetch(plan.checkpoint, _read_order(plan), progress)
    # the card's engine verdicts, judged from the planned configs and headers while the shards are written
    judging = in_background(lambda: _judge_planned(plan, od.path), name="shardquant-card")
    try:
        read, scales, sources, extra, again = run(plan, od, backends, progress, claim.journal, claim.done,
                                                  claim.partial, gate)
        if gate is not None:
            gate.wait_all()  # the copied files (and any a resumed run had hashed already)
        _finish(plan, od, claim.journal, scales, sources, name, judging)
        trace.mark("finished")
    finally:
        if gate is not None:
            gate.close()
    if verify:
        _verify(od)
    return Result(plan, od.path, time.perf_counter() - t0, read, name, resumed=len(claim.done),
                  resumed_bytes=sum(p[2] for p in claim.partial.values()),
                  hashed_extra=extra, device=where, reread_bytes=again)


def _read_order(plan: Plan) -> list[str]:
    """Source file names in the order the pipeline first reads from them: the order to download them."""
    order: dict[str, None] = {}
    for u in plan.units:
        for m in ([u.kept] if u.kept is not None else u.group.members):
            order.setdefault(m.file.name, None)
    return list(order)


def _check_apart(out: Path, ck: Checkpoint) -> None:
    """The source is read-only to the tool: the output may be neither inside it nor around it."""
    o = Path(os.path.realpath(out))
    roots = {Path(os.path.realpath(ck.root))}
    roots |= {Path(os.path.realpath(p)).parent for p in (*ck.shards, *ck.extra_files)}
    if ck.hub is not None:  # where the cache's blobs of files not downloaded yet will be
        roots.add(Path(os.path.realpath(ck.root.parent.parent / "blobs")))
    for r in sorted(roots):
        if o == r:
            raise OutputError(f"{out}: the output directory is the source directory")
        if r in o.parents:
            raise OutputError(f"{out}: the output directory is inside the source directory {r}; "
                              "choose an output outside it")
        if o in r.parents:
            raise OutputError(f"{out}: the source directory {r} is inside this output directory; "
                              "choose an output that does not contain the source")


def _verify(od: OutputDir) -> None:
    """--verify: the contract check on our own output before success is declared. A failure takes
    the index away, so the output is not mistaken for a finished checkpoint. (File hashes were
    computed as the files were written; the contract check needs no second read of them.)"""
    from .verify import verify_contract

    bad = verify_contract(od.path, hashes=False, ignore=frozenset({LOCK_NAME}))
    if bad:
        od.remove(INDEX_NAME)
        od.sync()
        rules = sorted({v.rule for v in bad})
        raise OutputError(f"{od.path}: the output fails verification: {len(bad)} violation(s) of {', '.join(rules)} "
                          f"(first: {bad[0].name}: {bad[0].detail}); run `shardquant verify {od.path}` for all")


def _check_space(out: Path, plan: Plan, done: set[str]) -> None:
    """Refuse up front when the output filesystem cannot hold what is left to write."""
    need = sum(sum(t.nbytes for t in ts) + (1 << 20) for fname, ts in plan.shards if fname not in done)
    need += 16 << 20  # configs, manifest, copied files, journal
    free = shutil.disk_usage(out).free
    if free < need:
        raise OutputError(f"{out}: needs {need / 1e9:.2f} GB for the output but only {free / 1e9:.2f} GB are free")


def finish_names(plan: Plan) -> list[str]:
    """Every file the finish step writes, in order; the index comes last."""
    ck: Checkpoint = plan.checkpoint
    names = [p.name for p in ck.extra_files if p.name not in ("config.json", card.CARD_NAME)]
    if ck.config is not None:
        names.append("config.json")
    names += list(flavors.config_files(plan.flavor, plan.format, plan.exclude_modules))
    return names + [card.CARD_NAME, manifest.MANIFEST_NAME, INDEX_NAME]  # the model card, with or without a source README


def _configs(plan: Plan) -> dict[str, dict]:
    """The JSON documents the output's config files hold: config.json (the source's, its
    quantization_config replaced) and the flavor's own files (hf_quant_config.json)."""
    out = {}
    ck: Checkpoint = plan.checkpoint
    if ck.config is not None:
        cfg = dict(ck.config)
        if isinstance(cfg.get("text_config"), dict) and "quantization_config" in cfg["text_config"]:
            cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
        cfg["quantization_config"] = flavors.quantization_config(plan.flavor, plan.format, plan.exclude_modules,
                                                                plan.format_targets())
        out["config.json"] = cfg
    out.update(flavors.config_files(plan.flavor, plan.format, plan.exclude_modules))
    # as a reader of the files gets them (JSON has no tuples; keys are strings)
    return {name: json.loads(json.dumps(doc)) for name, doc in out.items()}


def _judge_planned(plan: Plan, root: Path) -> tuple[card.Judging, dict[str, bytes]]:
    """The card's engine verdicts as far as the configs and headers decide them (shardquant/card.py
    Judging), from the output's planned files: the config documents, and the shards' headers as the
    writer will write them (encode_header of the plan's shards: shardquant/pipeline.py _Shards),
    parsed as a reader parses them. Also each shard's header bytes, to check the written files against."""
    from .engines import load_json
    from .journal import shard_header
    from .st import parse_header

    tensors, headers = {}, {}
    for fname, ts in plan.shards:
        raw = headers[fname] = shard_header(plan, fname)
        tensors.update(parse_header(root / fname, raw[8:], len(raw) - 8, len(raw) + sum(t.nbytes for t in ts)))
    configs = _configs(plan)
    for p in plan.checkpoint.extra_files:  # a source's own hf_quant_config.json is copied unless the flavor writes one
        if p.name == "hf_quant_config.json" and p.name not in configs:
            configs[p.name] = load_json(p)
    return card.Judging.planned(root, configs, tensors), headers


def _as_planned(root: Path, headers: dict[str, bytes]) -> bool:
    """Do the written shards start with the planned header bytes?"""
    for fname, want in headers.items():
        try:
            with open(root / fname, "rb") as f:
                if f.read(len(want)) != want:
                    return False
        except OSError:
            return False
    return True


def _finish(plan: Plan, od: OutputDir, journal: Journal, scales: dict, sources: dict, backend: str,
            judging=None) -> None:
    """Copied files, configs, the manifest (with every other file's size and SHA-256), then the
    index, whose presence marks a finished output; files of an earlier conversion that this one
    does not write are removed, and last the journal."""
    ck: Checkpoint = plan.checkpoint
    names = finish_names(plan)
    journal.intend(names)
    files = {fname: journal.files[fname] for fname, _ in plan.shards}
    for p in ck.extra_files:
        if p.name not in ("config.json", card.CARD_NAME):  # the source's README.md goes into the card
            files[p.name] = _copy(p, od)
    for name, obj in _configs(plan).items():  # config.json keeps the source's key order
        files[name] = od.write_file(name, (json.dumps(obj, indent=2, sort_keys=name != "config.json") + "\n").encode())
    index = {
        "metadata": {"total_size": plan.output_bytes},
        "weight_map": {t.name: fname for fname, ts in plan.shards for t in ts},
    }
    index_bytes = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    files[INDEX_NAME] = {"sha256": hashlib.sha256(index_bytes).hexdigest(), "size": len(index_bytes)}
    trace.mark("configs-written")
    doc = manifest.build(plan, scales, backend, {}, sources, recipe=recipe(plan))  # the card's, without files
    files[card.CARD_NAME] = _write_card(plan, od, doc, judging)
    trace.mark("card-written")
    keep = set(files) | {manifest.MANIFEST_NAME, JOURNAL_NAME}
    for stale in sorted(set(journal.files) - keep):
        od.remove(stale)  # written by an earlier conversion into this directory (its own record says so)
    doc = manifest.with_files(doc, files)
    od.write_file(manifest.MANIFEST_NAME, manifest.dumps(doc).encode(), )
    od.write_file(INDEX_NAME, index_bytes)
    od.remove(JOURNAL_NAME)
    od.sync()


def _write_card(plan: Plan, od: OutputDir, doc: dict, judging=None) -> dict:
    """README.md: the model card (shardquant/card.py), from the manifest's records (without its files
    table, which will list the card) and the engine verdicts on the shards and configs written so far.
    No verify results even with --verify, which runs after the index is written: the card's bytes are
    the same with and without it (it says how to run verify). `judging`: the future of _judge_planned,
    used where every shard holds the planned header (else the headers are read from the files)."""
    from .st import read_header

    src = next((p for p in plan.checkpoint.extra_files if p.name == card.CARD_NAME), None)
    text = None
    if src is not None:
        try:
            with open(src, "rb") as f:
                text = f.read(16 * card.MAX_SOURCE_README).decode("utf-8", errors="replace")  # the card cuts it
        except OSError as e:
            raise SourceError(f"{src}: cannot read ({e.strerror or e})") from None
    try:  # judged while the shards were written; tests/test_engines.py holds it equal to the files' verdicts
        judged, headers = judging.result() if judging is not None else (None, {})
    except Exception:  # whatever went wrong there, the files themselves are judged below
        judged, headers = None, {}
    if judged is not None and _as_planned(od.path, headers):
        verdicts = judged.verdicts()
    else:
        tensors = {t.name: t for fname, _ in plan.shards for t in read_header(od.path / fname).values()}
        verdicts = card.engine_verdicts(od.path, tensors)
    return od.write_file(card.CARD_NAME, card.model_card(plan, doc, None, text, verdicts).encode())


def _copy(p: Path, od: OutputDir) -> dict:
    """Stream one source file into the output (it may be large: a tokenizer, custom code)."""
    f = od.create(p.name)
    try:
        try:
            with open(p, "rb", buffering=0) as src:
                while chunk := src.read(16 << 20):
                    f.write(chunk)
        except OSError as e:
            raise SourceError(f"{p}: cannot read ({e.strerror or e})") from None
        return f.commit(sync_dir=False)
    except BaseException:
        f.abort()
        raise
