"""`shardquant` command line: a thin mirror of `convert()`; only here do errors become messages."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import interrupt, trace

trace.mark("python-ready")  # the interpreter is up and this module is being imported

if __name__ == "__main__" or interrupt.is_command():  # Ctrl-C in the imports below (most of a second): one line
    interrupt.install()

import click  # noqa: E402

from . import __version__, formats
from .errors import ShardquantError
from .flavors import FLAVORS
from .text import show
from .rules import EXPERT_POLICIES

if TYPE_CHECKING:
    from .plan import Plan

# Sizes in the usual spellings: 5G = 5GB = 5e9 bytes (as the hub's max_shard_size), 5GiB = 5Gi = 5 * 2^30.
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size(_ctx, _param, value: str | int) -> int:
    if isinstance(value, int):
        return value
    s = value.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        n = int(float(num) * _UNITS[unit])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{value!r} is not a size like 5GB or 512MiB") from None
    if n <= 0:
        raise click.BadParameter("must be positive")
    return n


def _size_or_auto(ctx, param, value: str | int | None) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return _size(ctx, param, value)


def _common(f):
    opts = [
        click.option("--format", "fmt", type=click.Choice(sorted(formats.FORMATS), case_sensitive=False),
                     required=True, help="Output number format (any case: nvfp4 = NVFP4)."),
        click.option("--flavor", type=click.Choice(sorted(FLAVORS), case_sensitive=False), default=None,
                     help="modelopt (hf_quant_config.json; vLLM, SGLang, TensorRT-LLM), compressed-tensors "
                          "(vLLM, SGLang, transformers) or block-fp8 (quant_method fp8, 128x128 tiles; all four). "
                          "Default: the format's own (modelopt for nvfp4, compressed-tensors for fp8, block-fp8 "
                          "for fp8-block); a pair that cannot be served is refused."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
        click.option("--expert-policy", type=click.Choice(EXPERT_POLICIES), default="shared", show_default=True,
                     help="shared: all experts of a layer share one scale per projection set; "
                          "per-expert: each expert's gate+up share one, its down another."),
        click.option("--format-for", "format_for", multiple=True, metavar="SELECTOR=FORMAT",
                     help="Mixed precision: quantizers SELECTOR picks take FORMAT (or keep: high precision). "
                          "SELECTOR: attention, experts, shared-experts, mlp, a rule name, or a regex that must "
                          "match a whole tensor or module name (full match). E.g. --format nvfp4 --format-for "
                          "attention=fp8-block. One that picks nothing is a warning (an error with --strict)."),
        click.option("--rules", "rules_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML or JSON file of rule rows ([[rule]]; pattern: a regex matching whole tensor "
                          "names), tried before the built-in table, and format choices ([[format]] select, "
                          "format), tried after --format-for. A row that matches no tensor is a warning (an error "
                          "with --strict)."),
        click.option("--include", multiple=True, metavar="REGEX",
                     help="Quantize 2-D weights no rule claims whose whole tensor or module name matches "
                          "(full match: '.*custom_proj', not 'custom_proj'), each as its own quantizer."),
        click.option("--exclude", multiple=True, metavar="REGEX",
                     help="Keep in high precision tensors whose whole name, or module name, matches (full "
                          "match: 'model.layers.0.mlp.*' or '.*o_proj'; a fused set is kept whole)."),
        click.option("--strict", is_flag=True,
                     help="Errors instead of warnings: a 2-D weight no rule claims, and an --include, --exclude, "
                          "--format-for or rules-file row that matches nothing."),
        click.option("--max-shard-size", callback=_size, default="5GB", show_default=True,
                     help="Largest output shard, e.g. 5GB."),
        click.option("--scale-search", type=click.Choice(["none", "mse"]), default="none", show_default=True,
                     help="Block scales by round to nearest (none: ModelOpt's bytes), or mse: per block the scale "
                          "among RTN's and its neighbours with the least squared error (nvfp4, mxfp4, mxfp8, fp8-block; "
                          "CPU and GPU give the same bytes)."),
        click.option("--mx-source", type=click.Choice(["cast", "requantize"]), default="cast", show_default=True,
                     help="A source with MXFP4 weights: cast them into NVFP4 code for code (lossless where every "
                          "block fits), or decode and re-quantize them by round to nearest."),
        click.option("--memory-budget", callback=_size, default="8GiB",
                     show_default=True, help="Groups larger than this are read twice instead of held."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shardquant")
def main() -> None:
    """Stream a Hugging Face safetensors checkpoint to NVFP4 or FP8, without building the model."""


@main.command()
@click.argument("src")
@_common
@click.option("--output", "-o", required=True, type=click.Path(), help="Output directory.")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPU when cupy sees one), cpu, cuda or cuda:N.")
@click.option("--devices", default=None, metavar="LIST",
              help="Spread quantizers over these GPUs of this host: 0,1,... or all.")
@click.option("--gpu-memory", callback=_size_or_auto, default="auto", show_default=True,
              help="Device bytes a quantizer may be held in between its amax and quantize passes; auto: "
                   "80% of the GPU's free memory. A quantizer larger than --memory-budget that fits here "
                   "is read once, member by member, onto the GPU.")
@click.option("--force", is_flag=True, help="Write into a non-empty output directory.")
@click.option("--dry-run", is_flag=True, help="Plan and print, read no weights, write nothing.")
@click.option("--verify", "verify_output", is_flag=True,
              help="Check the output's contract (as `shardquant verify`) before declaring success.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def convert(src, output, device, devices, gpu_memory, force, dry_run, verify_output, quiet, **kw) -> None:
    """Convert checkpoint SRC (a directory or an org/name hub repo)."""
    if not dry_run:  # before the imports below: the disk reads the first shard, the GPU starts
        from .startup import early_warm_start, gpu_start

        early_warm_start(src, ahead=True)
        gpu_start(device, devices)
    from .convert import convert as run

    shown: set[str] = set()  # warnings printed at the start are not printed again at the end

    def started(plan: Plan, where: str) -> None:
        interrupt.describe(lambda: _interrupted_line(plan, output, force))
        _warn(plan, quiet, shown)
        if not quiet:
            ck = plan.checkpoint
            down = ck.download_bytes  # a hub source: downloaded while it converts (shardquant/hub.py)
            click.echo(f"converting on {where}: {_count(len(plan.groups), 'quantizer')} into "
                       f"{_count(len(plan.shards), 'shard')} in {output}"
                       + (f", downloading {_human(down)} from {ck.repo} as it goes" if down else ""), err=True)

    interrupt.describe(lambda: f"interrupted before converting; nothing was written to {output}")
    with _quiet_libraries(quiet, src):
        res = _guard(lambda: run(src, output, device=device, devices=devices, gpu_memory=gpu_memory, force=force,
                                 dry_run=dry_run, verify=verify_output,
                                 progress=not quiet and not dry_run, on_start=started, **kw))
    _warn(res.plan, quiet, shown)
    if dry_run:
        _print_plan(res.plan)
        return
    interrupt.describe(lambda: f"interrupted; {output} is finished")
    if res.complete:
        if not quiet:
            click.echo(f"{output}: already complete; {res.resumed} shards match their checksums, nothing written", err=True)
        return
    if res.resumed and not quiet:
        click.echo(f"resumed: kept {res.resumed} finished shards", err=True)
    if not quiet:
        once = res.bytes_read - res.reread_bytes  # source bytes, each counted once
        rate = f"{once / max(res.seconds, 1e-9) / 1e6:.0f} MB/s of input"
        if res.reread_bytes:
            again = res.reread_bytes
            amount = f"{again / 1e9:.2f} GB" if again >= 10**8 else f"{again / 1e6:.2f} MB"
            rate += f"; {amount} of quantizers over --memory-budget read a second time"
        click.echo(
            f"wrote {output}: {_count(len(res.plan.groups), 'quantizer')}, {_count(len(res.plan.shards), 'shard')}, "
            f"{res.plan.output_bytes / 1e9:.3f} GB in {res.seconds:.1f} s ({rate}) on {res.device}",
            err=True,
        )
        if verify_output:
            click.echo(f"verified: {output} meets the {res.plan.flavor} contract", err=True)


@main.command()
@click.argument("src")
@_common
@click.option("--verbose", "-v", is_flag=True, help="One row per quantizer (default: the largest 40).")
@click.option("--tensors", is_flag=True, help="Also one row per source weight: how it is stored (encoding, "
              "scale tensors) and what becomes of it (its quantizer and format, a cast and its blocks out of "
              "range, or kept and why).")
@click.option("--gpu-memory", "device_memory", callback=_size_or_auto, default=None, metavar="SIZE",
              help="Plan for a GPU conversion whose quantizers may be held in SIZE of device memory "
                   "(e.g. 110GiB on an H200); default: a CPU conversion.")
def plan(src, verbose, tensors, **kw) -> None:
    """Print the quantizer table, totals and estimated peak memory for SRC; read no weights."""
    from .plan import prepare

    p = _guard(lambda: prepare(src, **kw))
    _warn(p, False)
    _print_plan(p, limit=None if verbose else 40)
    if tensors:
        _print_tensors(p)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
def inspect(directory) -> None:
    """Summarise the scale manifest of a converted checkpoint; for a source checkpoint (no manifest),
    how each of its weights is stored."""
    from . import manifest
    from .source import INDEX_NAME

    path = Path(directory) / manifest.MANIFEST_NAME
    if not path.exists():
        if (Path(directory) / INDEX_NAME).exists() or any(Path(directory).glob("*.safetensors")):
            return _inspect_source(Path(directory))
        _fail(f"{path}: no scale manifest here (not a shardquant output?), and no safetensors checkpoint")
    m = _guard(lambda: manifest.load(path))
    try:
        qs = m["quantizers"]
        src = m["source"]
        click.echo(f"format {m['format']} ({m['flavor']} flavor), expert policy {m['expert_policy']}, "
                   f"shardquant {m['tool']['version']}")
        click.echo(f"source {src.get('repo') or src.get('path')}"
                   + (f" @ {src['revision']}" if src.get("revision") else ""))
        click.echo(f"{len(qs)} quantizers over {len(m['tensors'])} tensors; {len(m['excluded'])} tensors kept")
        rows = sorted(qs.items(), key=lambda kv: -len(kv[1]["members"]))
        click.echo(f"{'quantizer':60s} {'members':>7s} {'amax':>12s} {'global scale':>14s}")
        for k, q in rows[:40]:
            gs = "-" if q["global_scale"] is None else format(q["global_scale"], "14.6g")  # None: block scales only
            click.echo(f"{show(k, quote=False)[:60]:60s} {len(q['members']):7d} {q['amax']:12.6g} {gs:>14s}")
        casts: dict[str, list[int]] = {}  # codes kept from an MX source (docs/formats.md "Quantized sources")
        for q in qs.values():
            if "cast" in q:
                c = casts.setdefault(q["cast"]["from"], [0, 0])
                c[0], c[1] = c[0] + 1, c[1] + q["cast"]["requantized_blocks"]
        for kind, (n, blocks) in sorted(casts.items()):
            click.echo(f"cast: {n} quantizer{'s' * (n != 1)} kept the source's {kind} codes; {blocks} block"
                       f"{'s' * (blocks != 1)} out of the scale range re-quantized")
        reasons: dict[str, int] = {}
        for e in m["excluded"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        for r, n in sorted(reasons.items()):
            click.echo(f"kept: {n:6d}  {show(r, quote=False)}")
    except (KeyError, TypeError, AttributeError):
        _fail(f"{path}: malformed scale manifest")


@main.command()
@click.argument("zoo", type=click.Path(dir_okay=False))
@click.option("--devices", default=None, metavar="LIST",
              help="GPUs to use, one worker process each: indices (0,1,3) or all. Default: --device, --workers.")
@click.option("--device", default="auto", show_default=True, help="Where workers convert without --devices.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes on --device, or per GPU with --devices (each converts one job at a time; "
                   "2 per GPU overlap one job's start and reads with another's last writes).")
@click.option("--verify", "verify_mode", type=click.Choice(["source", "contract", "none"]), default="source",
              show_default=True, help="After each conversion: verify --source (SQNR per tensor, engines), the "
                                      "contract alone, or nothing. An output already complete gets the contract.")
@click.option("--report", type=click.Path(file_okay=False), default=None,
              help="Directory for shardquant-batch-summary.json and .md (default: beside the zoo file).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Run each job as a Ray task (one GPU with --device cuda, else one CPU) on the cluster at ADDRESS "
                   "(default: auto, the one this machine belongs to; local: start one on this machine). Outputs "
                   "must be on a path every node shares or at an object-store URI (output = \"s3://...\"). Needs "
                   "`pip install 'shardquant[ray]'`.")
@click.option("--download-ahead", "download_budget", callback=_size, default="200GB", show_default=True,
              help="Hub sources download ahead of their jobs, up to this much not yet converted.")
@click.option("--evict-source", is_flag=True,
              help="Once all jobs of a hub source succeeded, delete the files this batch downloaded for it from "
                   "the hub cache (a zoo larger than the disk).")
@click.option("--push-to", "push_to", default=None, metavar="ORG",
              help="Upload each finished, verified output to the hub repo ORG/<output directory name> (or the zoo's "
                   "push_name), with the verify results in its card; resumable. The token is huggingface_hub's "
                   "(HF_TOKEN or `hf auth login`).")
@click.option("--push-private", is_flag=True, help="With --push-to: repos the push creates are private.")
@click.option("--dry-run", is_flag=True, help="Check the zoo and plan every job (headers only); convert nothing. "
                                              "With --push-to: what would be pushed where.")
@click.option("--quiet", "-q", is_flag=True, help="No per-job lines.")
def batch(zoo, devices, device, workers, verify_mode, report, ray_address, download_budget, evict_source, push_to,
          push_private, dry_run, quiet) -> None:
    """Convert every model of ZOO (a TOML file) into each of its formats; see `shardquant.batch`."""
    from . import batch as b
    from .publish import Push, cell, repo_problem

    where = Path(report) if report else Path(zoo).resolve().parent
    push = None
    if push_to is not None:
        why = "a namespace has no /" if "/" in push_to else repo_problem(push_to)
        if why is not None:
            _fail(f"--push-to {push_to!r}: not a hub namespace (a user or organization name): {why}")
        if verify_mode == "none":
            _fail("--push-to pushes verified outputs only: leave out --verify none")
        push = Push(push_to, where, push_private)
    elif push_private:
        _fail("--push-private needs --push-to ORG")
    jobs = _guard(lambda: b.load_zoo(zoo, push_to))
    if dry_run:
        _plan_jobs(jobs, push)
        return
    if push is not None:
        from .hub import token_present

        if not token_present():
            _fail("--push-to needs a hub token: set HF_TOKEN or run `hf auth login`")
    places = None
    if devices:
        idx = _device_list(devices)
        places = [f"cuda:{i}" for i in idx]
    width = max(len(j.label) for j in jobs)

    def event(kind, job, r) -> None:
        if quiet:
            return
        if kind == "start":
            click.echo(f"{job.label:{width}s}  started", err=True)
        elif kind == "pushed":
            click.echo(f"{job.label:{width}s}  {cell(r.push)}", err=True)
        elif r.status == "failed":
            click.echo(f"{job.label:{width}s}  FAILED: {r.error}", err=True)
        else:
            rate = f", {r.gb_per_s:.2f} GB/s" if r.gb_per_s else ""
            sq = f", worst SQNR {r.worst_sqnr_db:.1f} dB" if r.worst_sqnr_db is not None else ""
            what = "already complete, verified" if r.status == "skipped" else r.status
            click.echo(f"{job.label:{width}s}  {what} ({r.seconds:.1f} s{rate}{sq})", err=True)

    if ray_address is not None:
        from .ray_jobs import run_on_ray

        address = None if ray_address == "local" else ray_address
        results = _guard(lambda: run_on_ray(jobs, address=address, device="cpu" if device == "auto" else device,
                                            verify_mode=verify_mode, on_event=event, push=push))
    else:
        results = _guard(lambda: b.run(jobs, device=device, devices=places, workers=workers, verify_mode=verify_mode,
                                       on_event=event, download_budget=download_budget, evict_source=evict_source,
                                       push=push))
    try:
        js, md = b.write_summary(results, where)
    except OSError as e:
        _fail(f"{e.filename}: cannot write the summary ({e.strerror or e})")
    failed = [r for r in results if r.status == "failed"]
    push_failed = [r for r in results if r.push is not None and r.push["status"] == "failed"]
    pushed = "" if push is None else (
        f"; {sum(r.push['status'] in ('pushed', 'already pushed') for r in results)} pushed to {push.org}"
        + (f", {len(push_failed)} push(es) failed" if push_failed else ""))
    click.echo(f"{len(results) - len(failed)} of {len(results)} jobs done "
               f"({sum(r.status == 'skipped' for r in results)} already complete){pushed}; summary: {md}", err=True)
    sys.exit(1 if failed or push_failed else 0)


def _device_list(devices: str) -> list[int]:
    if devices == "all":
        try:
            import cupy

            return list(range(cupy.cuda.runtime.getDeviceCount()))
        except Exception as e:  # no CuPy, no driver: one line
            _fail(f"--devices all: no CUDA devices visible ({e})")
    try:
        idx = [int(x) for x in devices.split(",") if x.strip()]
    except ValueError:
        _fail(f"--devices must be GPU indices like 0,1 or all, not {devices!r}")
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0:
        _fail(f"--devices must be distinct GPU indices like 0,1 or all, not {devices!r}")
    return idx


def _plan_jobs(jobs, push=None) -> None:
    """--dry-run: each job's plan from the headers: sizes, memory and the formats of its quantizers;
    with `push` (shardquant/publish.py Push), the repo each output would be pushed to, its files and bytes."""
    from .plan import prepare
    from .publish import plan_line

    failed = 0
    for j in jobs:
        try:
            p = prepare(j.source, options=j.options)
        except ShardquantError as e:
            failed += 1
            click.echo(f"{j.label}: cannot be planned: {e}")
            continue
        per = {}
        for g in p.groups:
            per[g.format] = per.get(g.format, 0) + 1
        fmts = ", ".join(f"{n} {f}" for f, n in sorted(per.items()))
        click.echo(f"{j.label}: {p.flavor} flavor; quantizers {fmts}; source {_human(p.source_bytes)} -> output "
                   f"{_human(p.output_bytes)} in {len(p.shards)} shards at {j.output}; peak memory "
                   f"{_human(p.peak_bytes)}" + (f"; {_human(p.checkpoint.download_bytes)} to download"
                                                 if p.checkpoint.download_bytes else ""))
        if push is not None:
            click.echo(plan_line(j, p, push))
    if push is not None:
        from .hub import token_present

        if not token_present():
            failed += 1
            click.echo("push: no hub token (set HF_TOKEN or run `hf auth login`): every push would fail")
    if failed:
        sys.exit(1)


def _engine_names() -> list[str]:
    """The rule tables' engine column, in their order (shardquant/engines.py tables), read from the
    tables' JSON alone: --help does not import the engines module (NumPy)."""
    import json

    found = []
    for path in sorted(Path(__file__).with_name("engine_rules").glob("*.json")):
        t = json.loads(path.read_text(encoding="utf-8"))
        found.append((t.get("order", 0), t["engine"]))
    return [name for _, name in sorted(found)]


