"""CuPy kernels against the NumPy path, code for code, and a whole conversion GPU vs CPU.
Marked `gpu`: run with `pytest -m gpu` on a machine with a CUDA device; skipped elsewhere."""

import filecmp
import json

import ml_dtypes
import numpy as np
import pytest

from shardquant import formats
from shardquant.backend import CupyBackend, NumpyBackend
from shardquant.cuda import available
from shardquant.formats.base import tensor_amax
from shardquant.testing import qwen3_moe, served, write_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not available(), reason="needs cupy and a CUDA device (run `pytest -m gpu` on the GPU machine)"),
]
DTYPES = ("BF16", "F16", "F32")


def _raw(x: np.ndarray, dtype: str) -> np.ndarray:
    x = x.astype(np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# Largest finite value of each storage type (bf16's is below fp32's: fp32's max rounds to Inf in bf16).
_MAX = {"BF16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), "F16": 65504.0, "F32": float(np.finfo(np.float32).max)}
# Values that are exact ties between neighbouring E4M3 codes at scale 1: subnormal (units of 2^-9),
# the first binade, [1, 2) and [256, 448).
_E4M3_TIES = ([(2 * k + 1) * 2.0**-10 for k in range(8)] + [2.0**-6 + 2.0**-10, 2.0**-6 + 3 * 2.0**-10]
              + [1 + (2 * j + 1) / 16 for j in range(8)] + [256 + 16 * (2 * j + 1) for j in range(6)])
_E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 3.0]


def _cases(rng, dtype: str):
    """Random shapes and magnitudes plus planted edge cases: zero blocks, -0.0, ties, extremes.
    Shapes include whole and edge 128x128 tiles, rows that are not whole 16-byte loads and rows
    longer than fp8_channel_quant keeps in registers; _takes picks those a format can quantize."""
    shapes = [(1, 16), (3, 48), (17, 272), (64, 2048), (257, 1024), (128, 128), (256, 384), (129, 256),
              (300, 160), (5, 131), (33, 260), (3, 20480)]
    for rows, cols in shapes:
        for scale in (1e-3, 1.0, 300.0):
            yield f"rand{rows}x{cols}@{scale}", rng.standard_normal((rows, cols)) * scale
    x = rng.standard_normal((32, 64))
    x[0, :16] = 0.0
    x[1, :] = -0.0
    x[2, :16] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0])
    x[3, :16] = np.array([6.0] + [0.25 * k for k in range(15)])  # block max 6: scale exactly 1 step
    x[4, 0] = 1e4  # outlier
    x[5, :16] = 1e-7  # tiny block: scale clamps to 2^-9
    yield "planted", x
    yield "zeros", np.zeros((16, 32))
    y = rng.standard_normal((8, 32))
    y[:, ::2] = -1e-30
    yield "tiny-negatives", y
    z = rng.standard_normal((8, 32)) * 1e-40  # subnormal in fp32 (zero in f16, tiny in bf16)
    z[0, :16] = 1e-45
    yield "subnormal", z
    # Rounding ties at scale 1. Rows 0..63: 448 first (row, tile and fp8 scale 1.0; MX blocks 1..3
    # have a max in [256, 448): E8M0 scale 1), then E4M3 ties of both signs. Rows 64..127: every
    # 32-element block starts with 6.0 (MXFP4 scale 1), then E2M1 ties of both signs.
    t = np.empty((128, 128))
    e4 = np.array(_E4M3_TIES + [-v for v in _E4M3_TIES])
    e2 = np.array(_E2M1_TIES + [-v for v in _E2M1_TIES])
    for r in range(64):
        t[r] = np.roll(np.resize(e4, 128), r)
        t[r, 0] = 448.0
        t[64 + r] = np.roll(np.resize(e2, 128), r)
        t[64 + r, ::32] = 6.0
    yield "ties", t
    # E8M0 rounding: block maxima at and just below mantissa 1.75 (rounds up / not), powers of two,
    # fp32 FLT_MIN and a subnormal; the second block of each row has the same maximum, negative.
    maxima = [7.0, 6.96875, 3.5, 3.484375, 448.0, 446.0, 256.0, 1.0, 1.75 * 2.0**-100, 2.0**-126, 1e-40, 2.0**-14]
    e = rng.uniform(-1, 1, (len(maxima), 64)) * np.array(maxima)[:, None]
    e[:, 0] = maxima
    e[:, 33] = [-m for m in maxima]
    yield "e8m0-bounds", e
    # Dead tiles and rows: tile (0,0) zeros, tile (0,1) -0.0 only; rows 200 and 201 all -0.0 and 0.0.
    d = rng.standard_normal((256, 256))
    d[:128, :128] = 0.0
    d[:128, 128:] = -0.0
    d[200] = -0.0
    d[201] = 0.0
    yield "dead", d
    h = rng.uniform(-0.5, 0.5, (8, 64)) * _MAX[dtype]  # the storage type's largest values
    h[0, 0], h[1, 40], h[2, :32] = _MAX[dtype], -_MAX[dtype], _MAX[dtype]
    yield "largest", h


