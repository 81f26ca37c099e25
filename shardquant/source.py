"""Find a checkpoint (local directory or hub repo) and map every tensor to its bytes, headers only."""

from __future__ import annotations

import dataclasses

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from .errors import HeaderError, SourceError
from .st import TensorInfo, read_header
from .text import show, show_path

if TYPE_CHECKING:
    from .hub import HubFiles

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight files in formats that can only be read by unpickling: refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Checkpoint:
    """A source checkpoint planned from its index and shard headers alone."""

    root: Path
    tensors: dict[str, TensorInfo]  # in (file, offset) order
    shards: list[Path]
    config: dict | None
    repo: str | None = None
    revision: str | None = None
    extra_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the output will lack; the plan repeats them
    # A hub source (shardquant/hub.py): the repo's files the conversion reads, with their sizes. `root`
    # is the hub cache's snapshot folder, which may not hold them yet (a plan reads the index,
    # config.json and every shard's header over HTTP ranges, nothing more; a conversion downloads the
    # rest while it converts: start_fetch).
    hub: HubFiles | None = None
    # A source stored quantized (shardquant/encoding.py): `tensors` are then the logical weights (each
    # quantized one a DecodedTensor, scale tensors gone) and `stored` the tensors as the files hold them.
    stored: dict[str, TensorInfo] | None = None
    fused_notes: tuple[str, ...] = ()  # what became of fused 3-D experts, for `plan` (with_decoded)

    @property
    def stored_tensors(self) -> dict[str, TensorInfo]:
        """Every tensor as the files hold it (what is read and hashed)."""
        return self.stored if self.stored is not None else self.tensors

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def download_bytes(self) -> int:
        """Bytes a conversion would still download: hub files not yet in the local cache (0 for a
        local directory)."""
        return self.hub.missing_bytes(self.root) if self.hub is not None else 0


