"""One test per bad input, each through the CLI: a non-zero exit, ONE line `error: ...` naming the file
or tensor, no traceback, and no finished output (no index) left behind."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardquant import formats
from click.testing import CliRunner

from shardquant import testing
from shardquant.cli import main

INDEX = "model.safetensors.index.json"
BF16_NAN, BF16_INF, BF16_NEG_INF = 0x7FC0, 0x7F80, 0xFF80


# ---------------------------------------------------------------------------------------------
# helpers: a tiny valid checkpoint, and safetensors files crafted by hand

def tiny_model() -> testing.Model:
    return testing.llama(hidden=32, layers=2, inter=64, vocab=64, heads=2, kv_heads=1)


def make_src(root: Path, model: testing.Model | None = None, data=None, **kw) -> Path:
    """A valid tiny Llama checkpoint in several shards (q_proj of layer 0 in shard 1)."""
    return testing.write_checkpoint(root, model or tiny_model(), shard_bytes=8_000, data=data, **kw)


def read_st(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file, parsed by hand."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def st_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """8-byte little-endian header length, the header (JSON, or raw bytes as given), then the data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def shard_of(src: Path, tensor: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][tensor]


def shard_of_name(src: Path, tensor: str) -> str:
    """The shard holding `tensor`, from the headers (not the index)."""
    return next(p.name for p in sorted(src.glob("*.safetensors")) if f'"{tensor}"'.encode() in p.read_bytes()[:4096])


def rewrite_header(path: Path, edit) -> None:
    header, data = read_st(path)
    edit(header)
    path.write_bytes(st_bytes(header, data))


def edit_index(src: Path, edit) -> None:
    idx = json.loads((src / INDEX).read_text())
    edit(idx["weight_map"])
    (src / INDEX).write_text(json.dumps(idx, indent=2))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def convert_cli(src: Path | str, out: Path, *extra, fmt: str = "nvfp4"):
    return run("convert", src, "--format", fmt, "-o", out, *extra)


def assert_clean_failure(r, out: Path | None, *mentions: str) -> str:
    """Exit != 0 through sys.exit (not an escaped exception), one `error:` line naming what is wrong."""
    assert isinstance(r.exception, SystemExit), f"escaped exception {r.exception!r}: {r.output}"
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    line = lines[0]
    assert line.startswith("error: "), line
    for m in mentions:
        assert m in line, f"{m!r} not in {line!r}"
    if out is not None:
        assert not (out / INDEX).exists()
    return line


def tree_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def src(tmp_path) -> Path:
    s = make_src(tmp_path / "src")
    assert len(list(s.glob("*.safetensors"))) >= 3
    return s


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def test_the_base_checkpoint_converts(src, out):
    """The control: every test below breaks exactly one thing of this checkpoint."""
    r = convert_cli(src, out, "-q")
    assert r.exit_code == 0, r.output
    assert (out / INDEX).exists()


# ---------------------------------------------------------------------------------------------
# the safetensors container

def test_truncated_shard(src, out):
    shard = sorted(src.glob("*.safetensors"))[-1]
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-7])
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "truncated")


def test_truncated_inside_header(src, out):
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:40])
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name)


def test_absurd_header_length(src, out):
    shard = shard_of(src, Q_PROJ)
    blob = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**60) + blob[8:])
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "header length")


def test_header_not_json(src, out):
    shard = shard_of(src, Q_PROJ)
    _, data = read_st(shard)
    shard.write_bytes(st_bytes(b'{"a": {"dtype": "BF16", nope', data))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "JSON")


def test_header_not_utf8(src, out):
    shard = shard_of(src, Q_PROJ)
    _, data = read_st(shard)
    shard.write_bytes(st_bytes(b'{"\xff\xfe": 1}', data))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name)


def test_header_json_not_an_object(src, out):
    shard = shard_of(src, Q_PROJ)
    _, data = read_st(shard)
    shard.write_bytes(st_bytes(b"[1, 2, 3]", data))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "not a JSON object")


def test_bad_dtype_string(src, out):
    shard = shard_of(src, Q_PROJ)
    rewrite_header(shard, lambda h: h[Q_PROJ].update(dtype="BF17"))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, Q_PROJ, "BF17")


def test_shape_offset_mismatch(src, out):
    shard = shard_of(src, Q_PROJ)
    rewrite_header(shard, lambda h: h[Q_PROJ].update(shape=[h[Q_PROJ]["shape"][0] + 1, h[Q_PROJ]["shape"][1]]))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, Q_PROJ)


def test_overlapping_tensors(src, out):
    shard = shard_of(src, Q_PROJ)

    def overlap(h: dict) -> None:
        a, b = [k for k in h if k != "__metadata__"][:2]
        n = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][0] + 2  # inside a, same length as before
        h[b]["data_offsets"] = [start, start + n]

    rewrite_header(shard, overlap)
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "overlap")


@pytest.mark.parametrize("meta", [{"format": 1}, ["x"]])
def test_bad_metadata(src, out, meta):
    shard = shard_of(src, Q_PROJ)
    rewrite_header(shard, lambda h: h.update(__metadata__=meta))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "__metadata__")


