"""Whose files are in the output directory, and what this run may do with them.

Called with the directory's lock held (shardquant/lock.py). The records that make a file ours: the
resume journal of an unfinished conversion (every file it wrote or was about to write), the
manifest of a finished one (every file it wrote, with size and SHA-256), and the run tokens in
temporary names (shardquant/writer.py). Everything else belongs to someone else: it is never
removed or replaced; if this run would have to write over it, the run stops before touching
anything, naming it.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field

from . import manifest
from .errors import OutputError
from .journal import JOURNAL_NAME, Journal, fingerprint, plain_name, recipe
from .lock import LOCK_NAME
from .plan import Plan
from .source import INDEX_NAME
from .writer import TMP_RE, OutputDir

MAX_MANIFEST_BYTES = 1 << 30
_LIST = 8  # names shown in a message


@dataclass
class Claim:
    journal: Journal | None
    done: set[str] = field(default_factory=set)  # shards a previous run finished, still intact
    complete: bool = False  # a finished output of this same recipe, every file intact: nothing to do
    warnings: list[str] = field(default_factory=list)
    # shard -> (temporary file, tensors in it, its size, hash state): unfinished shards resumed mid-way
    partial: dict[str, tuple] = field(default_factory=dict)


def _names(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _LIST} more" if len(names) > _LIST else ""
    return ", ".join(repr(n)[1:-1] if n.isprintable() else repr(n) for n in names[:_LIST]) + more


def _previous_manifest(od: OutputDir) -> dict | None:
    """A finished shardquant output's record: {"files": {...}, "recipe": str | None}, or None when
    the manifest is absent or not one of ours (a file of that name is then someone else's)."""
    raw = od.read_bytes(manifest.MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if raw is None:
        return None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("tool"), dict) or m["tool"].get("name") != "shardquant":
        return None
    files = m.get("files")
    if not isinstance(files, dict) or not all(plain_name(n) for n in files):
        return None
    recs = {}
    for n, v in files.items():
        ok = (isinstance(v, dict) and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64
              and type(v.get("size")) is int and v["size"] >= 0)
        recs[n] = {"sha256": v["sha256"], "size": v["size"]} if ok else None
    rc = m["tool"].get("recipe")
    return {"files": recs, "recipe": rc if isinstance(rc, str) else None}


def claim_output(od: OutputDir, plan: Plan, force: bool, previous_tokens: set[str]) -> Claim:
    """Decide, before writing anything but the lock, whether this run starts, resumes, has nothing to
    do, or must stop; then write its journal and clear its own leftovers."""
    # the lock, and lock temporaries of runs racing this one for it (shardquant/lock.py: each prepares
    # its lock under a temporary name; the losers remove theirs): never files of a conversion
    entries = {n: st for n, st in od.entries().items()
               if n != LOCK_NAME and not ((m := TMP_RE.fullmatch(n)) and m["name"] == LOCK_NAME.lstrip(".")
                                          and m["token"] != od.token)}
    journal = None
    bad_journal: OutputError | None = None
    if JOURNAL_NAME in entries:
        try:
            journal = Journal.load(od)
        except OutputError as e:
            if not force:
                raise
            bad_journal = e  # --force: its name is ours, its list of files is not to be trusted
    tokens = {od.token} | set(previous_tokens) | set(journal.runs if journal else ())
    temps = {n for n, st in entries.items()
             if (m := TMP_RE.fullmatch(n)) and m["token"] in tokens and stat.S_ISREG(st.st_mode)}
    prev = None if journal is not None or bad_journal is not None else _previous_manifest(od)
    owned: set[str] = set(temps)
    if journal is not None:
        owned |= set(journal.files) | {JOURNAL_NAME}
    elif bad_journal is not None:
        owned.add(JOURNAL_NAME)
    elif prev is not None:
        owned |= set(prev["files"]) | {manifest.MANIFEST_NAME}
    fp = fingerprint(plan)
    shard_names = [f for f, _ in plan.shards]
    present_owned = {n for n in owned if n in entries}
    odd = {n for n in present_owned if not stat.S_ISREG(entries[n].st_mode)}
    if odd:
        raise OutputError(f"{od.path}: {_names(odd)}: not a regular file where shardquant wrote one "
                          "(a symlink or directory put there since); move it away and run again")
    claim = Claim(None)

    if journal is not None and not force:
        if journal.fingerprint != fp:
            raise OutputError(f"{od.path}: holds an unfinished conversion made by a different command, version "
                              "or source (or the source changed since); refusing to resume (use --force to start over)")
        _forbid_foreign(od, entries, owned, plan, claim)
        claim.done = journal.valid(shard_names)
        for shard, rec in sorted(journal.partial.items()):  # checkpointed shards, their prefix intact
            sha = (od.prefix(rec["tmp"], rec["size"], rec["sha256"])
                   if shard in shard_names and shard not in claim.done and rec["tmp"] in temps else None)
            if sha is None:
                del journal.partial[shard]
            else:
                claim.partial[shard] = (rec["tmp"], rec["tensors"], rec["size"], sha)
        journal.runs.append(od.token)
        journal.save()
        _clear(od, temps - {t for t, *_ in claim.partial.values()})
        claim.journal = journal
        return claim

    if prev is not None and not force:
        if prev["recipe"] != recipe(plan):
            raise OutputError(f"{od.path}: holds a finished conversion made by a different command, version or "
                              "source; refusing to overwrite it (use --force to replace it)")
        _forbid_foreign(od, entries, owned, plan, claim)
        want = dict(prev["files"])
        good = {n for n, rec in want.items() if rec and n in entries and od.digest(n) == (rec["size"], rec["sha256"])}
        if good == set(want) and set(want) >= set(shard_names) and not temps:
            claim.complete = True  # every byte as recorded: nothing to write
            return claim
        # damaged or incomplete: resume from the intact shards, rewriting the rest
        journal = Journal(od, fp, files={n: (want[n] if n in good else None) for n in want},
                          runs=[od.token])
        journal.files[manifest.MANIFEST_NAME] = None
        journal.save()
        _clear(od, temps | {INDEX_NAME, manifest.MANIFEST_NAME})
        claim.journal, claim.done = journal, {n for n in shard_names if n in good}
        return claim

    if journal is None and prev is None and bad_journal is None and set(entries) - temps and not force:
        raise OutputError(f"{od.path}: output directory is not empty and holds no shardquant conversion "
                          f"({_names(set(entries) - temps)}); choose an empty or new directory, or --force to "
                          "write beside these files (they are never removed or overwritten)")

    # a fresh start: an empty directory, or --force over a previous conversion and/or others' files
    _forbid_foreign(od, entries, owned, plan, claim)
    journal = Journal(od, fp, files={n: None for n in present_owned - temps - {JOURNAL_NAME}}, runs=[od.token])
    journal.save()  # from here on the previous conversion's files are recorded as ours to remove
    _clear(od, (temps | present_owned) - {JOURNAL_NAME})
    claim.journal = journal
    return claim


def _forbid_foreign(od: OutputDir, entries: dict, owned: set[str], plan: Plan, claim: Claim) -> None:
    """Stop if a file that is not ours sits where this run will write; warn about the others."""
    from .convert import finish_names

    targets = {f for f, _ in plan.shards} | set(finish_names(plan)) | {JOURNAL_NAME}
    foreign = set(entries) - owned
    clash = foreign & targets
    if clash:
        raise OutputError(f"{od.path}: would overwrite {_names(clash)}, which shardquant did not write "
                          "(no record of this output names them); move them away or choose another output")
    if foreign:
        claim.warnings.append(f"{od.path}: {len(foreign)} file(s) not written by shardquant are left as they are: "
                              f"{_names(foreign)}")


def _clear(od: OutputDir, names: set[str]) -> None:
    for n in sorted(names):
        od.remove(n)
    if names:
        od.sync()