@main.command("verify")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--source", default=None, metavar="SRC",
              help="Source checkpoint (directory or org/name): dequantize every quantized tensor and compare.")
@click.option("--revision", default=None, help="Hub revision of --source.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None,
              help="Write the full report (violations, and with --source every tensor's SQNR) as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="With --source: PNG heat map of SQNR by layer (rows) and projection (columns).")
@click.option("--min-sqnr", type=float, default=None,
              help="With --source: a tensor below this SQNR (dB) is a violation [nvfp4 10, fp8 20].")
@click.option("--top", default=10, show_default=True, help="Worst tensors listed.")
@click.option("--no-hashes", is_flag=True,
              help="Check file sizes against the scale manifest but skip reading every file for its SHA-256.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing; the exit status says it all.")
@click.option("--engine", multiple=True, type=click.Choice(_engine_names()),
              help="Check this engine's loading contract (repeatable): any finding of it fails. Default: every "
                   "engine, summarised, failing only a checkpoint that none of them serves.")
@click.option("--device", default="auto", show_default=True,
              help="With --source: where tensors are decoded and compared: auto (a GPU when CuPy sees one), cpu, "
                   "cuda or cuda:N. The verdicts are the same.")
def verify_cmd(directory, source, revision, json_file, plot, min_sqnr, top, no_hashes, quiet, engine, device) -> None:
    """Check that DIRECTORY is a well-formed NVFP4/FP8 checkpoint (modelopt or compressed-tensors
    flavor, from any producer) and that every file matches the scale manifest's sizes and SHA-256
    (when it has one); exit status 1 on any violation."""
    import json

    from . import engines
    from .report import render, write_heatmap
    from .verify import verify

    if plot and source is None:
        raise click.UsageError("--plot needs --source")
    with _quiet_libraries(quiet, source):
        rep = _guard(lambda: verify(directory, source, revision=revision, min_sqnr=min_sqnr, hashes=not no_hashes,
                                    engines=list(engine) or None, device=device))
    if not quiet:
        head, _, verdict = render(rep, top=top).rpartition("\n")  # the engines' lines before the verdict
        click.echo("\n".join([head, *engines.summary_lines(rep), verdict]))
    interrupt.describe(lambda: "interrupted; the --json and --plot files may be incomplete")
    try:
        if json_file:
            Path(json_file).write_text(json.dumps({**rep.to_dict(top), **engines.report_dict(rep)}, indent=2) + "\n",
                                       encoding="utf-8")
        if plot and rep.tensors:
            write_heatmap(plot, rep)
    except OSError as e:
        _fail(f"{e.filename}: cannot write ({e.strerror or e})")
    sys.exit(0 if rep.ok else 1)


def _print_plan(p: Plan, limit: int | None = None) -> None:
    click.echo(f"{p.flavor} flavor; format{'s' * (len(p.formats) > 1)} {', '.join(p.formats)}")
    click.echo(f"{'quantizer':64s} {'format':>11s} {'members':>7s} {'shape':>14s} {'source MB':>10s} {'output MB':>10s}")
    rows = sorted(p.groups, key=lambda g: -g.source_bytes)
    for g in rows[:limit]:
        out = sum(p.member_out_bytes(m) for m in g.members)
        shapes = {m.shape for m in g.members}
        shape = "x".join(map(str, next(iter(shapes)))) if len(shapes) == 1 else "mixed"
        flag = (" (2 passes)" if g.two_pass else " (on the GPU)" if g.on_device else
                " (cast member by member)" if g.streamed else "")
        click.echo(f"{show(g.key, quote=False)[:64]:64s} {g.format:>11s} {len(g.members):7d} {shape:>14s} "
                   f"{g.source_bytes / 1e6:10.2f} {out / 1e6:10.2f}{flag}")
    if limit is not None and len(rows) > limit:
        click.echo(f"... {len(rows) - limit} more (use --verbose)")
    kept = sum(u.source_bytes for u in p.units if u.kept is not None)
    click.echo(
        f"total: {len(p.groups)} quantizers, {sum(len(g.members) for g in p.groups)} tensors quantized, "
        f"{len(p.excluded)} kept ({kept / 1e6:.2f} MB); source {p.source_bytes / 1e6:.2f} MB -> "
        f"output {p.output_bytes / 1e6:.2f} MB in {len(p.shards)} shards"
    )
    click.echo(f"source bytes read: {p.read_factor:.2f}x the source"
               + (f" (GPU conversion, quantizers held in up to {p.device_memory / 1e9:.0f} GB of device memory)"
                  if p.device_memory is not None else " (CPU conversion)"))
    click.echo(f"estimated peak memory: {p.peak_bytes / 1e6:.0f} MB")
    ck = p.checkpoint
    for line in _source_encodings(p, ck) + list(ck.fused_notes):
        click.echo(line)
    if ck.hub is not None:  # a hub source: what a conversion downloads, and what it leaves on the hub
        todo = ck.hub.missing(ck.root)
        click.echo(f"download: {_human(ck.download_bytes)} ({len(todo)} of the {len(ck.hub.sizes)} files the "
                   f"conversion reads from {ck.repo}@{ck.revision[:12]} are not in the hub cache; "
                   f"{len(ck.hub.skipped)} other files of the repo are never downloaded)")
    click.echo(f"disk needed: {_human(ck.download_bytes + p.output_bytes)} ({_human(ck.download_bytes)} into the hub "
               f"cache, {_human(p.output_bytes)} of output)")
    from .plan import estimated_seconds

    secs, how = estimated_seconds(p)
    click.echo(f"estimated time: {_duration(secs)} (a rough estimate: {how})")


def _inspect_source(root: Path) -> None:
    """A source checkpoint's weights as its headers and config store them (shardquant/encoding.py
    recognize): one row per weight stored quantized or as fused 3-D experts, then the plain tensors by
    dtype. Reads headers only."""
    from . import encoding
    from .source import quantization_config, scan

    ck = _guard(lambda: scan(root))
    layout = _guard(lambda: encoding.recognize(ck.tensors, ck.config))
    special = [e for e in layout.encodings.values() if e.kind != encoding.PLAIN]
    plain: dict[str, int] = {}
    for e in layout.encodings.values():
        if e.kind == encoding.PLAIN:
            plain[e.dtype] = plain.get(e.dtype, 0) + 1
    qc = quantization_config(ck.config)
    click.echo(f"source {root}: {len(ck.tensors)} tensors in {len({t.file for t in ck.tensors.values()})} files"
               + (f"; quantization_config quant_method {show(str(qc.get('quant_method')), quote=False)}"
                  if isinstance(qc, dict) else ""))
    width = max((len(show(e.name, quote=False)) for e in special), default=0)
    if special:
        click.echo(f"{'weight':{width}s} {'logical shape':>16s}  stored as (tensors read)")
    for e in special:
        shape = ("x".join(map(str, e.shape)) + (f" x{e.experts}" if e.experts else "")) if e.shape else "-"
        stem = e.name.rsplit(".", 1)[0] + "." if "." in e.name else ""
        read = " + ".join(show(n[len(stem):] if n.startswith(stem) else n, quote=False) for n in e.tensors)
        click.echo(f"{show(e.name, quote=False):{width}s} {shape:>16s}  {encoding.describe(e)} ({read})")
    for dtype, n in sorted(plain.items()):
        click.echo(f"plain {dtype}: {n} tensor{'s' * (n != 1)}")
    click.echo("what a conversion does with each: shardquant plan SRC --format F --tensors")


def _print_tensors(p: Plan) -> None:
    """plan --tensors: every planned weight, how the source stores it and what becomes of it."""
    from .encoding import describe

    ck = p.checkpoint
    where = {m.name: g for g in p.groups for m in g.members}
    kept = {e["name"]: e["reason"] for e in p.excluded}
    out_of_range = _cast_out_of_range(p)
    width = max((len(show(n, quote=False)) for n in ck.tensors), default=0)
    click.echo(f"{'tensor':{width}s} {'stored as':40s} becomes")
    for name, t in ck.tensors.items():
        enc = getattr(t, "encoding", None)
        stored = describe(enc) if enc is not None and getattr(t, "parts", None) else t.dtype
        g = where.get(name)
        if g is None:
            what = f"kept: {kept.get(name, 'not a weight')}"
        elif g.cast is not None:
            n, total = out_of_range.get(name, (0, 0))
            what = f"cast into {g.format}, codes kept ({n} of {total} blocks outside its scale range) in {g.key}"
        else:
            what = f"{g.format} in {g.key}" + (" (decoded to BF16 as read)" if getattr(t, "parts", None) else "")
        click.echo(f"{show(name, quote=False):{width}s} {stored:40s} {show(what, quote=False)}")


def _cast_out_of_range(p: Plan) -> dict[str, tuple[int, int]]:
    """{member: (blocks outside the target's scale range, blocks)} of every lossless cast, from the
    scale tensors alone (1/16 of the codes; re-quantized unless all zero: docs/formats.md)."""
    import numpy as np

    from . import decode
    from .st import read_raw

    counts: dict[str, tuple[int, int]] = {}
    for g in p.groups:
        if g.cast is None:
            continue
        e8m0 = [read_raw(m.parts[1]).view(np.uint8) for m in g.members]
        top = decode.mx_global_exponent(decode.e8m0_group_max(e8m0, g.key))
        for m, b in zip(g.members, e8m0):
            d = b.astype(np.int32) - decode.E8M0_BIAS - top
            counts[m.name] = (int(np.count_nonzero((d < decode.E4M3_KMIN) | (d > decode.E4M3_KMAX))), int(b.size))
    return counts


def _source_encodings(p: Plan, ck) -> list[str]:
    """A source stored quantized: each encoding, how many weights have it and what happens to them;
    for a lossless cast, how many blocks fall outside the target's scale range (read from the scale
    tensors alone, 1/16 of the codes: re-quantized, unless all zero)."""
    decoded = [t for t in ck.tensors.values() if getattr(t, "parts", None)]
    if not decoded:
        return []
    from . import decode
    from .encoding import describe

    cast = {m.name: g for g in p.groups if g.cast is not None for m in g.members}
    by: dict[tuple[str, str | None], list] = {}
    for t in decoded:
        g = cast.get(t.name)
        by.setdefault((describe(t.encoding), g.format if g else None), []).append(t)
    lines = []
    counts = _cast_out_of_range(p) if cast else {}
    for (what, into), ts in by.items():
        stored = sum(t.stored_bytes for t in ts)
        scales = sum(len(t.encoding.scales) for t in ts)
        head = f"source stored quantized: {len(ts)} weights {what} ({stored / 1e6:.2f} MB), "
        tail = f"; their {scales} scale tensors are not copied"
        if into is None:
            lines.append(head + f"decoded to BF16 as they are read ({sum(t.nbytes for t in ts) / 1e6:.2f} MB, the "
                         "sizes above)" + tail)
            continue
        out, total = (sum(counts[t.name][i] for t in ts) for i in (0, 1))
        lines.append(head + f"cast into {into} code for code; {out} of {total} blocks of {decode.MX_BLOCK} fall "
                     "outside its scale range (re-quantized unless all zero)" + tail)
    return lines


def _human(n: int) -> str:
    for unit, name in ((1e12, "TB"), (1e9, "GB")):
        if n >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n / 1e6:.2f} MB"