# ---------------------------------------------------------------------------------------------
# the index

def test_index_names_missing_shard(src, out):
    edit_index(src, lambda wm: wm.update({Q_PROJ: "model-00009-of-00009.safetensors"}))
    assert_clean_failure(convert_cli(src, out, "-q"), out, INDEX, "model-00009-of-00009.safetensors")


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_path_outside_source(src, out, tmp_path, where):
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(shard_of(src, Q_PROJ).read_bytes())  # a real shard: refused for where it is
    name = "../x.safetensors" if where == "parent" else str(outside)
    edit_index(src, lambda wm: wm.update({Q_PROJ: name}))
    line = assert_clean_failure(convert_cli(src, out, "-q"), out, INDEX, name)
    assert "leaves the source directory" in line


def test_symlinked_shard_outside_source(src, out, tmp_path):
    shard = shard_of(src, Q_PROJ)
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shard.rename(outside)
    shard.symlink_to(outside)
    line = assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name)
    assert "symlink" in line


def test_symlinked_single_file_outside_source(tmp_path, out):
    src = testing.write_checkpoint(tmp_path / "src", tiny_model(), single_file=True)
    outside = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(outside)
    (src / "model.safetensors").symlink_to(outside)
    line = assert_clean_failure(convert_cli(src, out, "-q"), out, "model.safetensors")
    assert "symlink" in line


def test_symlink_inside_source_is_fine(src, out):
    shard = shard_of(src, Q_PROJ)
    (src / "blobs").mkdir()
    shard.rename(src / "blobs" / shard.name)
    shard.symlink_to(Path("blobs", shard.name))
    r = convert_cli(src, out, "-q")
    assert r.exit_code == 0, r.output


def test_hub_snapshot_symlinks_into_blobs_are_fine(tmp_path, out):
    """A hub cache snapshot, given as a local directory: its files are symlinks into ../../blobs."""
    staging = testing.write_checkpoint(tmp_path / "staging", tiny_model(), single_file=True)
    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in staging.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(repo / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    r = convert_cli(snap, out, "-q")
    assert r.exit_code == 0, r.output
    assert (out / INDEX).exists()


def test_index_tensor_missing_from_shard(src, out):
    shard = shard_of(src, Q_PROJ)
    edit_index(src, lambda wm: wm.update({"model.layers.0.self_attn.extra.weight": shard.name}))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard.name, "model.layers.0.self_attn.extra.weight")


def test_shard_tensor_missing_from_index(src, out):
    """Engines load every tensor of a listed shard; silently dropping one the index omits would
    change the model."""
    gate = "model.layers.0.mlp.gate_proj.weight"
    edit_index(src, lambda wm: wm.pop(gate))
    assert_clean_failure(convert_cli(src, out, "-q"), out, shard_of_name(src, gate), repr(gate))


def test_index_without_weight_map(src, out):
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": ["not", "a", "map"]}))
    assert_clean_failure(convert_cli(src, out, "-q"), out, INDEX)


# ---------------------------------------------------------------------------------------------
# the weights

