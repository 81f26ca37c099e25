"""`verify` never crashes: a seeded sample of tools/fuzz_verify.py's random corruptions, and
hand-written malformed outputs (wrong JSON types, huge numbers, deep nesting, absurd scales, bad
shapes, truncated shards, symlinks and directories), each reported as a violation of a named rule,
the CLI answering with its report and exit status 1, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shardquant.cli import main
from shardquant.errors import ShardquantError
from shardquant.report import Stat
from shardquant.verify import verify

ROOT = Path(__file__).parents[1]
TOOL = ROOT / "tools" / "fuzz_verify.py"
INDEX = "model.safetensors.index.json"
MANIFEST = "scale_manifest.json"
O_PROJ = "model.layers.0.self_attn.o_proj"


def _tool():
    """tools/fuzz_verify.py, loaded from its path (tools/ is not a package)."""
    name = "fuzz_verify"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOL)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


fz = _tool()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source, {base: directory}): the fuzzer's bases, built once."""
    return fz.build_bases(tmp_path_factory.mktemp("bases"))


# ---------------------------------------------------------------------------------------------
# the seeded sample

def test_fuzz_sample_has_no_crash_and_misses_nothing(built, tmp_path):
    s = fz.fuzz(150, 20250101, tmp_path, built=built)
    assert s.crashes == [], s.render()
    assert s.missed == [], s.render()  # every change beyond the manifest failed a hashed verify
    assert s.iterations == 150 and s.checks >= 150
    # the sample is not vacuous: most kinds of mutation ran, and most copies failed verify
    assert len(s.mutations) >= 11, s.mutations
    assert s.outcomes["violations"] > 100, s.outcomes
    assert {"file-integrity", "manifest", "index", "config", "global-scale"} <= set(s.rules), s.rules


def test_fuzzer_counts_a_crash(built, tmp_path, monkeypatch):
    """A verify that raises anything but a ShardquantError is counted as a crash, with its place."""
    def boom(*_a, **_k):
        raise KeyError("x")

    monkeypatch.setattr(fz, "verify", boom)
    s = fz.fuzz(3, 0, tmp_path, built=built)
    assert len(s.crashes) >= 3 and s.crashes[0].error == "KeyError: 'x'"
    assert "CRASHES" in s.render()


def test_fuzzer_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(TOOL), "--iterations", "4", "--seed", "3"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 iterations" in r.stdout and "crashes: none" in r.stdout


# ---------------------------------------------------------------------------------------------
# hand-written malformed outputs: each names its rule

def edit(name: str, fn):
    """A mutation editing one JSON file of the output (tools/fuzz_verify.py's writer: RawJSON values
    are written as they are)."""
    def mutate(d: Path) -> None:
        p = d / name
        obj = json.loads(p.read_text())
        fn(obj)
        p.write_text(fz.dumps(obj))

    return mutate


def raw(name: str, data: bytes):
    def mutate(d: Path) -> None:
        (d / name).write_bytes(data)

    return mutate


def header(fn):
    """Edit the header of the shard holding o_proj's tensors (data kept, length prefix updated)."""
    def mutate(d: Path) -> None:
        wm = json.loads((d / INDEX).read_text())["weight_map"]
        p = d / wm[f"{O_PROJ}.weight_scale"]
        hdr, data = fz.read_shard(p)
        fn(hdr)
        fz.write_shard(p, hdr, data)

    return mutate


def scale_value(role: str, value: float):
    """Overwrite o_proj's F32 `role` tensor (every element) with `value`."""
    def mutate(d: Path) -> None:
        wm = json.loads((d / INDEX).read_text())["weight_map"]
        p = d / wm[f"{O_PROJ}.{role}"]
        hdr, _ = fz.read_shard(p)
        e = hdr[f"{O_PROJ}.{role}"]
        assert e["dtype"] == "F32"
        a, b = (8 + fz.header_len(p) + o for o in e["data_offsets"])
        data = bytearray(p.read_bytes())
        data[a:b] = np.full((b - a) // 4, value, "<f4").tobytes()
        p.write_bytes(bytes(data))

    return mutate


def negative_block_scales(d: Path) -> None:
    wm = json.loads((d / INDEX).read_text())["weight_map"]
    p = d / wm[f"{O_PROJ}.weight_scale"]
    hdr, _ = fz.read_shard(p)
    a = 8 + fz.header_len(p) + hdr[f"{O_PROJ}.weight_scale"]["data_offsets"][0]
    data = bytearray(p.read_bytes())
    data[a] |= 0x80
    data[a + 5] |= 0x80
    p.write_bytes(bytes(data))


def _first(d: dict) -> dict:
    return next(iter(d.values()))


def truncate_shard(d: Path) -> None:
    p = sorted(d.glob("*.safetensors"))[1]
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 3)


