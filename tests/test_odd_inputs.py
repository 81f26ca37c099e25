"""Odd inputs get a decision, never a silent result: each case below is either a clean error (one
line `error: ...` naming the file or tensor, exit 1, no traceback) or a one-line warning saying what
the output will lack, printed once, with the conversion going through. Every name a message shows
is escaped: one printable line, whatever the checkpoint's names hold."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardquant import testing
from shardquant.cli import main

INDEX = "model.safetensors.index.json"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------------------------------------
# helpers (the pattern of tests/test_bad_input.py)

def tiny_model() -> testing.Model:
    return testing.llama(hidden=32, layers=2, inter=64, vocab=64, heads=2, kv_heads=1)


def make_src(root: Path, model: testing.Model | None = None, **kw) -> Path:
    """A valid tiny Llama checkpoint in several shards (or one file: single_file=True)."""
    return testing.write_checkpoint(root, model or tiny_model(), shard_bytes=8_000, **kw)


def with_spec(model: testing.Model, name: str, shape: tuple[int, ...], dtype: str = "BF16") -> testing.Model:
    """`model` with one more tensor, placed right after layer 0's q_proj (in the first shard)."""
    i = [n for n, _, _ in model.specs].index(Q_PROJ) + 1
    return testing.Model(model.specs[:i] + [(name, dtype, shape)] + model.specs[i:], model.config)


def reshaped(model: testing.Model, name: str, shape: tuple[int, ...]) -> testing.Model:
    return testing.Model([(n, d, shape if n == name else s) for n, d, s in model.specs], model.config)