def _poison(target: str, bits: int):
    def data(spec, rng):
        raw = testing.random_data(spec, rng)
        if spec[0] == target:
            raw.reshape(-1)[raw.size // 2 + 3] = bits
        return raw
    return data


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("bits", [BF16_NAN, BF16_INF, BF16_NEG_INF], ids=["nan", "inf", "-inf"])
def test_nan_inf_in_quantized_weight(tmp_path, out, bits, fmt):
    target = "model.layers.1.mlp.down_proj.weight"  # late in the checkpoint: shards are already written
    model = testing.TILED["llama"]() if formats.declared(fmt).block else None  # whole 128x128 tiles
    src = make_src(tmp_path / "src", model, data=_poison(target, bits))
    line = assert_clean_failure(convert_cli(src, out, "-q", fmt=fmt), out, target)
    assert "NaN or Inf" in line


def test_nan_in_f32_weight(tmp_path, out):
    model = tiny_model()
    model.specs = [(n, "F32", s) for n, _, s in model.specs]
    target = Q_PROJ

    def data(spec, rng):
        raw = testing.random_data(spec, rng)
        if spec[0] == target:
            raw[1, 17] = np.nan
        return raw

    src = make_src(tmp_path / "src", model, data=data)
    assert_clean_failure(convert_cli(src, out, "-q"), out, target, "NaN or Inf")


def test_nan_in_kept_tensor_is_copied(tmp_path, out):
    """Kept tensors are copied as they are: NaN in a norm is not ours to judge."""
    src = make_src(tmp_path / "src", data=_poison("model.layers.0.input_layernorm.weight", BF16_NAN))
    r = convert_cli(src, out, "-q")
    assert r.exit_code == 0, r.output


def test_unsupported_dtype_for_quantized_tensor(tmp_path, out):
    model = tiny_model()
    model.specs = [(n, "I32" if n == Q_PROJ else d, s) for n, d, s in model.specs]

    def data(spec, rng):
        if spec[1] == "I32":
            return np.arange(np.prod(spec[2]), dtype=np.int32).reshape(spec[2])
        return testing.random_data(spec, rng)

    src = make_src(tmp_path / "src", model, data=data)
    assert_clean_failure(convert_cli(src, out, "-q"), out, Q_PROJ, "I32")


# ---------------------------------------------------------------------------------------------
# the source and output directories

def test_bin_only_source(tmp_path, out):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = assert_clean_failure(convert_cli(src, out, "-q"), out, str(src))
    assert "unpickl" in line


def test_empty_source_dir(tmp_path, out):
    src = tmp_path / "src"
    src.mkdir()
    assert_clean_failure(convert_cli(src, out, "-q"), out, str(src), "no safetensors")


def test_non_empty_output_without_force_then_with_force(src, out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_clean_failure(convert_cli(src, out, "-q"), out, str(out), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    r = convert_cli(src, out, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert (out / INDEX).exists() and (out / "notes.txt").read_text() == "mine"
    first = json.loads((out / INDEX).read_text())["weight_map"]
    assert len(set(first.values())) == 1

    # again, into smaller shards: shards of the earlier run are gone, user files stay
    r = convert_cli(src, out, "-q", "--force", "--max-shard-size", "4KB")
    assert r.exit_code == 0, r.output
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    assert len(set(wm.values())) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(wm.values()))
    assert (out / "notes.txt").read_text() == "mine"


def test_output_is_a_file(src, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_clean_failure(convert_cli(src, f, "-q"), None, str(f), "not a directory")
    assert f.read_text() == "x"


def test_output_parent_is_a_file(src, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_clean_failure(convert_cli(src, f / "sub", "-q"), None, str(f / "sub"), "cannot create")
    assert f.read_text() == "x"


def test_output_is_source(src):
    before = tree_digest(src)
    assert_clean_failure(convert_cli(src, src, "-q", "--force"), None, str(src), "source")
    assert tree_digest(src) == before


def test_already_quantized_source(src, out):
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    line = assert_clean_failure(convert_cli(src, out, "-q"), out, "config.json", "already quantized")
    assert "'fp8'" in line


def test_nonexistent_source_path(tmp_path, out):
    missing = tmp_path / "no" / "such" / "model"
    assert_clean_failure(convert_cli(missing, out, "-q"), out, str(missing), "no such directory")


@pytest.mark.parametrize("name", ["models/a..b", "models/my-model-", "models/-x"])
def test_missing_relative_path_that_is_no_valid_repo_id(tmp_path, out, monkeypatch, name):
    """'x/y' that is no directory is tried as a hub repo id; one huggingface_hub refuses (a ValueError)
    must still be one clean line. Offline, in case validation ever let it through."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    line = assert_clean_failure(convert_cli(name, out, "-q"), out, name)
    assert "repo id" in line


def test_hub_download_error_is_one_line(tmp_path, out, monkeypatch):
    import huggingface_hub

    def fail(*_a, **_k):
        raise OSError("500 Server Error: Internal Server Error for url: https://huggingface.co/x\n\n"
                      "Request ID: Root=1-abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "resolve_revision", fail)  # the first hub call (shardquant/hub.py)
    monkeypatch.chdir(tmp_path)
    line = assert_clean_failure(convert_cli("org/name", out, "-q"), out, "org/name", "500 Server Error")
    assert "Request ID" not in line


def test_source_is_a_file(src, out):
    f = shard_of(src, Q_PROJ)
    assert_clean_failure(convert_cli(f, out, "-q"), out, str(f), "not a directory")


@pytest.mark.parametrize("name, text", [
    ("rules.toml", "[[rule]\npattern = 'x'"),
    ("rules.json", "{\"rules\": [{\"pattern\": \"(unclosed\", \"action\": \"keep\"}]}"),
    ("rules.json", "{\"rules\": [{\"pattern\": \".*q_proj.weight\", \"action\": \"squash\"}]}"),
    ("rules.toml", "[[rule]]\npattern = '.*'\naction = 'quantize'\nkey = '{nope}'\n"),
    ("rules.toml", "[[rule]]\naction = 'keep'\n"),
    ("rules.toml", None),  # no such file
])
def test_bad_rules_file(src, out, tmp_path, name, text):
    rules = tmp_path / name
    if text is not None:
        rules.write_text(text)
    assert_clean_failure(convert_cli(src, out, "-q", "--rules", rules), out, str(rules))


def test_inspect_without_manifest_or_checkpoint(tmp_path):
    """A directory with neither a manifest nor safetensors (a source checkpoint is shown as one: its
    stored encodings, tests/test_quantized_sources.py)."""
    (tmp_path / "config.json").write_text("{}")
    assert_clean_failure(run("inspect", tmp_path), None, "scale_manifest.json", "no safetensors checkpoint")


def test_real_process_prints_no_traceback(src, out):
    """The same through a real process: stderr is one line, nothing on stdout."""
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "shardquant.cli", "convert", str(src), "--format", "fp8",
                        "-o", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and shard.name in lines[0], p.stderr
    assert not (out / INDEX).exists()