def shard_to_dir(d: Path) -> None:
    p = sorted(d.glob("*.safetensors"))[1]
    p.unlink()
    p.mkdir()


def config_to_dir(d: Path) -> None:
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def symlink_hf(d: Path) -> None:
    p = d / "hf_quant_config.json"
    shutil.move(p, d.parent / "hf-elsewhere.json")
    p.symlink_to(d.parent / "hf-elsewhere.json")


def tensor_name_surrogate(hdr: dict) -> None:
    hdr["\ud800" + O_PROJ + ".weight_scale"] = hdr.pop(f"{O_PROJ}.weight_scale")


def _shard(ix: dict, name: str) -> None:
    ix["weight_map"][f"{O_PROJ}.weight"] = name


def _scale_shape(shape: list) -> Callable[[dict], None]:
    def fn(hdr: dict) -> None:
        hdr[f"{O_PROJ}.weight_scale"]["shape"] = shape

    return fn


MO, CT, CT8 = "nvfp4-modelopt", "nvfp4-compressed-tensors", "fp8-compressed-tensors"
MO8 = CT8  # FP8 is served in the compressed-tensors flavor only (formats/fp8.py)
QC = "quantization_config"

# id: (base, mutation, rule that must appear, seal the manifest afterwards)
CASES = {
    # config.json / hf_quant_config.json: wrong types anywhere
    "quantization_config []": (MO, edit("config.json", lambda c: c.update({QC: []})), "config", True),
    "quantization_config str, CT": (CT, edit("config.json", lambda c: c.update({QC: "x"})), "config", True),
    "exclude_modules 5": (MO, edit("hf_quant_config.json", lambda h: h["quantization"].update(exclude_modules=5)),
                          "config", True),
    "exclude_modules null": (MO, edit("hf_quant_config.json", lambda h: h["quantization"].update(exclude_modules=None)),
                             "config", True),
    "quantization []": (MO, edit("hf_quant_config.json", lambda h: h.update(quantization=[])), "config", True),
    "ignore {a: 1}": (MO, edit("config.json", lambda c: c[QC].update(ignore={"a": 1})), "config", True),
    "ignore {a: 1}, CT": (CT, edit("config.json", lambda c: c[QC].update(ignore={"a": 1})), "config", True),
    "ignore invalid regex": (CT, edit("config.json", lambda c: c[QC].update(ignore=["re:(", "re:a{9999999999999999999}"])),
                             "config", True),
    "config_groups 'x'": (CT, edit("config.json", lambda c: c[QC].update(config_groups="x")), "config", True),
    "config_groups of lists": (CT8, edit("config.json", lambda c: c[QC].update(config_groups={"g": [1]})), "config",
                               True),
    "format a list": (CT, edit("config.json", lambda c: c[QC].update(format=["nvfp4-pack-quantized"])), "config", True),
    "group format a dict": (CT, edit("config.json", lambda c: _first(c[QC]["config_groups"]).update(format={"a": 1})),
                            "config", True),
    "quant_method a list": (MO, edit("config.json", lambda c: c[QC].update(quant_method=["modelopt"])), "config", True),
    "quant_method a list, CT": (CT, edit("config.json", lambda c: c[QC].update(quant_method=["x"])), "config", True),
    "quant_algo a dict": (MO, edit("hf_quant_config.json", lambda h: h["quantization"].update(quant_algo={"a": 1})),
                          "config", True),
    "quantization_status a dict": (CT, edit("config.json", lambda c: c[QC].update(quantization_status={})), "config",
                                   True),
    "config non-UTF-8": (MO, raw("config.json", b'{"a": "\xff\xfe"}'), "config", True),
    "config nested 10000 deep": (MO, raw("config.json", b"[" * 10000 + b"]" * 10000), "config", True),
    "config 5000-digit integer": (MO, raw("config.json", b'{"vocab_size": ' + b"9" * 5000 + b"}"), "config", True),
    "config a directory": (MO, config_to_dir, "config", False),
    # the index
    "weight_map values ints": (MO, edit(INDEX, lambda ix: ix.update(weight_map={k: 1 for k in ix["weight_map"]})),
                               "index", True),
    "weight_map a list": (CT, edit(INDEX, lambda ix: ix.update(weight_map=[])), "index", True),
    "total_size a string": (MO8, edit(INDEX, lambda ix: ix["metadata"].update(total_size="1")), "index", True),
    "total_size true": (MO8, edit(INDEX, lambda ix: ix["metadata"].update(total_size=True)), "index", True),
    "total_size 4000 digits": (MO8, edit(INDEX, lambda ix: ix["metadata"].update(total_size=fz.RawJSON("9" * 4000))),
                               "index", True),
    "shard ../x": (MO, edit(INDEX, lambda ix: _shard(ix, "../x.safetensors")), "index", True),
    "shard NUL": (MO, edit(INDEX, lambda ix: _shard(ix, "a\x00b")), "index", True),
    "shard unpaired surrogate": (MO, edit(INDEX, lambda ix: _shard(ix, "\ud800.safetensors")), "index", True),
    "shard is config.json": (MO, edit(INDEX, lambda ix: _shard(ix, "config.json")), "index", True),
    "shard a directory": (CT, shard_to_dir, "index", False),
    "shard truncated": (MO8, truncate_shard, "index", False),
    # the manifest (schema-validated before use)
    "quantizers a list": (MO, edit(MANIFEST, lambda m: m.update(quantizers=list(m["quantizers"].values()))),
                          "manifest", False),
    "amax a string": (MO, edit(MANIFEST, lambda m: _first(m["quantizers"]).update(amax="0.5")), "manifest", False),
    "members non-strings": (MO, edit(MANIFEST, lambda m: _first(m["quantizers"]).update(members=[1, None])),
                            "manifest", False),
    "amax 4000 digits": (MO, edit(MANIFEST, lambda m: _first(m["quantizers"]).update(amax=fz.RawJSON("9" * 4000))),
                         "manifest", False),
    "global_scale 1e400": (CT, edit(MANIFEST, lambda m: m["quantizers"][O_PROJ].update(global_scale=fz.RawJSON("1e400"))),
                           "manifest", False),
    "global_scale NaN": (MO8, edit(MANIFEST, lambda m: _first(m["quantizers"]).update(global_scale=math.nan)),
                         "manifest", False),
    "files a list": (MO, edit(MANIFEST, lambda m: m.update(files=[])), "manifest", False),
    "manifest nested 10000 deep": (MO, raw(MANIFEST, b"[" * 10000 + b"]" * 10000), "manifest", False),
    "manifest nested 50 deep": (MO, edit(MANIFEST, lambda m: m.update(x=fz.RawJSON("[" * 50 + "]" * 50))),
                                "manifest", False),
    "manifest non-UTF-8": (MO, raw(MANIFEST, b"\xff{}"), "manifest", False),
    # absurd scales in the tensors
    **{f"weight_scale_2 {v!r}": (MO, scale_value("weight_scale_2", v), "global-scale", True)
       for v in (math.nan, math.inf, 0.0, -1.0, 1e38, 1e-40)},
    **{f"weight_global_scale {v!r}": (CT, scale_value("weight_global_scale", v), "global-scale", True)
       for v in (math.nan, -math.inf, 0.0, 1e38, 1e-40)},
    **{f"fp8 weight_scale {v!r}": (MO8, scale_value("weight_scale", v), "global-scale", True)
       for v in (math.nan, -1.0, 1e38, 1e-45)},
    "negative block scales": (MO, negative_block_scales, "block-scale", True),
    # scale tensors of the wrong dtype or shape
    "weight_scale 1-d": (MO, header(_scale_shape([2048])), "dtype-shape", True),  # o_proj [128, 256]: [128, 16]
    "weight_scale huge shape": (MO, header(_scale_shape([2**47, 2**47])), "index", True),
    "weight_global_scale 0-d": (CT, header(lambda h: h[f"{O_PROJ}.weight_global_scale"].update(shape=[])),
                                "dtype-shape", True),
    "weight_scale_2 [1, 1]": (MO, header(lambda h: h[f"{O_PROJ}.weight_scale_2"].update(shape=[1, 1])),
                              "dtype-shape", True),
    "weight_scale_2 I32": (MO, header(lambda h: h[f"{O_PROJ}.weight_scale_2"].update(dtype="I32")),
                           "dtype-shape", True),
    "header names a surrogate": (MO, header(tensor_name_surrogate), "index", True),
    # files
    "hf_quant_config.json a symlink": (MO, symlink_hf, "file-integrity", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_output_names_its_rule(built, tmp_path, case):
    base, mutate, rule, sealed = CASES[case]
    d = tmp_path / "out"
    shutil.copytree(built[1][base], d)
    mutate(d)
    if sealed:
        fz.seal(d)  # the manifest agrees with the files: the contract itself must see the fault
    rep = verify(d)
    assert rule in {v.rule for v in rep.violations}, rep.violations
    r = CliRunner().invoke(main, ["verify", str(d), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert f"FAIL {rule}:" in r.output and "Traceback" not in r.output
    assert json.loads((tmp_path / "r.json").read_text())["violations"][rule]["count"] >= 1


def test_manifest_tensor_naming_no_quantizer_with_source(built, tmp_path):
    """A tensors entry naming a quantizer the manifest lacks (schema-valid): reported, and the source
    comparison that looks quantizers up does not trip over it."""
    src, bases = built
    d = tmp_path / "out"
    shutil.copytree(bases[MO], d)
    edit(MANIFEST, lambda m: m["tensors"][f"{O_PROJ}.weight"].update(quantizer="no-such-quantizer"))(d)
    rep = verify(d, str(src))
    assert {(v.rule, v.name) for v in rep.violations} == {("manifest", f"{O_PROJ}.weight")}
    assert {v.detail for v in rep.violations} == {
        "quantizer 'no-such-quantizer' does not list it",
        f"member of quantizer {O_PROJ} without a tensors entry naming it"}
    assert len(rep.tensors) == rep.modules > 0


def test_source_of_another_shape_is_a_violation(built, tmp_path):
    """A source o_proj one column wider (65: its packed width rounds to the same 32 bytes) does not
    fit: named, not a broadcasting error."""
    import torch
    from safetensors.torch import load_file, save_file

    src, bases = built
    odd = tmp_path / "odd"
    shutil.copytree(src, odd)
    fname = json.loads((odd / INDEX).read_text())["weight_map"][f"{O_PROJ}.weight"]
    tensors = load_file(odd / fname)
    tensors[f"{O_PROJ}.weight"] = torch.zeros(64, 65, dtype=torch.bfloat16)
    save_file(tensors, odd / fname, metadata={"format": "pt"})
    rep = verify(bases[MO], str(odd))
    assert [(v.rule, v.name) for v in rep.violations] == [("source", O_PROJ)]
    assert "does not fit source BF16[64, 65]" in rep.violations[0].detail


def test_not_a_directory_is_the_only_error(tmp_path):
    (tmp_path / "f").write_text("x")
    for p in (tmp_path / "f", tmp_path / "nope"):
        with pytest.raises(ShardquantError):
            verify(p)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: ")


def test_empty_directory(tmp_path):
    rep = verify(tmp_path)
    assert {v.rule for v in rep.violations} == {"config", "index"}


@pytest.mark.parametrize("signal_,noise,want", [
    (1.0, math.inf, -math.inf), (math.inf, math.inf, math.nan), (1.0, math.nan, math.nan),
    (0.0, 1.0, -math.inf), (1.0, 0.0, math.inf), (math.inf, 1.0, math.inf), (1e-300, 1e300, -math.inf),
    (100.0, 1.0, 20.0),
])
def test_sqnr_of_non_finite_sums(signal_, noise, want):
    """A dequantized Inf gives an infinite noise sum: SQNR -inf, never a math domain error."""
    got = Stat("t", 1, signal_, noise).sqnr_db
    assert (math.isnan(got) and math.isnan(want)) or got == want
