"""What the command line says and how it behaves around the work (issue 13, items 3-7): filters that
match nothing are named, the start and summary lines say where the arithmetic runs (and, on a machine
with an NVIDIA GPU, why not there and how to fix it), --quiet is quiet, each warning is printed once,
sizes are decimal everywhere, format names take any case, a path typo is not a hub error, the --plot
PNG reads on its own, and Ctrl-C at any moment gives one line, status 130, and a resumable output."""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import shardquant.backend as backend
from shardquant import testing
from shardquant.cli import group_warnings, main
from shardquant.convert import convert, prepare
from shardquant.errors import PlanError, SourceError
from shardquant.report import Report, TensorStat, heatmap_layout, text_mask, write_heatmap

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return testing.write_checkpoint(tmp_path_factory.mktemp("llama"), testing.llama(layers=2))


@pytest.fixture(scope="module")
def unclaimed(tmp_path_factory) -> Path:
    """A llama with 40 2-D weights that no rule claims (each one a "kept in high precision" warning)."""
    m = testing.llama(layers=2)
    m.specs += [(f"model.layers.{i % 2}.custom_{i}.weight", "BF16", (16, 64)) for i in range(40)]
    return testing.write_checkpoint(tmp_path_factory.mktemp("unclaimed"), m)


# ---------------------------------------------------------------------------------------------
# item 5: filters that match nothing are named (an error with --strict)