def _takes(fmt: str, shape: tuple[int, int]) -> bool:
    """Whether the format's NumPy quantizer takes this shape: whole blocks along the input dim
    (Format.fits); a tiled format takes any shape (formats/fp8_block.py crops edge tiles) and its
    kernel must match there too, though conversion keeps such weights in high precision."""
    fmt_ = formats.declared(fmt)
    return fmt_.block is not None or fmt_.fits(shape) is None


@pytest.fixture(scope="module")
def gpu():
    return CupyBackend("cuda", 1 << 30)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_numpy_code_for_code(gpu, fmt, dtype):
    declared = formats.declared(fmt)
    if not declared.kernel:
        pytest.skip(f"{fmt} declares no GPU kernel (formats/base.py Format.kernel): it converts on the CPU")
    rng = np.random.default_rng(7)
    cpu = NumpyBackend()
    ran = 0
    for label, x in _cases(rng, dtype):
        if not _takes(fmt, x.shape):
            continue
        ran += 1
        raw = _raw(x, dtype)
        amax_c = tensor_amax(raw, dtype, label)
        amax_g = gpu.amax(gpu.load(raw), dtype, label)
        assert amax_c.view(np.uint32) == np.float32(amax_g).view(np.uint32), (label, amax_c, amax_g)
        # a second global scale unrelated to this tensor's amax exercises clamping at both ends
        # (formats whose scales are all their own ignore it: one run)
        gss = {formats.get(fmt).global_scale(amax_c), np.float32(amax_c / 7.0 + 1e-30)}
        for gs in gss if declared.quantizer_scale else list(gss)[:1]:
            wc, sc = cpu.quantizer(fmt, gs).quantize(raw, dtype, label)
            wg, sg = gpu.quantizer(fmt, gs).quantize(gpu.load(raw), dtype, label)
            _same(wc, wg, f"{label} {dtype} {fmt} weight", raw)
            if sc is not None:
                _same(sc, sg, f"{label} {dtype} {fmt} scale", raw)
            else:
                assert sg is None, label
    assert ran >= 20, f"only {ran} cases fit {fmt}"


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_by_every_format(gpu, fmt, dtype, bad):
    """NaN/Inf in one tile / row / block: both backends raise NumericError naming the tensor. Formats
    with a per-quantizer scale refuse it in their amax pass, the conversion's first step for every
    group (their kernels then never see it); the others in their own kernel."""
    from shardquant.errors import NumericError

    declared = formats.declared(fmt)
    if not declared.kernel:
        pytest.skip(f"{fmt} declares no GPU kernel")
    name = "model.layers.3.mlp.experts.7.down_proj.weight"
    x = np.random.default_rng(3).standard_normal((256, 256))
    x[130, 200] = bad  # tile (1, 1), MX block (130, 6)
    raw = _raw(x, dtype)
    with pytest.raises(NumericError, match=name):
        NumpyBackend().quantizer(fmt, np.float32(1.0)).quantize(raw, dtype, name)
    with pytest.raises(NumericError, match=name):
        if declared.quantizer_scale:
            gpu.amax(gpu.load(raw), dtype, name)
        else:
            gpu.quantizer(fmt, np.float32(1.0)).quantize(gpu.load(raw), dtype, name)


