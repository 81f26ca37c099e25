"""The typed `convert()` API: plan, then stream every source byte through the quantizers into
shards written header first. The CLI is a thin mirror of this function."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import flavors, formats, manifest
from .errors import OutputError, ShardquantError, SourceError
from .formats.base import tensor_amax
from .plan import (
    DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, PREFETCH_BYTES, Plan, Unit, make_plan,
)
from .rules import RuleSet, load_rules
from .source import INDEX_NAME, Checkpoint, open_checkpoint
from .st import ShardWriter, read_raw

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Result:
    plan: Plan
    output: Path | None
    seconds: float
    bytes_read: int
    backend: str


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
    return make_plan(ck, fmt, rules, max_shard_size=max_shard_size, memory_budget=memory_budget, strict=strict)


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
    force: bool = False,
    dry_run: bool = False,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> Result:
    """Convert checkpoint `src` (directory or hub repo id) into `output`.

    >>> convert("examples/tiny-moe", "out/tiny-nvfp4", "nvfp4")  # doctest: +SKIP
    """
    backend = _backend(device)
    plan = prepare(
        src, fmt, revision=revision, expert_policy=expert_policy, rules_file=rules_file,
        include=include, exclude=exclude, strict=strict, max_shard_size=max_shard_size,
        memory_budget=memory_budget,
    )
    out = Path(output).expanduser()
    if dry_run:
        return Result(plan, None, 0.0, 0, backend)
    _prepare_output(out, plan, force)
    t0 = time.perf_counter()
    read = _run(plan, out, backend, progress)
    return Result(plan, out, time.perf_counter() - t0, read, backend)


def _backend(device: str) -> str:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ShardquantError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda"):
        raise ShardquantError("the GPU backend is not available in this build; use --device cpu")
    return "numpy"


def _prepare_output(out: Path, plan: Plan, force: bool) -> None:
    root = plan.checkpoint.root.resolve()
    if out.resolve() == root:
        raise OutputError(f"{out}: output directory is the source directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError(f"{out}: output directory is not empty (use --force to overwrite)")
        # --force: remove what a previous conversion wrote; leave anything else alone.
        for p in out.iterdir():
            if p.is_file() and (p.name.startswith("model-") and p.name.endswith(".safetensors")
                                or p.name.endswith(".partial") or p.name == INDEX_NAME):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _reader(plan: Plan) -> Iterator[tuple[Unit, list[np.ndarray] | None]]:
    """Read units ahead on a thread (the disk works while NumPy computes), holding at most the
    unit being processed plus PREFETCH_BYTES. Two-pass groups are yielded without data."""
    budget = max(PREFETCH_BYTES, max((u.source_bytes for u in plan.units if not _two(u)), default=0))
    cv = threading.Condition()
    state = {"held": 0, "error": None}
    q: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for u in plan.units:
                need = 0 if _two(u) else u.source_bytes
                with cv:
                    cv.wait_for(lambda: state["held"] + need <= budget or state["held"] == 0)
                    state["held"] += need
                if _two(u):
                    q.put((u, None, need))
                    continue
                members = u.group.members if u.group else [u.kept]
                q.put((u, [read_raw(m) for m in members], need))
        except BaseException as e:  # handed to the consumer, which raises it
            q.put((None, e, 0))
        q.put((None, None, 0))

    t = threading.Thread(target=work, name="shardquant-reader", daemon=True)
    t.start()
    while True:
        u, data, need = q.get()
        if u is None:
            if isinstance(data, BaseException):
                raise data
            return
        yield u, data
        with cv:
            state["held"] -= need
            cv.notify_all()


def _two(u: Unit) -> bool:
    return u.group is not None and u.group.two_pass


class _Shards:
    """Opens each planned shard when its first tensor arrives; closes and renames it when full."""

    def __init__(self, plan: Plan, out: Path):
        self.out = out
        self.where = {t.name: i for i, (_, ts) in enumerate(plan.shards) for t in ts}
        self.plan = plan
        self.cur: ShardWriter | None = None
        self.idx = -1

    def write(self, name: str, data: np.ndarray) -> None:
        i = self.where[name]
        if i != self.idx:
            self._finish()
            self.idx = i
            fname, tensors = self.plan.shards[i]
            self.cur = ShardWriter(self.out / (fname + ".partial"), tensors, {"format": "pt"})
        self.cur.write(name, data)
        if self.cur.done:
            self._finish()

    def _finish(self) -> None:
        if self.cur is not None:
            self.cur.close()
            self.cur.path.replace(self.cur.path.with_suffix(""))
            self.cur = None

    def abort(self) -> None:
        if self.cur is not None:
            self.cur.close(sync=False)
            self.cur = None


def _run(plan: Plan, out: Path, backend: str, progress: bool) -> int:
    fmt = formats.get(plan.format)
    shards = _Shards(plan, out)
    scales: dict[str, tuple[float, float]] = {}
    bytes_read = 0
    bar = _bar(plan.source_bytes, progress)
    try:
        for u, data in _reader(plan):
            if u.kept is not None:
                shards.write(u.kept.name, data[0])
                bytes_read += u.kept.nbytes
                bar.update(u.kept.nbytes)
                continue
            g = u.group
            if data is None:  # two-pass: amax first, then read each member again
                amax = max(tensor_amax(read_raw(m), m.dtype, m.name) for m in g.members)
                bytes_read += g.source_bytes
                data_iter = (read_raw(m) for m in g.members)
            else:
                amax = max(tensor_amax(raw, m.dtype, m.name) for m, raw in zip(g.members, data))
                data_iter = iter(data)
            gs = fmt.global_scale(np.float32(amax))
            scales[g.key] = (float(amax), float(gs))
            q = fmt.Quantizer(gs)
            for m in g.members:
                raw = next(data_iter)
                weight, scale = q.quantize(raw, m.dtype, m.name)
                names = plan.outputs[m.name]
                shards.write(names["weight"], weight)
                if scale is not None:
                    shards.write(names["scale"], scale)
                gs_arr = np.array(gs, dtype=np.float32)
                shards.write(names.get("global_scale", names["scale"]), gs_arr)
                bytes_read += m.nbytes
                bar.update(m.nbytes)
                del raw
            data = None
    except BaseException:
        shards.abort()
        raise
    finally:
        bar.close()
    _finish(plan, out, scales, backend)
    return bytes_read


def _finish(plan: Plan, out: Path, scales: dict, backend: str) -> None:
    """Configs, manifest, copied files, and last the index: its presence marks a finished output."""
    ck: Checkpoint = plan.checkpoint
    for p in ck.extra_files:
        if p.name == "config.json":
            continue
        shutil.copyfile(p, out / p.name)
    if ck.config is not None:
        cfg = dict(ck.config)
        cfg["quantization_config"] = flavors.quantization_config(plan.format, plan.exclude_modules)
        _write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    _write_text(out / "hf_quant_config.json",
                json.dumps(flavors.hf_quant_config(plan.format, plan.exclude_modules), indent=2, sort_keys=True) + "\n")
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


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize", dynamic_ncols=True)