def _rules_file(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "rules.toml"
    p.write_text(body)
    return p


def test_include_exclude_that_match_nothing_are_warned(llama):
    p = prepare(str(llama), include=("custom_proj",), exclude=(r".*\.o_prj",))
    assert "--include 'custom_proj' matches no tensor or module name" in p.warnings
    assert r"--exclude '.*\.o_prj' matches no tensor or module name" in p.warnings
    # patterns that do match are not named
    p = prepare(str(llama), exclude=(r".*\.o_proj",))
    assert not [w for w in p.warnings if "--exclude" in w and "matches no" in w]


def test_include_that_only_matches_claimed_tensors_quantizes_nothing(llama):
    p = prepare(str(llama), include=(r".*q_proj.*",))  # q_proj is a rule's already; norms are not 2-D
    assert any(w.startswith("--include '.*q_proj.*' quantizes nothing") for w in p.warnings)


def test_unused_filters_are_errors_with_strict(llama, tmp_path):
    with pytest.raises(PlanError, match=r"--strict: --include 'custom_proj' matches no tensor"):
        prepare(str(llama), include=("custom_proj",), strict=True)
    with pytest.raises(PlanError, match=r"--exclude 'nothing' matches no tensor"):
        prepare(str(llama), exclude=("nothing",), strict=True)
    with pytest.raises(PlanError, match=r"--format-for mlp\\\.nope=fp8 picks no quantized tensor"):
        prepare(str(llama), format_for=(r"mlp\.nope=fp8",), strict=True)
    # without --strict the same choice is a warning (plan.py already said so; now it is one line too)
    p = prepare(str(llama), format_for=(r"mlp\.nope=fp8",))
    assert any("picks no quantized tensor" in w for w in p.warnings)


def test_rules_file_rows_that_match_nothing_are_named(llama, tmp_path):
    f = _rules_file(tmp_path, '''
[[rule]]
name = "typo"
pattern = '.*\\.self_atn\\.o_proj\\.weight'
action = "keep"

[[rule]]
name = "o_first"
pattern = '.*\\.o_proj\\.weight'
action = "keep"

[[rule]]
name = "o_shadowed"
pattern = '.*layers\\.0\\.self_attn\\.o_proj\\.weight'
action = "keep"
''')
    p = prepare(str(llama), rules_file=f)
    mine = [w for w in p.warnings if w.startswith("rule ")]
    assert mine == [r"rule 'typo' (pattern '.*\.self_atn\.o_proj\.weight') matches no tensor name",
                    r"rule 'o_shadowed' (pattern '.*layers\.0\.self_attn\.o_proj\.weight') decides no "
                    "tensor: an earlier rule row claims every tensor it matches"]
    with pytest.raises(PlanError, match=r"--strict: rule 'typo'"):
        prepare(str(llama), rules_file=f, strict=True)


def test_cli_names_the_unused_filter_and_fails_with_strict(llama):
    r = cli("plan", llama, "--format", "nvfp4", "--exclude", "head")  # a full match: 'lm_head' or '.*head'
    assert r.exit_code == 0
    assert "warning: --exclude 'head' matches no tensor or module name" in r.stderr
    r = cli("plan", llama, "--format", "nvfp4", "--exclude", "head", "--strict")
    assert r.exit_code == 1 and r.stderr.startswith("error: --strict: --exclude 'head' matches no tensor")


def test_help_says_patterns_match_whole_names():
    text = " ".join(cli("convert", "--help").output.split())
    for opt in ("--include", "--exclude", "--format-for", "--rules"):
        i = text.index(f"{opt} ")
        assert "full match" in text[i:i + 400] or "whole tensor" in text[i:i + 400], opt


# ---------------------------------------------------------------------------------------------
# item 4: where the arithmetic runs

def test_start_and_summary_lines_name_the_backend(llama, tmp_path):
    r = cli("convert", llama, "--format", "nvfp4", "-o", tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 0, r.output
    from shardquant.formats.base import threads

    where = f"the CPU with NumPy {np.__version__}, {threads()} threads"
    lines = r.stderr.splitlines()
    start = [ln for ln in lines if ln.startswith("converting on ")]
    assert start == [f"converting on {where}: 8 quantizers into 1 shard in {tmp_path / 'out'}"]
    assert re.fullmatch(rf"wrote .*: 8 quantizers, 1 shard, [0-9.]+ GB in [0-9.]+ s \(\d+ MB/s of input\) on "
                        rf"{re.escape(where)}", lines[-1]), lines[-1]
    assert r.stdout == ""  # messages go to stderr
    res = convert(str(llama), tmp_path / "api", "nvfp4", device="cpu")
    assert res.device == where and res.backend == "numpy"


def test_describe_gpus_without_a_gpu():
    class Dev:
        def __init__(self, i):
            self.index = i
            self.cp = FakeCupy

    class FakeCupy:
        __version__ = "13.6.0"

        class cuda:
            class runtime:
                @staticmethod
                def getDeviceProperties(i):
                    return {"name": b"NVIDIA H200"}

    gpus = [type("B", (), {"dev": Dev(i)})() for i in (0, 1)]
    assert backend.describe(gpus[:1]) == "cuda:0 (NVIDIA H200) with CuPy 13.6.0"
    assert backend.describe(gpus) == "cuda:0, cuda:1 (2 x NVIDIA H200) with CuPy 13.6.0"


def test_nvidia_driver_is_read_cheaply(tmp_path, monkeypatch):
    f = tmp_path / "version"
    f.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 15 2025\n"
                 "GCC version:  gcc version 12.2.0\n")
    assert backend.nvidia_driver(str(f)) == "570.86.15"
    monkeypatch.setattr(backend.shutil, "which", lambda name: None)
    assert backend.nvidia_driver(str(tmp_path / "absent")) is None  # no NVIDIA GPU here
    monkeypatch.setattr(backend.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert backend.nvidia_driver(str(tmp_path / "absent")) == ""


def _fake_cupy(monkeypatch, count):
    """A cupy module whose getDeviceCount returns `count` or raises it."""
    import types

    def get():
        if isinstance(count, Exception):
            raise count
        return count

    cp = types.ModuleType("cupy")
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get))
    monkeypatch.setitem(sys.modules, "cupy", cp)