def _duration(s: float) -> str:
    if s < 90:
        return f"{max(s, 1):.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _warn(p: Plan, quiet: bool, shown: set[str] | None = None) -> None:
    """Each warning once (those in `shown` were printed already), similar ones grouped into one line."""
    shown = set() if shown is None else shown
    new = [w for w in dict.fromkeys(p.warnings) if w not in shown]
    shown.update(new)
    if quiet:
        return
    lines = group_warnings(new)
    for w in lines[:20]:
        click.echo(f"warning: {w}", err=True)
    if len(lines) > 20:
        click.echo(f"warning: ... and {len(lines) - 20} more", err=True)


# Warnings that differ only in the name they are about (shardquant/plan.py, convert.py): several of
# one kind become one line with a count and the first names. (pattern, one line for n of them)
_SIMILAR = (
    (re.compile(r"(?P<name>.+?): kept in high precision \((?P<why>.*)\)"),
     "{n} tensors kept in high precision ({why})"),
    (re.compile(r"quantizer (?P<name>.+?) kept in high precision as a whole: (?P<first>.*)"),
     "{n} quantizers kept in high precision as a whole (the first: {first})"),
    (re.compile(r"quantizer (?P<name>.+?) \((?P<size>[0-9.]+ GB)\) exceeds the memory budget: read twice(?P<why>.*)"),
     "{n} quantizers exceed the memory budget: read twice{why}"),
    (re.compile(r"quantizer (?P<name>.+?) \((?P<size>[0-9.]+ GB)\) exceeds --gpu-memory: (?P<why>.*)"),
     "{n} quantizers exceed --gpu-memory: {why}"),
)
_NAMES_SHOWN = 3


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def group_warnings(warnings: list[str]) -> list[str]:
    """One line per distinct warning, in order of first appearance; warnings of one kind (_SIMILAR,
    the same reason) become one line at the place of the first: "40 tensors kept in high precision
    (no rule claims this 2-D weight): a, b, c and 37 more"."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    order: list[tuple] = []
    # plan.py says a fused set is kept once for the quantizer and once per member: the quantizer's line says it all
    whole = {m["first"] for w in warnings if (m := _SIMILAR[1][0].fullmatch(w))}
    for w in dict.fromkeys(warnings):
        m = _SIMILAR[0][0].fullmatch(w)
        if m and m["why"].startswith("fused set not quantizable: ") and \
                m["why"].removeprefix("fused set not quantizable: ") in whole:
            continue
        key: tuple = ("one", w)
        fields: dict = {}
        for i, (rx, _) in enumerate(_SIMILAR):
            m = rx.fullmatch(w)
            if m:
                fields = m.groupdict()
                key = (i, fields.get("why"))  # the same kind and reason
                break
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((w, fields))
    out = []
    for key in order:
        items = groups[key]
        if len(items) == 1:
            out.append(items[0][0])
            continue
        first = items[0][1]
        names = [f["name"] + (f" ({f['size']})" if f.get("size") else "") for _, f in items]
        more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
        out.append(_SIMILAR[key[0]][1].format(n=len(items), **first)
                   + ": " + ", ".join(names[:_NAMES_SHOWN]) + more)
    return out


def _interrupted_line(plan: Plan, output: str, force: bool) -> str:
    """What a Ctrl-C during the conversion leaves in the output (shardquant/interrupt.py): finished
    shards are complete files under their own names (shardquant/pipeline.py renames a shard into place
    once it is whole); the shard being written resumes from its last checkpoint."""
    import json

    from .journal import JOURNAL_NAME
    from .source import INDEX_NAME

    out = Path(output).expanduser()
    if (out / INDEX_NAME).is_file():
        return f"interrupted; {output} is a finished checkpoint (its index is written)"
    done = sum((out / fname).is_file() for fname, _ in plan.shards)
    part = ""
    try:
        partial = json.loads((out / JOURNAL_NAME).read_text(encoding="utf-8")).get("partial") or {}
        if partial:
            part = f" (and {', '.join(sorted(partial))[:120]} up to its last checkpoint)"
    except (OSError, ValueError, AttributeError):
        pass
    again = "run it again without --force to resume (with --force it starts over)" if force else \
        "run the same command again to resume"
    return f"interrupted: {done} of {len(plan.shards)} shards finished and kept in {output}{part}; {again}"


@contextlib.contextmanager
def _quiet_libraries(quiet: bool, src: str | None):
    """--quiet: no Python warnings from the libraries and no huggingface_hub progress bars (a hub source
    only: huggingface_hub is a slow import); the settings are restored afterwards."""
    if not quiet:
        yield
        return
    import warnings

    undo = None
    if src is not None and not Path(src).expanduser().exists():
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo = enable_progress_bars
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if undo is not None:
            undo()


def _guard(fn):
    """Run the command's work: a ShardquantError is one line; Ctrl-C unwinds the work, then one line
    (shardquant/interrupt.py), status 130."""
    with interrupt.guarded():
        try:
            return fn()
        except ShardquantError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            interrupt.exit_interrupted()


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
