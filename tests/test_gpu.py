"""CuPy kernels against the NumPy path, code for code, and a whole conversion GPU vs CPU.
Marked `gpu`: run with `pytest -m gpu` on a machine with a CUDA device; skipped elsewhere."""

import filecmp
import json

import numpy as np
import pytest

from shardquant import formats
from shardquant.backend import CupyBackend, NumpyBackend
from shardquant.cuda import available
from shardquant.formats.base import tensor_amax
from shardquant.testing import qwen3_moe, write_checkpoint

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


def _cases(rng):
    """Random shapes and magnitudes plus planted edge cases: zero blocks, -0.0, ties, extremes."""
    for rows, cols in [(1, 16), (3, 48), (17, 272), (64, 2048), (257, 1024)]:
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


@pytest.fixture(scope="module")
def gpu():
    return CupyBackend("cuda", 1 << 30)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_numpy_code_for_code(gpu, fmt, dtype):
    if not formats.declared(fmt).kernel:
        pytest.skip(f"{fmt} declares no GPU kernel (formats/base.py Format.kernel): it converts on the CPU")
    rng = np.random.default_rng(7)
    cpu = NumpyBackend()
    for label, x in _cases(rng):
        raw = _raw(x, dtype)
        amax_c = tensor_amax(raw, dtype, label)
        amax_g = gpu.amax(gpu.load(raw), dtype, label)
        assert amax_c.view(np.uint32) == np.float32(amax_g).view(np.uint32), (label, amax_c, amax_g)
        # a second global scale unrelated to this tensor's amax exercises clamping at both ends
        for gs in {formats.get(fmt).global_scale(amax_c), np.float32(amax_c / 7.0 + 1e-30)}:
            wc, sc = cpu.quantizer(fmt, gs).quantize(raw, dtype, label)
            wg, sg = gpu.quantizer(fmt, gs).quantize(gpu.load(raw), dtype, label)
            _same(wc, wg, f"{label} {dtype} {fmt} weight", raw)
            if sc is not None:
                _same(sc, sg, f"{label} {dtype} {fmt} scale", raw)


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


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_whole_conversion_gpu_equals_cpu_byte_for_byte(tmp_path, fmt):
    if not formats.declared(fmt).kernel:
        pytest.skip(f"{fmt} declares no GPU kernel (formats/base.py Format.kernel): --device cuda is refused")
    from shardquant.convert import convert

    src = write_checkpoint(tmp_path / "src", qwen3_moe(hidden=128, layers=2, experts=8, inter=64), shard_bytes=300_000)
    a = convert(str(src), tmp_path / "cpu", fmt, device="cpu")
    b = convert(str(src), tmp_path / "gpu", fmt, device="cuda")
    assert (a.backend, b.backend) == ("numpy", "cupy")
    files = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "gpu").iterdir())
    for name in files:
        if name == "scale_manifest.json":
            ma = json.loads((tmp_path / "cpu" / name).read_text())
            mb = json.loads((tmp_path / "gpu" / name).read_text())
            assert ma.pop("backend") == "numpy" and mb.pop("backend") == "cupy"
            assert ma == mb
        else:
            assert filecmp.cmp(tmp_path / "cpu" / name, tmp_path / "gpu" / name, shallow=False), name


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