@pytest.mark.parametrize("driver,fix", [
    ("570.86.15", 'pip install "shardquant[gpu-cuda12]"'),
    ("580.65.06", 'pip install "shardquant[gpu]"'),
    ("", 'pip install "shardquant[gpu]" (CUDA 13, driver 580+) or "shardquant[gpu-cuda12]"'),
])
def test_fallback_says_why_and_how_to_fix(monkeypatch, driver, fix):
    monkeypatch.setattr(backend, "nvidia_driver", lambda: driver)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    why = backend.gpu_fallback_reason()
    assert "CuPy is not installed" in why and fix in why
    _fake_cupy(monkeypatch, Exception("cudaErrorNoDevice: no CUDA-capable device is detected"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert backend.gpu_fallback_reason().startswith("no CUDA device visible to CuPy (CUDA_VISIBLE_DEVICES='')")
    _fake_cupy(monkeypatch, 0)
    assert backend.gpu_fallback_reason() == "no CUDA device visible to CuPy (CUDA_VISIBLE_DEVICES='')"
    _fake_cupy(monkeypatch, Exception("cudaErrorInsufficientDriver: CUDA driver version is insufficient"))
    why = backend.gpu_fallback_reason()
    assert why.startswith("CUDA driver error (cudaErrorInsufficientDriver") and fix in why


def test_no_fallback_message_without_an_nvidia_gpu(monkeypatch):
    monkeypatch.setattr(backend, "nvidia_driver", lambda: None)
    assert backend.gpu_fallback_reason() is None


def test_auto_on_the_cpu_of_a_gpu_machine_warns(llama, tmp_path, monkeypatch):
    import shardquant.cuda

    monkeypatch.setattr(shardquant.cuda, "available", lambda: False)
    monkeypatch.setattr(backend, "nvidia_driver", lambda: "570.86.15")
    monkeypatch.setitem(sys.modules, "cupy", None)
    r = cli("convert", llama, "--format", "nvfp4", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert ('warning: --device auto: converting on the CPU: this machine has an NVIDIA GPU (driver 570.86.15) but '
            'CuPy is not installed; for the GPU: pip install "shardquant[gpu-cuda12]"') in r.stderr
    assert "converting on the CPU with NumPy" in r.stderr
    monkeypatch.setattr(backend, "nvidia_driver", lambda: None)  # a machine without an NVIDIA GPU: nothing to fix
    r = cli("convert", llama, "--format", "nvfp4", "-o", tmp_path / "out2")
    assert r.exit_code == 0 and "--device auto" not in r.stderr


def test_gpu_extras_for_cuda_12_and_13_are_declared_and_documented():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("cupy-cuda13x") for d in extras["gpu"])
    assert any(d.startswith("cupy-cuda12x") for d in extras["gpu-cuda12"])
    readme = (ROOT / "README.md").read_text()
    assert 'pip install "shardquant[gpu]"' in readme and 'pip install "shardquant[gpu-cuda12]"' in readme


# ---------------------------------------------------------------------------------------------
# item 7: quiet is quiet, each warning once, one unit system, any case, the speed line, path typos

def test_quiet_prints_nothing(unclaimed, tmp_path):
    r = cli("convert", unclaimed, "--format", "nvfp4", "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    p = subprocess.run([sys.executable, "-m", "shardquant", "convert", str(unclaimed), "--format", "nvfp4",
                        "-o", str(tmp_path / "sub"), "-q"], capture_output=True, text=True, cwd=ROOT)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    r = cli("convert", "./no-such-model", "--format", "nvfp4", "-o", tmp_path / "x", "-q")
    assert r.exit_code == 1 and r.stderr == "error: ./no-such-model: no such directory\n"  # errors still show


def test_quiet_turns_hub_progress_bars_off(tmp_path, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    import shardquant.hub as hub

    seen = []

    def remote(repo, revision):
        seen.append(are_progress_bars_disabled())
        raise SourceError(f"{repo}: repo not found or not accessible")

    monkeypatch.setattr(hub, "open_remote", remote)
    assert not are_progress_bars_disabled()
    cli("convert", "someorg/somemodel", "--format", "nvfp4", "-o", tmp_path / "out", "-q")
    cli("convert", "someorg/somemodel", "--format", "nvfp4", "-o", tmp_path / "out")
    assert seen == [True, False]
    assert not are_progress_bars_disabled()  # restored for whoever runs next in this process


def test_similar_warnings_become_one_line():
    ws = [f"model.layers.0.custom_{i}.weight: kept in high precision (no rule claims this 2-D weight)"
          for i in range(40)]
    ws.insert(1, "--include 'x' matches no tensor or module name")
    ws.append(ws[0])  # the same warning twice
    assert group_warnings(ws) == [
        "40 tensors kept in high precision (no rule claims this 2-D weight): model.layers.0.custom_0.weight, "
        "model.layers.0.custom_1.weight, model.layers.0.custom_2.weight and 37 more",
        "--include 'x' matches no tensor or module name",
    ]
    two = ["quantizer a (9.1 GB) exceeds the memory budget: read twice", "quantizer b (9.2 GB) exceeds the memory "
           "budget: read twice"]
    assert group_warnings(two) == ["2 quantizers exceed the memory budget: read twice: a (9.1 GB), b (9.2 GB)"]
    assert group_warnings(two[:1]) == two[:1]
    # a fused set kept whole is said once, by its quantizer's line, not again for each member
    why = "shape [64, 100] of m.q_proj.weight is not a multiple of 16"
    fused = [f"quantizer m.qkv_proj kept in high precision as a whole: {why}"] + [
        f"m.{p}_proj.weight: kept in high precision (fused set not quantizable: {why})" for p in "qkv"]
    assert group_warnings(fused) == fused[:1]


def test_each_warning_is_printed_once(unclaimed, tmp_path):
    r = cli("convert", unclaimed, "--format", "nvfp4", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert warns == ["warning: 40 tensors kept in high precision (no rule claims this 2-D weight): "
                     "model.layers.0.custom_0.weight, model.layers.1.custom_1.weight, "
                     "model.layers.0.custom_2.weight and 37 more"]
    assert r.stderr.index("warning:") < r.stderr.index("converting on")  # before the work starts


def test_sizes_are_decimal_everywhere(llama, tmp_path):
    r = cli("plan", llama, "--format", "nvfp4", "--memory-budget", "20KB")
    assert r.exit_code == 0, r.output
    assert not re.search(r"\d ?[KMGT]iB", r.output), r.output
    assert re.search(r"estimated peak memory: \d+ MB", r.stdout)
    assert re.search(r"exceed the memory budget: read twice: \S+ \(0\.0 GB\)", r.stderr)


@pytest.mark.parametrize("args", [
    ["--format", "NVFP4"],
    ["--format", "Nvfp4", "--format-for", "attention=FP8-BLOCK"],
    ["--format", "FP8", "--flavor", "Compressed-Tensors"],
])
def test_format_names_take_any_case(llama, args):
    r = cli("plan", llama, *args)
    assert r.exit_code == 0, r.output
    lower = [a.lower() for a in args]
    assert lower[1] in r.stdout.splitlines()[0]


def test_speed_counts_source_bytes_once(llama, tmp_path):
    res = convert(str(llama), tmp_path / "out", "nvfp4", device="cpu", memory_budget=20_000)
    twice = sum(g.source_bytes for g in res.plan.groups if g.two_pass)
    assert twice and res.reread_bytes == twice
    assert res.bytes_read - res.reread_bytes == res.plan.source_bytes
    r = cli("convert", llama, "--format", "nvfp4", "-o", tmp_path / "cli", "--memory-budget", "20KB")
    assert r.exit_code == 0, r.output
    assert f"MB/s of input; {twice / 1e6:.2f} MB of quantizers over --memory-budget read a second time)" in r.stderr


def test_a_path_typo_is_not_a_hub_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for src, msg in [("./my-modle", "./my-modle: no such directory"),
                     ("models/foo", "models/foo: no such directory (models is a local directory, so this is a "
                                    "path, not a hub repo id)"),
                     (str(tmp_path / "nope"), f"{tmp_path / 'nope'}: no such directory"),
                     ("~/surely-no-such-dir-here", "~/surely-no-such-dir-here: no such directory")]:
        r = cli("plan", src, "--format", "nvfp4")
        assert r.exit_code == 1 and r.stderr == f"error: {msg}\n", r.stderr


def test_a_hub_error_says_it_is_not_a_local_directory_either(tmp_path, monkeypatch):
    import shardquant.hub as hub

    def remote(repo, revision):
        raise SourceError(f"{repo}: repo not found or not accessible (check the name; private repos need HF_TOKEN)")

    monkeypatch.setattr(hub, "open_remote", remote)
    monkeypatch.chdir(tmp_path)
    r = cli("plan", "my-org/my-modle", "--format", "nvfp4")
    assert r.stderr == ("error: my-org/my-modle (not a local directory either): repo not found or not accessible "
                        "(check the name; private repos need HF_TOKEN)\n")


# ---------------------------------------------------------------------------------------------
# the --plot PNG

def read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        ihdr = body if tag == b"IHDR" else ihdr
        idat += body if tag == b"IDAT" else b""
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", ihdr[:10])
    assert (depth, ctype) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(h, w, 3)


PROJS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.experts.*.gate_up_proj", "mlp.experts.*.down_proj"]


def _report(layers: int = 12) -> Report:
    ts = []
    for L in range(layers):
        for j, p in enumerate(PROJS):
            if (L, j) == (3, 1):
                continue  # a layer without o_proj: a grey cell
            db = 12.0 + (L * 5 + j * 3) % 14
            ts.append(TensorStat(f"model.layers.{L}.{p}.weight", 1000, 1.0, 10 ** (-db / 10), "q", L, p))
    return Report("out", "modelopt", "nvfp4", None, len(ts), [], tensors=ts, source="src", min_sqnr=10.0)


def _ink(img: np.ndarray) -> np.ndarray:
    return (img == (30, 30, 30)).all(axis=-1)


def test_heatmap_has_title_labels_and_a_colour_bar(tmp_path):
    rep = _report()
    png = tmp_path / "h.png"
    assert write_heatmap(png, rep) == (heatmap_layout(rep).width, heatmap_layout(rep).height)
    img, lay = read_png(png), heatmap_layout(rep)
    assert img.shape == (lay.height, lay.width, 3) and lay.cell == 16
    assert 250 < lay.width < 600 and lay.height > 12 * 16 + 100
    # the title, drawn at twice the font size where it starts
    title = text_mask("SQNR dB by layer and projection", 2)
    assert np.array_equal(_ink(img[12:12 + title.shape[0], 12:12 + title.shape[1]]), title)
    # the cells: every layer and projection, one pixel from the middle of each; grey where there is none
    cells = img[lay.grid_y + 8:lay.grid_y + 12 * 16:16, lay.grid_x + 8:lay.grid_x + 4 * 16:16]
    assert cells.shape == (12, 4, 3) and tuple(cells[3, 1]) == (128, 128, 128)
    assert sum(tuple(c) == (128, 128, 128) for c in cells.reshape(-1, 3)) == 1
    # layer numbers left of the grid, projection names below it, the axis names
    assert _ink(img[lay.grid_y:lay.grid_y + 12 * 16, :lay.grid_x]).sum() > 100
    below = img[lay.grid_y + 12 * 16:, lay.grid_x:lay.grid_x + 4 * 16]
    assert _ink(below).sum() > 300
    first = np.rot90(text_mask(PROJS[0]))  # vertical, read from the bottom up
    x = lay.grid_x + (16 - 7) // 2
    assert np.array_equal(_ink(img[lay.grid_y + 12 * 16 + 4:, x:x + 7][:first.shape[0]]), first)
    # the colour bar: green (the high end) at the top, red (the floor) at the bottom, its values beside it
    bar = img[lay.bar_y:lay.bar_y + lay.bar_h, lay.bar_x + 7]
    assert tuple(bar[0]) == (0, 200, 40) and tuple(bar[-1]) == (220, 40, 40)
    beside = _ink(img[lay.bar_y:lay.bar_y + 7, lay.bar_x + 18:lay.bar_x + 18 + 29])
    assert np.array_equal(beside, text_mask("25 dB"))
    assert _ink(img[lay.bar_y + lay.bar_h - 7:lay.bar_y + lay.bar_h, lay.bar_x + 18:]).any()  # "10 dB floor"


def test_heatmap_is_deterministic_and_small_cells_still_label(tmp_path):
    rep = _report(layers=40)
    write_heatmap(tmp_path / "a.png", rep)
    write_heatmap(tmp_path / "b.png", rep)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    w, h = write_heatmap(tmp_path / "c.png", rep, cell=4)  # every third layer labelled
    img = read_png(tmp_path / "c.png")
    assert img.shape[:2] == (h, w) and _ink(img).any()
    assert write_heatmap(tmp_path / "d.png", rep, cell=4, labels=False) == (4 * 4, 40 * 4)


def test_font_covers_what_labels_use():
    from shardquant.report import _FONT

    assert all(len(v) == 14 for v in _FONT.values())
    for ch in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._-*:()/ ":
        assert ch in _FONT, ch
    assert text_mask("0", 1).sum() == sum(bin(int(_FONT["0"][i:i + 2], 16)).count("1") for i in range(0, 14, 2))
    assert np.array_equal(text_mask("\u00e9"), text_mask("?"))  # unknown characters: '?'


# ---------------------------------------------------------------------------------------------
# item 3: Ctrl-C

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """A source that takes a few seconds to convert on the CPU (~220 MB), and its uninterrupted output."""
    src = testing.write_checkpoint(tmp_path_factory.mktemp("big"),
                                   testing.qwen3_moe(hidden=1024, layers=4, experts=16, inter=512, vocab=8192),
                                   shard_bytes=50_000_000, data=testing.fast_data)
    ref = tmp_path_factory.mktemp("ref") / "out"
    convert(str(src), ref, "nvfp4", device="cpu", max_shard_size=8_000_000)
    return src, ref


def _command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shardquant", "convert", str(src), "--format", "nvfp4", "-o", str(out),
            "--device", "cpu", "--max-shard-size", "8MB", *extra]


def _interrupt(cmd: list[str], when, signals: int = 1) -> tuple[int, str, float]:
    """Start cmd, wait `when` (seconds, or a callable that says when), send SIGINT; (status, stderr,
    seconds from the signal to the process's end)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        if callable(when):
            deadline = time.monotonic() + 60
            while not when() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            time.sleep(when)
        assert p.poll() is None, "the command ended before the signal"
        t0 = time.monotonic()
        for i in range(signals):
            p.send_signal(signal.SIGINT)
            time.sleep(0.01 * (i < signals - 1))
        p.wait(timeout=10)
        gone = time.monotonic() - t0
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
    assert out == ""
    return p.returncode, err, gone


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("model-*-of-*.safetensors")) if out.exists() else []


def _before_shardquant(status: int, err: str) -> bool:
    """The signal came while the interpreter itself was starting (site, runpy), before the first line
    of shardquant/__main__.py: Python's own way then (README "Messages, --quiet and Ctrl-C"). Under a
    loaded machine 0.05 s can be that early; the test then tries a little later."""
    return status != 130 and "interrupted" not in err and not re.search(r"shardquant/(?!__init__)", err)


@pytest.mark.parametrize("moment", ["imports", "mid-conversion"])
def test_ctrl_c_gives_one_line_and_resumes(big, tmp_path, moment):
    src, ref = big
    out = tmp_path / "out"
    cmd = _command(src, out, "-q")
    if moment == "imports":
        for delay in (0.05, 0.1, 0.15, 0.2):
            status, err, gone = _interrupt(cmd, delay)
            if not _before_shardquant(status, err):
                break
    else:
        status, err, gone = _interrupt(cmd, lambda: len(_shards(out)) >= 1)
    assert status == 130 and "Traceback" not in err and gone < 1.0, (status, err, gone)
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    n = len(list(ref.glob("model-*.safetensors")))
    if moment == "imports":
        assert err in ("interrupted; nothing was written\n",
                       f"interrupted before converting; nothing was written to {out}\n")
        assert not _shards(out)
    else:
        m = re.fullmatch(rf"interrupted: (\d+) of {n} shards finished and kept in {re.escape(str(out))}"
                         r"(?: \(and \S+ up to its last checkpoint\))?; run the same command again to resume\n", err)
        assert m, err
        kept = int(m[1])
        assert 1 <= kept < n and len(_shards(out)) == kept
        assert not (out / ".shardquant.lock").exists()  # unwound: the lock released
    p = subprocess.run(_command(src, out), capture_output=True, text=True, cwd=ROOT)  # the same command again
    assert p.returncode == 0, p.stderr
    if moment != "imports":
        assert f"resumed: kept {kept} finished shard" in p.stderr
    assert _files(out) == _files(ref)  # byte-identical to an uninterrupted run


def test_ctrl_c_twice_after_the_start_line_is_still_one_line(big, tmp_path):
    src, _ = big
    out = tmp_path / "out"
    p = subprocess.Popen(_command(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = p.stderr.readline()  # the start line (no warnings for this source)
        assert first.startswith("converting on the CPU with NumPy"), first
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)
        gone = time.monotonic() - t0
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and gone < 1.0 and "Traceback" not in err
    said = [ln for ln in re.split(r"[\r\n]", err) if "interrupted" in ln]
    assert len(said) == 1 and said[0].startswith("interrupted: "), err
    assert re.split(r"[\r\n]", err.rstrip("\n"))[-1] == said[0]  # the last thing printed


def test_ctrl_c_while_planning_writes_nothing(big, tmp_path, monkeypatch):
    """In-process (no signal handling installed: a library caller keeps its own): KeyboardInterrupt while
    planning is one line and status 130, and nothing is created."""
    import shardquant.plan as plan_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_mod, "make_plan", boom)  # plan.prepare calls it
    r = cli("convert", big[0], "--format", "nvfp4", "-o", tmp_path / "out")
    assert r.exit_code == 130 and r.stderr == f"interrupted before converting; nothing was written to {tmp_path / 'out'}\n"
    assert not (tmp_path / "out").exists()
