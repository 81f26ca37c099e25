"""The typed `convert()` API: plan, then stream every source byte through the quantizers into
shards written header first. The CLI is a thin mirror of this function."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import flavors, formats, manifest
from .errors import OutputError, ShardquantError, SourceError
from .backend import get_backends
from .pipeline import run
from .plan import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, Plan, make_plan
from .rules import RuleSet, load_rules
from .source import INDEX_NAME, Checkpoint, open_checkpoint
from .journal import JOURNAL_NAME, Journal, fingerprint

DEFAULT_GPU_MEMORY = 16 * 2**30  # device bytes a group may keep resident between amax and quantize


@dataclass
class Result:
    plan: Plan
    output: Path | None
    seconds: float
    bytes_read: int
    backend: str
    resumed: int = 0  # shards kept from an interrupted run
    complete: bool = False  # the output was already finished: checked, nothing written


def prepare(
    src: str,
    fmt: str = "nvfp4",
    *,
    revision: str | None = None,
    expert_policy: str = "shared",
    rules_file: str | Path | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    strict: bool = False,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    flavor: str = "modelopt",
) -> Plan:
    """Open the source (headers only) and plan the conversion."""
    if fmt not in formats.FORMATS:
        raise ShardquantError(f"unknown format {fmt!r}; choose one of {', '.join(formats.FORMATS)}")
    ck = open_checkpoint(src, revision)
    if ck.config and isinstance(ck.config.get("quantization_config"), dict):
        method = ck.config["quantization_config"].get("quant_method", "?")
        raise SourceError(f"{ck.root / 'config.json'}: source is already quantized (quant_method {method!r})")
    user = load_rules(Path(rules_file)) if rules_file else ()
    num_layers = (ck.config or {}).get("num_hidden_layers")
    rules = RuleSet(user, tuple(include), tuple(exclude), expert_policy,
                    num_layers if isinstance(num_layers, int) else None)
    return make_plan(ck, fmt, rules, max_shard_size=max_shard_size, memory_budget=memory_budget, strict=strict,
                     flavor=flavor)


def convert(
    src: str,
    output: str | Path,
    fmt: str = "nvfp4",
    *,
    revision: str | None = None,
    expert_policy: str = "shared",
    rules_file: str | Path | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    strict: bool = False,
    device: str = "auto",
    devices: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    gpu_memory: int = DEFAULT_GPU_MEMORY,
    flavor: str = "modelopt",
    verify: bool = False,
    progress: bool = False,
) -> Result:
    """Convert checkpoint `src` (directory or hub repo id) into `output`.

    >>> convert("examples/tiny-moe", "out/tiny-nvfp4", "nvfp4")  # doctest: +SKIP
    """
    plan = prepare(
        src, fmt, revision=revision, expert_policy=expert_policy, rules_file=rules_file,
        include=include, exclude=exclude, strict=strict, max_shard_size=max_shard_size,
        memory_budget=memory_budget, flavor=flavor,
    )
    out = Path(output).expanduser()
    backends = get_backends(device, devices, gpu_memory)
    if backends[0].device_budget is not None:
        for g in plan.groups:
            if not g.two_pass and g.source_bytes > gpu_memory:
                plan.warnings.append(
                    f"quantizer {g.key} ({g.source_bytes / 2**30:.1f} GiB) exceeds --gpu-memory: members past "
                    "the budget are uploaded again from host memory for the second pass")
    if dry_run:
        return Result(plan, None, 0.0, 0, backends[0].name)
    journal, done = _prepare_output(out, plan, force)
    if journal.complete and len(done) == len(plan.shards) and (out / INDEX_NAME).exists():
        if verify:
            _verify(out)
        return Result(plan, out, 0.0, 0, backends[0].name, resumed=len(done), complete=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # from here on the output is unfinished
    _check_space(out, plan, done)
    t0 = time.perf_counter()
    read, scales = run(plan, out, backends, progress, journal, done)
    try:
        _finish(plan, out, scales, backends[0].name)
        journal.complete = True
        journal.save()
    except OSError as e:
        raise OutputError(f"{e.filename or out}: write failed ({e.strerror or e})") from None
    if verify:
        _verify(out)
    return Result(plan, out, time.perf_counter() - t0, read, backends[0].name, resumed=len(done))


def _verify(out: Path) -> None:
    """--verify: the contract check on our own output before success is declared. A failure takes
    the index away, so the output is not mistaken for a finished checkpoint."""
    from .verify import verify_contract

    bad = verify_contract(out)
    if bad:
        (out / INDEX_NAME).unlink(missing_ok=True)
        rules = sorted({v.rule for v in bad})
        raise OutputError(f"{out}: the output fails verification: {len(bad)} violation(s) of {', '.join(rules)} "
                          f"(first: {bad[0].name}: {bad[0].detail}); run `shardquant verify {out}` for all")


def _prepare_output(out: Path, plan: Plan, force: bool) -> tuple[Journal, set[str]]:
    """Check the output directory; return its journal and the shards a previous run finished.
    A non-empty directory is only touched when it holds a shardquant output of the same plan
    (then it resumes) or with --force (then what a previous conversion wrote is removed)."""
    root = plan.checkpoint.root.resolve()
    if out.resolve() == root:
        raise OutputError(f"{out}: output directory is the source directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    fp = fingerprint(plan)
    if out.exists() and any(out.iterdir()):
        if not force:
            journal = Journal.load(out)
            if journal is None:
                raise OutputError(f"{out}: output directory is not empty and holds no shardquant conversion "
                                  "(use --force to overwrite)")
            if journal.fingerprint != fp:
                raise OutputError(f"{out}: holds a conversion made by a different command, version or source; "
                                  "refusing to resume (use --force to start over)")
            return journal, journal.valid_shards(out)
        # --force: remove what a previous conversion wrote; leave anything else alone.
        for p in out.iterdir():
            if p.is_file() and (p.name.startswith("model-") and p.name.endswith(".safetensors")
                                or p.name.endswith(".partial") or p.name in (INDEX_NAME, JOURNAL_NAME)):
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    journal = Journal(out / JOURNAL_NAME, fp)
    try:
        journal.save()
    except OSError as e:
        raise OutputError(f"{out}: cannot write ({e.strerror or e})") from None
    return journal, set()


def _check_space(out: Path, plan: Plan, done: set[str]) -> None:
    """Refuse up front when the output filesystem cannot hold what is left to write."""
    need = sum(sum(t.nbytes for t in ts) + (1 << 20) for fname, ts in plan.shards if fname not in done)
    need += 16 << 20  # configs, manifest, copied files, journal
    free = shutil.disk_usage(out).free
    if free < need:
        raise OutputError(f"{out}: needs {need / 1e9:.2f} GB for the output but only {free / 1e9:.2f} GB are free")


def _finish(plan: Plan, out: Path, scales: dict, backend: str) -> None:
    """Configs, manifest, copied files, and last the index: its presence marks a finished output."""
    ck: Checkpoint = plan.checkpoint
    for p in ck.extra_files:
        if p.name == "config.json":
            continue
        shutil.copyfile(p, out / p.name)
    if ck.config is not None:
        cfg = dict(ck.config)
        cfg["quantization_config"] = flavors.quantization_config(plan.flavor, plan.format, plan.exclude_modules)
        _write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    for name, obj in flavors.config_files(plan.flavor, plan.format, plan.exclude_modules).items():
        _write_text(out / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")
    _write_text(out / manifest.MANIFEST_NAME, manifest.dumps(manifest.build(plan, scales, backend)))
    index = {
        "metadata": {"total_size": plan.output_bytes},
        "weight_map": {t.name: fname for fname, ts in plan.shards for t in ts},
    }
    _write_text(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