def open_checkpoint(src: str, revision: str | None = None, *, download: bool = True) -> Checkpoint:
    """A local directory, or a hub repo id (org/name). For a hub repo, download=False plans from the
    index, config.json and the shard headers alone (a conversion downloads the rest as it converts);
    download=True also downloads the files the conversion reads (e.g. for `verify --source`)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{show_path(src)}: not a directory (give the checkpoint's directory)")
        if revision:
            raise SourceError(f"{show_path(src)}: --revision applies to hub repos, not a local directory")
        return scan(path.resolve())
    first = Path(src).parts[0] if Path(src).parts else ""
    if src.startswith((".", "/", "~")) or (len(Path(src).parts) > 1 and Path(first).is_dir()):  # a path typo
        raise SourceError(f"{show_path(src)}: no such directory" + ("" if src.startswith((".", "/", "~")) else
                          f" ({show_path(first)} is a local directory, so this is a path, not a hub repo id)"))
    if not _REPO_ID.fullmatch(src):
        raise SourceError(f"{show_path(src)}: no such directory, and not a hub repo id (org/name)")
    from . import hub  # lazy: huggingface_hub is a slow import, needed for hub sources only

    try:
        ck = hub.open_remote(src, revision)
    except SourceError as e:  # a repo that does not exist may be a mistyped local path: say both were tried
        msg = str(e)
        if msg.startswith(f"{src}: ") and ("not found" in msg or "not in the local cache" in msg):
            msg = f"{src} (not a local directory either): {msg[len(src) + 2:]}"
        raise SourceError(msg) from None
    if download:
        hub.download(ck)
    return ck


def check_fetch(ck: Checkpoint) -> None:
    """A hub source: refuse now if the hub cache lacks the space for what is left to download."""
    if ck.hub is not None:
        from . import hub

        hub.check_space(ck)


def start_fetch(ck: Checkpoint, order: list[str] = (), progress: bool = False):
    """A hub source: start downloading, in the background, exactly the files the conversion reads,
    and return the handle whose wait(path) blocks until a file is complete (shardquant/hub.py
    Downloads); None for a local directory, whose files are all there."""
    if ck.hub is None:
        return None
    from . import hub

    return hub.start_download(ck, order, progress, background=True)


def scan(root: Path) -> Checkpoint:
    """Read the index (or the single file) and every shard header; check that they agree."""
    index_path = root / INDEX_NAME
    if index_path.exists():
        _confined(root, index_path, show_path(index_path))
        weight_map = _read_index(index_path)
        # one Path per file: './model-1.safetensors' and 'model-1.safetensors' name the same shard
        paths = {n: _inside(root, n, index_path) for n in sorted(set(weight_map.values()))}
        shards = sorted(set(paths.values()))
    elif (root / SINGLE_NAME).exists():
        weight_map, shards = None, [_inside(root, SINGLE_NAME, root)]
    else:
        found = sorted(root.glob("*.safetensors"))
        if len(found) == 1:
            weight_map, shards = None, [_inside(root, found[0].name, root)]
        elif found:
            raise SourceError(f"{show_path(root)}: {len(found)} .safetensors files but no {INDEX_NAME}")
        elif any(p.suffix in PICKLE_SUFFIXES for p in root.iterdir()):
            raise SourceError(
                f"{show_path(root)}: only pickle checkpoints (.bin/.pt) here; shardquant never unpickles. "
                "Convert to safetensors first, or use a repo that ships .safetensors"
            )
        else:
            raise SourceError(f"{show_path(root)}: no safetensors checkpoint here")
    headers = {}
    for s in shards:
        if not os.path.exists(s):  # unlike Path.exists, never raises (e.g. on a name too long)
            raise HeaderError(f"{show_path(index_path)}: names shard {show(s.name)}, which does not exist")
        if os.path.isdir(s):
            raise HeaderError(f"{show_path(index_path)}: names shard {show(s.name)}, which is a directory"
                              if weight_map is not None else f"{show_path(s)}: a directory, not a safetensors file")
        headers[s] = read_header(s)
        for name in headers[s]:
            _check_name(name, f"{show_path(s)}: header")
    tensors = assemble(weight_map, paths if weight_map is not None else {}, shards, headers, show_path)
    warnings: list[str] = []
    config, config_path = None, root / "config.json"
    if config_path.exists():
        _confined(root, config_path, show_path(config_path))
        config = _read_json(config_path)
    else:
        warnings.append(f"{show_path(root)} has no config.json: the output will have none, and engines need one "
                        "to load it")
    weights = set(shards) | {index_path}
    # Another weight file beside the checkpoint (e.g. Mistral's consolidated.safetensors) is neither
    # part of it nor an ordinary file to copy: said once, by name.
    unused = sorted(p.name for p in root.iterdir()
                    if p.suffix == ".safetensors" and p not in weights and not p.name.startswith("."))
    if unused:
        which = (f"{INDEX_NAME} does not name" if weight_map is not None
                 else f"only {show(shards[0].name, quote=False)} is read, not")
        listed = ", ".join(show(n) for n in unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        warnings.append(f"{show_path(root)}: {which} {listed}: not converted and not copied")
    extra = sorted(
        p for p in root.iterdir()
        if p.is_file() and p not in weights and not p.name.startswith(".")
        and p.suffix not in PICKLE_SUFFIXES and p.suffix != ".safetensors"
    )
    for p in extra:  # copied into the output: a symlink must not bring in a file from elsewhere
        _confined(root, p, show_path(p))
    return Checkpoint(root, tensors, shards, config, extra_files=extra, warnings=warnings)


def assemble(weight_map: dict[str, str] | None, paths: dict[str, Path], shards: list[Path],
             headers: dict[Path, dict[str, TensorInfo]], label: Callable[[Path], str]) -> dict[str, TensorInfo]:
    """Every tensor, in (file, offset) order, checking that the index and the shard headers agree.
    paths: index file name -> shard path; label(shard) names a shard in messages."""
    tensors: dict[str, TensorInfo] = {}
    if weight_map is None:
        for s in shards:
            tensors.update(headers[s])
        if not tensors:
            raise SourceError(f"{label(shards[0])}: holds no tensors: the checkpoint is empty")
    else:
        for name, fname in weight_map.items():
            shard = paths[fname]
            info = headers[shard].get(name)
            if info is None:
                raise HeaderError(
                    f"{label(shard)}: tensor {show(name)} named by the index is missing from this shard")
            tensors[name] = info
        for s in shards:  # engines load every tensor of a listed shard: one the index omits is not droppable
            stray = sorted(n for n in headers[s] if n not in tensors or tensors[n].file != s)
            if stray:
                more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
                raise HeaderError(
                    f"{label(s)}: tensor {show(stray[0])} is in this shard but the index does not map it here{more}"
                )
    order = sorted(tensors.values(), key=lambda t: (t.file.name, t.offset))
    return {t.name: t for t in order}


def _check_name(name: str, where: str) -> None:
    """A tensor name is opaque to engines (control characters and all, which messages escape), but it
    must be a name: not empty, and valid Unicode (JSON allows an unpaired surrogate such as "\\ud800",
    which has no UTF-8 form and which the safetensors readers of the engines refuse)."""
    if not name:
        raise HeaderError(f"{where} has a tensor with an empty name ('')")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"{where}: tensor name {show(name)} is not valid Unicode (an unpaired surrogate)") from None


def _read_index(path: Path) -> dict[str, str]:
    data = _read_json(path)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise HeaderError(f"{show_path(path)}: no valid weight_map (name -> file)")
    if not wm:
        raise HeaderError(f"{show_path(path)}: weight_map is empty: the checkpoint has no tensors")
    where = f"{show_path(path)}: weight_map"  # once: DeepSeek-V3's index names 90,000 tensors
    for name, fname in wm.items():
        _check_name(name, where)
        if not fname:
            raise HeaderError(f"{show_path(path)}: weight_map gives tensor {show(name)} an empty shard file name")
    return wm


def _inside(root: Path, name: str, named_by: Path) -> Path:
    """A shard path named by the index (or found in `root`), confined to the source directory
    (symlinks included)."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
        raise HeaderError(f"{show_path(named_by)}: shard path {show(name)} leaves the source directory")
    full = root / p
    _confined(root, full, f"{show_path(named_by)}: shard {show(name)}")
    return full