def read_st(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def st_bytes(header: dict, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def rename_in_header(path: Path, old: str, new: str) -> None:
    header, data = read_st(path)
    header[new] = header.pop(old)
    path.write_bytes(st_bytes(header, data))


def weight_map(src: Path) -> dict[str, str]:
    return json.loads((src / INDEX).read_text())["weight_map"]


def edit_index(src: Path, edit) -> None:
    idx = json.loads((src / INDEX).read_text())
    edit(idx["weight_map"])
    (src / INDEX).write_text(json.dumps(idx, indent=2))


def rename_tensor(src: Path, old: str, new: str) -> None:
    """Rename a tensor in its shard and in the index."""
    rename_in_header(src / weight_map(src)[old], old, new)
    edit_index(src, lambda wm: wm.update({new: wm.pop(old)}))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def convert(src: Path, out: Path, *extra):
    return run("convert", src, "--format", "nvfp4", "-o", out, "--device", "cpu", *extra)


def lines(output: str) -> list[str]:
    """Output lines; a progress bar line (redrawn after '\\r') counts as its last drawing."""
    out = []
    for line in output.split("\n"):
        if line.startswith("\r"):
            line = line.rsplit("\r", 1)[-1]
        if line:
            out.append(line)
    return out


def assert_printable(r) -> list[str]:
    """Every line of the output is one printable line: no raw control, bidi or separator characters."""
    ls = lines(r.output)
    for line in ls:
        assert line.isprintable(), f"unprintable characters in {line!r}"
    return ls


def assert_error(r, out: Path | None, *mentions: str) -> str:
    """Exit 1 through sys.exit, exactly one line `error: ...` naming what is wrong, no finished output."""
    assert isinstance(r.exception, SystemExit), f"escaped exception {r.exception!r}: {r.output}"
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    ls = assert_printable(r)
    assert len(ls) == 1 and ls[0].startswith("error: "), r.output
    for m in mentions:
        assert m in ls[0], f"{m!r} not in {ls[0]!r}"
    if out is not None:
        assert not (out / INDEX).exists()
    return ls[0]


def assert_warned(r, out: Path, *mentions: str) -> str:
    """A finished conversion that printed exactly one warning line holding all of `mentions`."""
    assert r.exit_code == 0, r.output
    assert r.exception is None, repr(r.exception)
    ls = assert_printable(r)
    assert not [x for x in ls if x.startswith("error")], r.output
    hits = [x for x in ls if x.startswith("warning: ") and all(m in x for m in mentions)]
    assert len(hits) == 1, r.output
    assert (out / INDEX).exists()
    return hits[0]


@pytest.fixture
def src(tmp_path) -> Path:
    s = make_src(tmp_path / "src")
    assert len(list(s.glob("*.safetensors"))) >= 3
    return s


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def test_the_base_checkpoint_converts_without_warnings(src, out):
    """The control: every test below changes one thing of this checkpoint."""
    r = convert(src, out)
    assert r.exit_code == 0, r.output
    assert not [x for x in lines(r.output) if x.startswith("warning")], r.output
    assert (out / INDEX).exists() and (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------
# 1. an empty checkpoint

def test_index_with_empty_weight_map(src, out):
    (src / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {}}))
    assert_error(convert(src, out, "-q"), out, str(src / INDEX), "weight_map is empty")


@pytest.mark.parametrize("name", ["model.safetensors", "weights.safetensors"])
@pytest.mark.parametrize("header", [{}, {"__metadata__": {"format": "pt"}}], ids=["bare", "metadata"])
def test_safetensors_file_without_tensors(tmp_path, out, name, header):
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(st_bytes(header, b""))
    (src / "config.json").write_text(json.dumps(tiny_model().config))
    assert_error(convert(src, out, "-q"), out, str(src / name), "no tensors")


# ---------------------------------------------------------------------------------------------
# 2. an empty tensor name

def test_empty_tensor_name_in_index(src, out):
    rename_tensor(src, "model.norm.weight", "")
    line = assert_error(convert(src, out, "-q"), out, str(src / INDEX), "empty name")
    assert "model.norm.weight" not in line


@pytest.mark.parametrize("single_file", [True, False], ids=["single-file", "sharded"])
def test_empty_tensor_name_in_shard_header(tmp_path, out, single_file):
    """In a header only (the index, if any, does not name it): the error names the shard."""
    src = make_src(tmp_path / "src", single_file=single_file)
    shard = src / "model.safetensors" if single_file else src / weight_map(src)["model.norm.weight"]
    rename_in_header(shard, "model.norm.weight", "")
    assert_error(convert(src, out, "-q"), out, str(shard), "empty name")


# ---------------------------------------------------------------------------------------------
# 3. names with control or other unprintable characters: allowed (a name is opaque to engines),
#    always escaped in messages

ODD = [("\n", "\\n"), ("\x1b[31m", "\\x1b[31m"), ("\u202e", "\\u202e"), ("\u2028", "\\u2028"), ("\x00", "\\x00")]
ODD_IDS = ["newline", "ansi", "bidi", "line-separator", "nul"]


def odd_name(bad: str) -> str:
    return f"model.layers.0.mlp.x{bad}y.weight"


@pytest.mark.parametrize("bad, escaped", ODD, ids=ODD_IDS)
def test_odd_name_warnings_escaped_and_name_kept_as_is(tmp_path, out, bad, escaped):
    """--include makes the odd tensor a quantizer of its own; its input dim (40) does not divide into
    16-element blocks, so it is kept, with warnings naming the quantizer key and the tensor."""
    name = odd_name(bad)
    src = make_src(tmp_path / "src", with_spec(tiny_model(), name, (32, 40)))
    r = convert(src, out, "--include", r"(?s).*\.x.*y")
    line = assert_warned(r, out, "kept in high precision as a whole", "input dim 40")
    assert line.count(escaped) == 2, line  # the quantizer key and the tensor name
    # the member is not warned about again (warnings are grouped by quantizer: shardquant/cli.py _warn)
    assert "fused set not quantizable" not in r.output
    assert weight_map(out)[name].startswith("model-")  # copied under its exact name


@pytest.mark.parametrize("bad, escaped", ODD, ids=ODD_IDS)
def test_odd_name_in_source_error_escaped(tmp_path, out, bad, escaped):
    """A tensor in a shard that the index does not map: the error names it, escaped."""
    name = odd_name(bad)
    src = make_src(tmp_path / "src", with_spec(tiny_model(), name, (32, 32)))
    shard = weight_map(src)[name]
    edit_index(src, lambda wm: wm.pop(name))
    line = assert_error(convert(src, out, "-q"), out, shard, escaped, "the index does not map it")
    assert "model.layers.0.mlp.x" in line


@pytest.mark.parametrize("bad, escaped", ODD, ids=ODD_IDS)
def test_odd_name_in_plan_error_escaped(tmp_path, out, bad, escaped):
    """--strict refuses the unclaimed odd tensor, naming it, escaped."""
    src = make_src(tmp_path / "src", with_spec(tiny_model(), odd_name(bad), (32, 32)))
    assert_error(convert(src, out, "-q", "--strict"), out, "--strict", "model.layers.0.mlp.x" + escaped + "y")


@pytest.mark.parametrize("bad, escaped", [o for o in ODD if o[0] != "\n"], ids=ODD_IDS[1:])
def test_odd_quantizer_key_in_rule_error_escaped(src, out, bad, escaped):
    """q_proj moved to another layer prefix: its q/k/v quantizer, keyed on the odd prefix, lacks k and
    v. (A '\\n' never gets this far: '.' in the rules does not cross a line break, so such a name is
    unclaimed, as test_odd_name_warnings_escaped_and_name_kept_as_is shows.)"""
    rename_tensor(src, Q_PROJ, Q_PROJ.replace("layers.0.", f"layers.0{bad}."))
    assert_error(convert(src, out, "-q"), out, f"model.layers.0{escaped}.self_attn.qkv_proj", "missing k_proj, v_proj")


@pytest.mark.parametrize("bad, escaped", ODD[:2], ids=ODD_IDS[:2])
def test_odd_shard_file_name_escaped(src, out, bad, escaped):
    """A shard whose file name holds control characters is allowed; an error about it shows the name
    escaped (here: the shard is truncated)."""
    old = weight_map(src)[Q_PROJ]
    new = f"model{bad}-1.safetensors"
    (src / old).rename(src / new)
    edit_index(src, lambda wm: wm.update({k: new for k, v in wm.items() if v == old}))
    (src / new).write_bytes((src / new).read_bytes()[:-5])
    assert_error(convert(src, out, "-q"), out, f"model{escaped}-1.safetensors", "truncated")


def test_unpaired_surrogate_in_name_is_an_error(src, out):
    """JSON can spell a name with no UTF-8 form ("\\ud800"); safetensors readers refuse such a header."""
    rename_tensor(src, "model.norm.weight", "model.norm\ud800.weight")
    assert_error(convert(src, out, "-q"), out, str(src / INDEX), "model.norm\\ud800.weight", "not valid Unicode")


def test_long_odd_name_is_bounded(src, out):
    """A 2-D weight no rule claims, under a 100 kB name: its warning, and its --strict error, show a
    bounded, escaped excerpt of the name."""
    name = "model.layers.0.mlp.\x1b" * 5000 + "tail.weight"
    rename_tensor(src, "lm_head.weight", name)
    line = assert_error(convert(src, out, "-q", "--strict"), out, "--strict", "model.layers.0.mlp.\\x1b")
    assert len(line) < 1000 and "tail.weight" in line
    line = assert_warned(convert(src, out), out, "no rule claims this 2-D weight")
    assert len(line) < 1000 and "model.layers.0.mlp.\\x1b" in line and "tail.weight" in line
    assert name in weight_map(out)


# ---------------------------------------------------------------------------------------------
# 4. no config.json: a warning, and an output without one

def test_missing_config_json(src, out):
    (src / "config.json").unlink()
    r = convert(src, out)
    assert_warned(r, out, str(src), "no config.json", "the output will have none")
    assert not (out / "config.json").exists()
    assert (out / "hf_quant_config.json").exists()


# ---------------------------------------------------------------------------------------------
# 5. a .safetensors file the index does not name

@pytest.mark.parametrize("names", [["consolidated.safetensors"], ["consolidated.safetensors", "b\x1bad.safetensors"]],
                         ids=["one", "two"])
def test_unindexed_safetensors_file_beside_the_shards(src, out, names):
    for n in names:
        shutil.copy(src / weight_map(src)[Q_PROJ], src / n)
    r = convert(src, out)
    line = assert_warned(r, out, INDEX, "'consolidated.safetensors'", "not converted and not copied")
    if len(names) == 2:
        assert "'b\\x1bad.safetensors'" in line
    assert not [n for n in names if (out / n).exists()]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(weight_map(out).values()))