def _same(a: np.ndarray, b: np.ndarray, what: str, raw: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    bad = np.argwhere(a != b)
    if bad.size:
        r, c = bad[0]
        lo = (c * 2 // 16) * 16 if a.shape[1] * 2 == raw.shape[1] else max(0, c - 4)
        raise AssertionError(
            f"{what}: {len(bad)} codes differ; first at [{r},{c}]: cpu {a[r, c]:#04x} gpu {b[r, c]:#04x}; "
            f"input row {r} cols {lo}..{lo + 16}: {raw[r, lo:lo + 16]!r}"
        )


def test_nan_and_inf_are_refused_on_gpu(gpu):
    from shardquant.errors import NumericError

    for dtype in DTYPES:
        x = np.ones((4, 32), np.float32)
        x[2, 5] = np.nan
        with pytest.raises(NumericError, match="model.layers.0.mlp.down_proj.weight"):
            gpu.amax(gpu.load(_raw(x, dtype)), dtype, "model.layers.0.mlp.down_proj.weight")


# Mixed precision: each quantizer through its own format's kernel in one run (tests/test_mixed.py).
def assert_same_outputs(cpu, gpu) -> None:
    """The two conversions wrote the same files, byte for byte, the manifest's backend aside."""
    files = sorted(p.name for p in cpu.iterdir())
    assert files == sorted(p.name for p in gpu.iterdir())
    for name in files:
        if name == "scale_manifest.json":
            ma = json.loads((cpu / name).read_text())
            mb = json.loads((gpu / name).read_text())
            assert ma.pop("backend") == "numpy" and mb.pop("backend") == "cupy"
            assert ma == mb
        else:
            assert filecmp.cmp(cpu / name, gpu / name, shallow=False), name


MIXED = {"nvfp4+fp8-channel": ("nvfp4", ("attention=fp8-channel",)),
         "mxfp4+fp8-block": ("mxfp4", ("attention=fp8-block", r".*\.layers\.1\.mlp\.experts\..*=mxfp8"))}


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS) + sorted(MIXED))
def test_whole_conversion_gpu_equals_cpu_byte_for_byte(tmp_path, fmt):
    fmt, picks = MIXED.get(fmt, (fmt, ()))
    if not formats.declared(fmt).kernel:
        pytest.skip(f"{fmt} declares no GPU kernel (formats/base.py Format.kernel): --device cuda is refused")
    from shardquant.convert import convert

    # every weight shape whole 128x128 tiles (so fp8-block quantizes) but k/v [64, 256]: one fused set kept
    model = qwen3_moe(hidden=256, layers=2, experts=8, inter=128, heads=2, kv_heads=1, head_dim=64)
    src = write_checkpoint(tmp_path / "src", model, shard_bytes=300_000)
    a = convert(str(src), tmp_path / "cpu", fmt, device="cpu", format_for=picks)
    b = convert(str(src), tmp_path / "gpu", fmt, device="cuda", format_for=picks)
    assert len(a.plan.formats) == (1 + len(picks) if picks else 1)
    assert (a.backend, b.backend) == ("numpy", "cupy")
    assert_same_outputs(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.parametrize("source", ["bf16", "deepseek_v3", "kimi_k3"])
def test_lanes_of_one_gpu_equal_cpu_per_expert(tmp_path, monkeypatch, source):
    """A GPU's lanes (plan.device_lanes: streams sharing one memory budget) quantize small groups at
    once: the per-expert policy's many quantizers give the CPU's bytes, with bf16, block-FP8
    (decoded on the GPU) and MXFP4 (cast on the host, one pool for the run) sources."""
    from shardquant.plan import DEVICE_LANES
    from shardquant.convert import convert
    from shardquant.testing_sources import SOURCES

    monkeypatch.delenv("SHARDQUANT_DEVICE_LANES", raising=False)
    lanes = CupyBackend("cuda", 1 << 30).lanes()
    assert len(lanes) == DEVICE_LANES >= 2 and len({id(b.dev.stream) for b in lanes}) == DEVICE_LANES
    assert len({id(b.memory) for b in lanes}) == 1
    if source == "bf16":
        model = qwen3_moe(hidden=256, layers=2, experts=16, inter=128, heads=2, kv_heads=1, head_dim=128)
        src = write_checkpoint(tmp_path / "src", model, shard_bytes=300_000)
    else:
        src = SOURCES[source]().write(tmp_path / "src")
    a = convert(str(src), tmp_path / "cpu", "nvfp4", device="cpu", expert_policy="per-expert")
    b = convert(str(src), tmp_path / "gpu", "nvfp4", device="cuda", expert_policy="per-expert")
    assert b.backend == "cupy" and a.bytes_read == b.bytes_read  # a quantized source: its stored bytes
    assert source != "bf16" or a.bytes_read == a.plan.source_bytes
    assert sum(len(g.members) < 3 for g in b.plan.groups) > 16  # many small quantizers
    assert_same_outputs(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.parametrize("source", ["bf16", "deepseek_v3", "kimi_k3"])
@pytest.mark.parametrize("policy", ["shared", "per-expert"])
def test_pinned_host_memory_gives_the_same_bytes(tmp_path, monkeypatch, source, policy):
    """SHARDQUANT_PINNED_HOST=1 (shardquant/backend.py pinned_host): members read into page-locked
    memory, uploaded asynchronously, outputs copied back into it; the bytes are the CPU's, and the
    reader's buffers for the device are page-locked (a cast's and a kept tensor's are not)."""
    from shardquant.convert import convert
    from shardquant.testing_sources import SOURCES

    if source == "bf16":
        model = qwen3_moe(hidden=256, layers=2, experts=16, inter=128, heads=2, kv_heads=1, head_dim=128)
        src = write_checkpoint(tmp_path / "src", model, shard_bytes=300_000)
    else:
        src = SOURCES[source]().write(tmp_path / "src")
    a = convert(str(src), tmp_path / "cpu", "nvfp4", device="cpu", expert_policy=policy)
    monkeypatch.setenv("SHARDQUANT_PINNED_HOST", "1")
    import cupy as cp

    from shardquant import cuda
    made = []
    real = cuda.Device.pinned_empty
    monkeypatch.setattr(cuda.Device, "pinned_empty", lambda self, shape, dtype: made.append(shape) or real(self, shape, dtype))
    b = convert(str(src), tmp_path / "gpu", "nvfp4", device="cuda", expert_policy=policy)
    assert b.backend == "cupy" and a.bytes_read == b.bytes_read and made
    assert cp.cuda.runtime.pointerGetAttributes(real(CupyBackend("cuda", 1 << 30).dev, (4,), np.uint8).ctypes.data).type == 1
    assert_same_outputs(tmp_path / "cpu", tmp_path / "gpu")


def test_group_larger_than_device_budget_still_matches(tmp_path):
    from shardquant.convert import convert

    src = write_checkpoint(tmp_path / "src", qwen3_moe(hidden=128, layers=1, experts=8, inter=64), shard_bytes=300_000)
    a = convert(str(src), tmp_path / "cpu", "nvfp4", device="cpu")
    b = convert(str(src), tmp_path / "gpu", "nvfp4", device="cuda", gpu_memory=20_000)
    assert any("exceeds --gpu-memory" in w for w in b.plan.warnings)
    for p in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert filecmp.cmp(p, tmp_path / "gpu" / p.name, shallow=False)
    assert a.bytes_read == b.bytes_read == a.plan.source_bytes


def test_devices_all_equals_cpu(tmp_path):
    from shardquant.convert import convert

    src = write_checkpoint(tmp_path / "src", qwen3_moe(hidden=128, layers=2, experts=8, inter=64), shard_bytes=300_000)
    a = convert(str(src), tmp_path / "cpu", "nvfp4", device="cpu")
    b = convert(str(src), tmp_path / "gpus", "nvfp4", devices="all")
    assert b.backend == "cupy" and b.bytes_read == a.bytes_read == a.plan.source_bytes
    for p in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert filecmp.cmp(p, tmp_path / "gpus" / p.name, shallow=False)


def test_group_over_the_host_budget_is_read_once_onto_the_gpu(tmp_path):
    """plan.Group.on_device on a real GPU: a shared expert group over --memory-budget is read once,
    member by member, held on the device, and gives the CPU's bytes (the CPU reads it twice)."""
    from shardquant.convert import convert

    src = write_checkpoint(tmp_path / "src", qwen3_moe(hidden=128, layers=2, experts=8, inter=64), shard_bytes=300_000)
    a = convert(str(src), tmp_path / "cpu", "nvfp4", device="cpu", memory_budget=100_000)
    b = convert(str(src), tmp_path / "gpu", "nvfp4", device="cuda", memory_budget=100_000)
    assert any(g.two_pass for g in a.plan.groups) and a.bytes_read > a.plan.source_bytes
    assert any(g.on_device for g in b.plan.groups) and not any(g.two_pass for g in b.plan.groups)
    assert b.bytes_read == b.plan.source_bytes and b.plan.read_factor == 1.0
    for p in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert filecmp.cmp(p, tmp_path / "gpu" / p.name, shallow=False), p.name


def _verify_both(out, src):
    from shardquant.verify import verify

    a = verify(out, str(src), device="cpu")
    b = verify(out, str(src), device="cuda")
    assert [(v.rule, v.name) for v in a.violations] == [(v.rule, v.name) for v in b.violations]
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors] and a.tensors
    for x, y in zip(a.tensors, b.tensors):
        # NumPy sums fp32 products blockwise, the kernel in float64: equal to fp32 rounding
        assert x.signal == pytest.approx(y.signal, rel=1e-5), x.name
        assert x.noise == pytest.approx(y.noise, rel=1e-4, abs=1e-30) or (np.isnan(x.noise) and np.isnan(y.noise)), x.name
    return a, b


@pytest.mark.parametrize("fmt,flavor", served())
def test_verify_on_gpu_equals_cpu(tmp_path, fmt, flavor):
    """verify --source --device cuda (kernels.cu error_power) gives the CPU's verdicts: the same
    violations (the manifest's amax is checked against the GPU's max |W| exactly), the same sums."""
    from shardquant.convert import convert

    model = qwen3_moe(hidden=256, layers=2, experts=4, inter=128, heads=2, kv_heads=2, head_dim=64)
    src = write_checkpoint(tmp_path / "src", model, shard_bytes=300_000)
    convert(str(src), tmp_path / "out", fmt, device="cpu", flavor=flavor)
    a, b = _verify_both(tmp_path / "out", src)
    assert a.ok and b.ok


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp8", "fp8-block"])
def test_verify_on_gpu_finds_what_the_cpu_finds(tmp_path, fmt):
    """Random bytes in a stored weight (E4M3 NaN codes 0x7f/0xff among them): both paths fail the same
    tensor with the same numbers."""
    from shardquant.convert import convert
    from shardquant.st import read_header

    model = qwen3_moe(hidden=256, layers=1, experts=4, inter=128, heads=2, kv_heads=2, head_dim=64)
    src = write_checkpoint(tmp_path / "src", model, shard_bytes=10**9)
    out = tmp_path / "out"
    convert(str(src), out, fmt, device="cpu")
    shard = next(out.glob("model-*.safetensors"))
    (t,) = [t for n, t in read_header(shard).items() if "experts.2.up_proj.weight" in n and "scale" not in n
            and len(t.shape) == 2]  # the codes only: bad scales are the contract's (verify._check_scales)
    with open(shard, "r+b") as f:  # random codes in place
        f.seek(t.offset)
        f.write(np.random.default_rng(3).integers(0, 256, t.nbytes, dtype=np.uint8).tobytes())
    from shardquant.verify import verify  # the files table now disagrees with the shard: hashes off

    a = verify(out, str(src), device="cpu", hashes=False)
    b = verify(out, str(src), device="cuda", hashes=False)
    assert [(v.rule, v.name) for v in a.violations] == [(v.rule, v.name) for v in b.violations]
    assert any(v.rule == "sqnr" and "experts.2.up_proj" in v.name for v in b.violations)
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name
        if np.isfinite(x.noise):
            assert x.noise == pytest.approx(y.noise, rel=1e-4), x.name
        else:
            assert not np.isfinite(y.noise), x.name


def test_kernel_cache_is_used_and_survives_damage(tmp_path, monkeypatch):
    """The first process compiles and stores the image; the next loads it without compiling; a
    damaged entry is compiled again and replaced."""
    import shardquant.cuda as sc
    from cupy.cuda import compiler

    monkeypatch.setenv("SHARDQUANT_CACHE_DIR", str(tmp_path))
    first = sc._Module(0)
    entries = list((tmp_path / "kernels").glob("*.bin"))
    assert len(entries) == 1
    real = compiler.compile_using_nvrtc

    def refuse(*a, **k):
        raise AssertionError("compiled although the cache holds the image")

    monkeypatch.setattr(compiler, "compile_using_nvrtc", refuse)
    second = sc._Module(0)
    assert second.names == first.names
    data = bytearray(entries[0].read_bytes())
    data[-64] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(compiler, "compile_using_nvrtc", counted)
    third = sc._Module(0)
    assert calls == [1] and third.names == first.names
    assert sc._cache_load(entries[0].stem) is not None  # replaced by a good entry


@pytest.mark.parametrize("code", [0, 1])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nan", [False, True])
def test_error_power_kernel_against_float64(gpu, code, kind, dtype, nan):
    """kernels.cu error_power on every code and scale kind against a float64 reference of the same
    fp32 products: E8M0 bytes 0 (2^-127), 127 and 254 (2^127, over a block of zero codes) planted;
    with `nan`, an E4M3 NaN code (0x7f) or a NaN scale (E4M3 0x7f, E8M0 255) makes the noise NaN."""
    from shardquant.formats.base import E4M3_VALUES, to_f32

    dev = gpu.dev
    rng = np.random.default_rng(7 + code + 3 * kind)
    rows, cols = 37, 256
    tile = (1, 32) if kind != 0 else (16, 128)
    src = _raw(rng.standard_normal((rows, cols)), dtype)
    w = rng.integers(0, 256, (rows, cols // (2 if code else 1)), dtype=np.uint8)
    if not code:
        w[(w & 0x7F) == 0x7F] = 0  # no NaN codes unless planted
    srows, scols = -(-rows // tile[0]), -(-cols // tile[1])
    if kind == 0:
        scale = rng.uniform(0.5, 2.0, (srows, scols)).astype(np.float32)
    elif kind == 1:
        scale = rng.integers(0, 127, (srows, scols), dtype=np.uint8)
    else:
        scale = rng.integers(100, 140, (srows, scols), dtype=np.uint8)
        scale[0, :3] = [0, 127, 254]
        w[0, (2 * 32) // (2 if code else 1):(3 * 32) // (2 if code else 1)] = 0  # the 2^127 block: zero codes
    if nan:
        if kind == 0:
            w[1, 0] = 0x7F if not code else w[1, 0]
            scale[0, 0] = np.nan if code else scale[0, 0]
        else:
            scale[1, 1] = 0x7F if kind == 1 else 255
    sval = {0: lambda: scale, 1: lambda: E4M3_VALUES[scale],
            2: lambda: np.where(scale == 255, np.float32(np.nan),
                                np.ldexp(np.float64(1), scale.astype(np.int32) - 127)).astype(np.float32)}[kind]()
    if code:
        e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
        vals = np.stack([e2m1[w & 15], e2m1[w >> 4]], -1).reshape(rows, cols)
    else:
        vals = E4M3_VALUES[w]
    pq = np.float32(0.375)
    per = np.repeat(np.repeat(sval, tile[0], 0)[:rows], tile[1], 1)[:, :cols]
    with np.errstate(invalid="ignore", over="ignore"):
        deq = (vals * (per * pq)).astype(np.float32)
    ref = to_f32(src, dtype).astype(np.float64)
    want_s, want_n = float(np.sum(ref * ref)), float(np.sum((deq.astype(np.float64) - ref) ** 2))
    assert np.isnan(want_n) == nan
    s, n, top = dev.error_power(src, dtype, w, code, scale, kind, tile, pq)
    assert s == pytest.approx(want_s, rel=1e-12)
    assert np.isnan(n) if nan else n == pytest.approx(want_n, rel=1e-12)
    assert top == np.float32(np.max(np.abs(to_f32(src, dtype))))


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("source", ["deepseek_v3", "deepseek_v4", "kimi_k3"])
def test_quantized_source_gpu_equals_cpu_byte_for_byte(tmp_path, source, fmt):
    """Sources stored quantized (shardquant/encoding.py): decoded weights go through the GPU kernels,
    casts run the same NumPy code on both (tests/test_quantized_sources.py for the CPU's own checks)."""
    if not formats.declared(fmt).kernel:
        pytest.skip(f"{fmt} declares no GPU kernel (formats/base.py Format.kernel): --device cuda is refused")
    from shardquant.convert import convert
    from shardquant.testing_sources import SOURCES

    fx = SOURCES[source]()
    src = fx.write(tmp_path / "src")
    a = convert(str(src), tmp_path / "cpu", fmt, device="cpu")
    b = convert(str(src), tmp_path / "gpu", fmt, device="cuda")
    assert (a.backend, b.backend) == ("numpy", "cupy") and a.bytes_read == b.bytes_read
    assert_same_outputs(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.parametrize("scale_dtype", ["F32", "E8M0"])
def test_block_fp8_decode_kernel_equals_numpy(scale_dtype):
    """kernels.cu block_fp8_decode against shardquant/encoding.py DecodedTensor.decode, every E4M3
    code (NaN codes included), edge tiles, subnormal and extreme scales, -0.0."""
    from pathlib import Path

    from shardquant.encoding import BLOCK_FP8, DecodedTensor, SourceEncoding
    from shardquant.st import TensorInfo

    rng = np.random.default_rng(3)
    dev = CupyBackend("cuda", None).dev
    for rows, cols in [(1, 1), (128, 128), (129, 257), (300, 1000), (256, 256)]:
        codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
        codes.reshape(-1)[: min(256, codes.size)] = np.arange(min(256, codes.size), dtype=np.uint8)  # every code
        grid = (-(-rows // 128), -(-cols // 128))
        if scale_dtype == "F32":
            scales = (rng.standard_normal(grid) ** 2 * 1e-3).astype(np.float32)
            scales.reshape(-1)[0] = np.float32(1e-40)  # subnormal
            scales.reshape(-1)[-1] = np.float32(3e38)  # products overflow to Inf
        else:
            scales = rng.integers(0, 255, size=grid, dtype=np.uint8)
            scales.reshape(-1)[0] = 0  # 2^-127
            scales.reshape(-1)[-1] = 254
        enc = SourceEncoding("w", BLOCK_FP8, "F8_E4M3", ("w",), ("s",), "F32" if scale_dtype == "F32" else "E8M0",
                             (128, 128), (rows, cols))
        part = TensorInfo("w", "F8_E4M3", (rows, cols), Path("x"), 0, rows * cols)
        scale_part = TensorInfo("s", "F32" if scale_dtype == "F32" else "F8_E8M0", grid, Path("x"), 0, scales.nbytes)
        info = DecodedTensor("w", "BF16", (rows, cols), Path("x"), 0, 2 * rows * cols, enc, (part, scale_part))
        want = info.decode([codes, scales])
        got = dev.to_host(dev.block_fp8_decode(codes, scales, (128, 128), scale_dtype == "E8M0"))[0]
        assert got.dtype == np.uint16 and np.array_equal(got, want), (rows, cols)


# --scale-search mse on the GPU (kernels.cu nvfp4_search, mx_search, tile_search): every format that
# declares it, from the registry.
SEARCHED = [f for f in sorted(formats.FORMATS) if "mse" in formats.declared(f).scale_search]


def _candidate_errors(fmt: str, x: np.ndarray, gs: np.float32) -> np.ndarray:
    """The CPU search's error of every candidate of every block (tile) of fp32 `x` (whole blocks), in
    its order, inf where a candidate is skipped: [blocks, candidates]. Only to show that the planted
    cases hold exact ties; a format new to the search must be added here (KeyError otherwise)."""
    from shardquant.formats import fp8_block, mxfp4, mxfp8, nvfp4
    from shardquant.formats.base import e4m3_values

    rows, cols = x.shape
    errs = []
    with np.errstate(all="ignore"):
        if fmt == "fp8-block":
            rtn = fp8_block.tile_scales(np.abs(x).reshape(rows // 128, 128, cols // 128, 128).max(axis=(1, 3)))
            for f in fp8_block.SEARCH_FACTORS:
                c = (rtn * np.float32(f)).astype(np.float32)
                ok = np.isfinite(c) & (c >= np.finfo(np.float32).tiny)
                errs.append(np.where(ok, fp8_block.tile_sse(x, np.where(ok, c, rtn)), np.inf))
        else:
            mod, block, lo, hi = {"nvfp4": (nvfp4, 16, 1, 0x7E), "mxfp4": (mxfp4, 32, 1, 254),
                                  "mxfp8": (mxfp4, 32, 1, 254)}[fmt]  # MXFP8 searches by mxfp4.search_scales
            xb = x.reshape(rows, cols // block, block)
            bamax = np.abs(xb).max(axis=2)
            if fmt == "nvfp4":
                rtn = nvfp4.block_scales(bamax, gs).astype(np.int32)
                sse = lambda c: nvfp4.block_sse(xb, c, gs)  # noqa: E731
            else:
                rtn = mxfp4.e8m0_bytes(bamax, formats.get(fmt).EMAX).astype(np.int32)
                elems = (mxfp8._elements, e4m3_values) if fmt == "mxfp8" else ()
                sse = lambda c: mxfp4.block_sse(xb, c, *elems)  # noqa: E731
            for step in mod.SEARCH_STEPS:
                c = rtn + step
                errs.append(np.where((c >= lo) & (c <= hi), sse(np.clip(c, lo, hi).astype(np.uint8)), np.inf))
    return np.stack(errs, -1).reshape(-1, len(errs))


def _ties(errs: np.ndarray) -> np.ndarray:
    """Blocks whose least error two candidates share (NaN rows never tie)."""
    best = errs.min(axis=1)
    return np.isfinite(best) & ((errs == best[:, None]).sum(axis=1) > 1)


def _tie_blocks(fmt: str) -> np.ndarray:
    """Blocks (2-D: rows of whole blocks) in which two candidates' errors are exactly equal, found among
    blocks of three values on a grid of multiples of 2^-5 (exact in bf16, f16 and fp32), those where
    RTN loses to two tied neighbours first; NVFP4's carry a block of 2688 (so s2 = 1 from the amax).
    fp8-block's ties are its zero and -0.0 tiles (_cases "zeros", "dead")."""
    if fmt == "fp8-block":
        return np.zeros((0, 128))
    block = formats.declared(fmt).block_size
    g = np.arange(1, 256) / 32
    v, w, u = (a.reshape(-1) for a in np.meshgrid(g, g[::8], g[::16]))
    x = np.zeros((len(v), block), np.float32)
    x[:, 0], x[:, 1], x[:, 5] = v, -w, u
    errs = _candidate_errors(fmt, x.reshape(1, -1), np.float32(1.0))
    tied = _ties(errs)
    neighbours = np.flatnonzero(tied & (errs[:, 0] > errs.min(axis=1)))[:32]
    picked = np.concatenate([neighbours, np.flatnonzero(tied)[: 64 - len(neighbours)]])
    out = np.concatenate([x[picked], np.full((1, block), 2688.0)]) if fmt == "nvfp4" else x[picked]
    out = np.concatenate([out, np.zeros((-len(out) % 4, block))])
    return out.reshape(-1, 4 * block)


def _search_cases(rng, dtype: str, fmt: str):
    """_cases' random and planted tensors, and for the search: heavy-tailed blocks (outliers), exact
    ties between candidates (_tie_blocks), MXFP8 blocks whose byte moves down (448 beside values in
    E4M3's subnormal range), tiles whose smaller candidates are subnormal (skipped) and blocks whose
    scales sit at their clamps (NVFP4's 2^-9 and 448 under the third global scale of the test)."""
    yield from _cases(rng, dtype)
    yield "heavy-tails", rng.standard_t(2, (256, 256)) * 0.02
    yield "candidate-ties", _tie_blocks(fmt)
    m = rng.standard_normal((16, 64)) * 2e-3
    m[:, ::32] = 448.0
    yield "mx-subnormal-elements", m
    t = rng.uniform(-1, 1, (128, 256)) * 460 * 2.0**-126  # tile amax / 448 within 8/7 of FLT_MIN
    t[0, 0], t[0, 128] = 460 * 2.0**-126, -450 * 2.0**-126
    yield "subnormal-candidates", t
    c = rng.standard_normal((32, 64))
    c[:16, :16] = 1e-30  # scale 2^-9 whatever s2: the steps below it are skipped
    yield "clamped", c


@pytest.mark.parametrize("fmt", SEARCHED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_searched_scales_gpu_equals_cpu_code_for_code(gpu, fmt, dtype):
    """--scale-search mse: the kernels' codes and scales are the CPU search's, byte for byte, over
    random and planted cases; the search moves scales and the cases hold exact ties (so both the
    comparison and the tie rule are exercised, not only round to nearest)."""
    from shardquant.backend import gpu_searches
    from shardquant.formats.base import to_f32

    declared = formats.declared(fmt)
    assert declared.kernel and "mse" in gpu_searches(fmt), f"{fmt} declares mse but its GPU kernel lacks it"
    rng = np.random.default_rng(11)
    cpu = NumpyBackend()
    ran = moved = tied = 0
    for label, x in _search_cases(rng, dtype, fmt):
        if x.size == 0 or not _takes(fmt, x.shape):
            continue
        ran += 1
        raw = _raw(x, dtype)
        amax = tensor_amax(raw, dtype, label)
        gs = formats.get(fmt).global_scale(amax)
        # formats with a per-quantizer scale: also s2 larger than the amax's (scales clamp at 2^-9) and
        # smaller (they clamp at 448)
        gss = [gs, np.float32(amax / 7.0 + 1e-30), np.float32(amax / 10752.0 + 1e-30)] if declared.quantizer_scale else [gs]
        for g in gss:
            with np.errstate(all="ignore"):  # an s2 far from the amax overflows some candidates' products
                wc, sc = cpu.quantizer(fmt, g, "mse").quantize(raw, dtype, label)
                rtn = cpu.quantizer(fmt, g).quantize(raw, dtype, label)[1]
            wg, sg = gpu.quantizer(fmt, g, "mse").quantize(gpu.load(raw), dtype, label)
            _same(wc, wg, f"{label} {dtype} {fmt} gs={g!r} weight", raw)
            bits = (lambda a: a.view(np.uint32)) if sc.dtype == np.float32 else (lambda a: a)
            _same(bits(sc), bits(sg), f"{label} {dtype} {fmt} gs={g!r} scale", raw)
            moved += int(np.sum(bits(sc) != bits(rtn)))
            if declared.fits(x.shape) is None:
                tied += int(_ties(_candidate_errors(fmt, to_f32(raw, dtype), g)).sum())
    assert ran >= 20, f"only {ran} cases fit {fmt}"
    assert moved > 0, f"the search moved no {fmt} scale: the cases do not tell it from round to nearest"
    assert tied > 0, f"no {fmt} block holds a tie between candidates"


def _all_searched(mixed: str) -> bool:
    fmt, picks = MIXED[mixed]
    return all(f in SEARCHED for f in [fmt] + [p.rsplit("=", 1)[1] for p in picks])


@pytest.mark.parametrize("fmt", SEARCHED + [m for m in sorted(MIXED) if _all_searched(m)])
def test_whole_conversion_with_scale_search_gpu_equals_cpu(tmp_path, fmt):
    """--scale-search mse --device cuda writes the CPU's files byte for byte (mixed precision too, where
    every format picked searches), and its scales are not round to nearest's."""
    fmt, picks = MIXED.get(fmt, (fmt, ()))
    from shardquant.convert import convert
    from shardquant.source import scan
    from shardquant.st import read_raw

    model = qwen3_moe(hidden=256, layers=2, experts=8, inter=128, heads=2, kv_heads=1, head_dim=64)
    src = write_checkpoint(tmp_path / "src", model, shard_bytes=300_000)
    a = convert(str(src), tmp_path / "cpu", fmt, device="cpu", format_for=picks, scale_search="mse")
    b = convert(str(src), tmp_path / "gpu", fmt, device="cuda", format_for=picks, scale_search="mse")
    convert(str(src), tmp_path / "rtn", fmt, device="cuda", format_for=picks)
    assert (a.backend, b.backend) == ("numpy", "cupy") and b.plan.scale_search == "mse"
    assert not any("GPU kernel" in w for w in b.plan.warnings)
    assert_same_outputs(tmp_path / "cpu", tmp_path / "gpu")
    got, rtn = scan(tmp_path / "gpu").tensors, scan(tmp_path / "rtn").tensors
    scales = [k for k in got if k.endswith("weight_scale") or k.endswith("weight_scale_inv")]
    assert scales and any(read_raw(got[k]).tobytes() != read_raw(rtn[k]).tobytes() for k in scales)


def test_scale_search_without_a_gpu_kernel_converts_on_the_cpu(tmp_path, monkeypatch):
    """A format whose GPU kernel lacks the search (none today: shardquant/cuda SEARCHES is made to
    drop nvfp4's here): --device cuda is refused in one line, --device auto converts on the CPU and says so."""
    import shardquant.cuda
    from shardquant.convert import convert
    from shardquant.errors import ShardquantError

    monkeypatch.setattr(shardquant.cuda, "SEARCHES", {k: v for k, v in shardquant.cuda.SEARCHES.items() if k != "nvfp4"})
    src = write_checkpoint(tmp_path / "src", qwen3_moe(), shard_bytes=100_000)
    with pytest.raises(ShardquantError, match="--scale-search mse for --format nvfp4 has no GPU kernel yet; use --device cpu"):
        convert(str(src), tmp_path / "a", "nvfp4", device="cuda", scale_search="mse")
    assert not (tmp_path / "a").exists()
    r = convert(str(src), tmp_path / "b", "nvfp4", device="auto", scale_search="mse")
    assert r.backend == "numpy" and any("--scale-search mse for --format nvfp4 has no GPU kernel yet" in w
                                        for w in r.plan.warnings)