def _confined(root: Path, path: Path, what: str) -> None:
    """Refuse `path`, a file directly in `root`, if it is a symlink leading out of `root`."""
    try:
        if path.is_symlink():
            target = path.resolve()
            if not _hub_blob(root, target) and root.resolve() not in target.parents:
                raise HeaderError(f"{what} is a symlink leaving the source directory")
    except (OSError, RuntimeError) as e:  # a name too long; a symlink loop (RuntimeError before 3.13)
        raise HeaderError(f"{what}: cannot resolve ({getattr(e, 'strerror', None) or e})") from None


def _hub_blob(root: Path, target: Path) -> bool:
    """Hub caches keep snapshot files as symlinks into the repo's own blobs/ folder."""
    parts = root.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        return Path(*parts[:-2], "blobs") in target.parents
    return False


def _read_json(path: Path) -> dict:
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block in open(), a device never end
            raise HeaderError(f"{show_path(path)}: not a regular file")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    # ValueError: bad UTF-8 or JSON, or an integer of over 4300 digits (which Python refuses to convert)
    except (OSError, ValueError, RecursionError) as e:
        raise HeaderError(f"{show_path(path)}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise HeaderError(f"{show_path(path)}: expected a JSON object")
    return data



def quantization_config(config: Mapping | None) -> Mapping | None:
    """config.json's quantization_config, at the top level or in text_config (Kimi-K3 ships it there)."""
    if not isinstance(config, Mapping):
        return None
    text = config.get("text_config")
    for c in (config, text if isinstance(text, Mapping) else {}):
        qc = c.get("quantization_config")
        if isinstance(qc, Mapping):
            return qc
    return None


# Dtypes and ranks that may need shardquant/encoding.py (its QUANTIZED_DTYPES, PACKED_DTYPES and 3-D expert
# tensors; tests/test_startup.py test_planning_a_bf16_source_imports_no_encoding_code checks the
# superset): a source with none of them and no quantization_config is planned as it is, without
# importing that module (start-up of `plan`).
_MAY_BE_ENCODED = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "U8", "I8")


def with_decoded(ck: Checkpoint) -> Checkpoint:
    """The checkpoint as a conversion plans it: a source stored quantized (block FP8, MXFP4: its
    config's quantization_config, or quantized dtypes in its headers) gets its logical weights, and
    fused 3-D experts their per-expert slices (shardquant/encoding.py decoded_tensors); any other
    comes back as it is. Raises SourceError where
    the encoding is inconsistent, or one that is not converted yet, naming the tensor."""
    if quantization_config(ck.config) is None and not any(
            t.dtype in _MAY_BE_ENCODED or len(t.shape) == 3 for t in ck.tensors.values()):
        return ck
    from . import encoding

    layout = encoding.recognize(ck.tensors, ck.config)
    notes: dict[str, list[int]] = {}
    tensors, stored = encoding.decoded_tensors(ck.tensors, layout, notes)
    fused = tuple(f"source stores {t} fused 3-D expert tensor{'s' * (t != 1)} ({what}): " + (
        f"planned and written as {w} per-expert weights" if w > t else
        "kept whole in high precision: this architecture's engines load its experts only as fused tensors "
        "(shardquant/encoding.py FUSED_3D split)") for what, (t, w) in notes.items())
    if list(tensors) == list(ck.tensors):
        return dataclasses.replace(ck, fused_notes=fused) if fused else ck
    return dataclasses.replace(ck, tensors=tensors, stored=stored, fused_notes=fused)