def test_other_safetensors_file_beside_a_single_file_checkpoint(tmp_path, out):
    src = make_src(tmp_path / "src", single_file=True)
    shutil.copy(src / "model.safetensors", src / "consolidated.safetensors")
    r = convert(src, out)
    assert_warned(r, out, "only model.safetensors is read", "'consolidated.safetensors'", "not converted")
    assert not (out / "consolidated.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# 6. nothing to quantize

def test_everything_excluded(src, out):
    n = len(tiny_model().specs)
    line = assert_error(convert(src, out, "-q", "--exclude", ".*"), out, "nothing would be quantized",
                        f"all {n} tensors are kept", "--include", "--rules")
    assert f"--exclude .*: {n}" in line


def test_checkpoint_of_only_norms_and_embeddings(tmp_path, out):
    m = tiny_model()
    m = testing.Model([s for s in m.specs if "layernorm" in s[0] or s[0] in
                       ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")], m.config)
    src = make_src(tmp_path / "src", m)
    assert_error(convert(src, out, "-q"), out, "nothing would be quantized", f"all {len(m.specs)} tensors",
                 "norm: 5", "embedding: 1", "output head: 1", "--include")


def test_no_fused_set_divides_into_blocks(tmp_path, out):
    """Every input dim is 40: every set is kept, so nothing would be quantized (an error, not a copy
    that claims to be NVFP4)."""
    src = make_src(tmp_path / "src", testing.llama(hidden=40, layers=1, inter=40, vocab=64, heads=2, kv_heads=1))
    assert_error(convert(src, out, "-q"), out, "nothing would be quantized", "not a multiple of 16")


# ---------------------------------------------------------------------------------------------
# 7. a shard that is a directory, one shard spelled two ways, a zero-size weight

def test_index_names_a_directory(src, out):
    shard = src / weight_map(src)[Q_PROJ]
    shard.unlink()
    shard.mkdir()
    assert_error(convert(src, out, "-q"), out, str(src / INDEX), f"'{shard.name}'", "is a directory")


def test_one_shard_spelled_two_ways(tmp_path, src, out):
    """'./model-1.safetensors' and 'model-1.safetensors' are one file: converted once, no warning, the
    same shards as from the plain index."""
    ref = tmp_path / "ref"
    assert convert(src, ref, "-q").exit_code == 0
    shard = weight_map(src)[Q_PROJ]
    edit_index(src, lambda wm: wm.update({Q_PROJ: "./" + shard}))
    r = convert(src, out)
    assert r.exit_code == 0, r.output
    assert not [x for x in assert_printable(r) if x.startswith("warning")], r.output
    assert weight_map(out) == weight_map(ref)
    for f in sorted(set(weight_map(ref).values())):
        assert (out / f).read_bytes() == (ref / f).read_bytes()


@pytest.mark.parametrize("shape", [(0, 32), (32, 0)], ids=["no-rows", "no-columns"])
def test_zero_size_quantized_weight(tmp_path, out, shape):
    src = make_src(tmp_path / "src", reshaped(tiny_model(), Q_PROJ, shape))
    assert_error(convert(src, out, "-q"), out, repr(Q_PROJ), f"shape {list(shape)}", "no elements", "--exclude")

    r = convert(src, out, "--exclude", r".*q_proj\.weight")  # the way out the error names: kept as it is
    assert_warned(r, out, "kept in high precision as a whole", "model.layers.0.self_attn.qkv_proj")
    assert weight_map(out)[Q_PROJ].startswith("model-")
