"""Where the arithmetic runs: NumPy on the CPU (the reference) or CuPy on a GPU, one interface.

`load` moves a member's raw storage to where the arithmetic happens (identity on the CPU),
`amax` reduces it, `quantizer(fmt, global_scale).quantize` returns NumPy outputs ready to write.
"""

from __future__ import annotations

import numpy as np

from . import formats
from .errors import ShardquantError
from .formats.base import tensor_amax


class NumpyBackend:
    name = "numpy"
    device_budget = None  # the host copy is the working copy

    def load(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def amax(self, x: np.ndarray, dtype: str, name: str) -> np.float32:
        return tensor_amax(x, dtype, name)

    def amaxes(self, items) -> list[np.float32]:
        """max |x| of each (array, dtype, name)."""
        return [self.amax(x, dtype, name) for x, dtype, name in items]

    def quantizer(self, fmt: str, gs: np.float32):
        return formats.get(fmt).Quantizer(gs)


AUTO_GPU_FRACTION = 0.8  # --gpu-memory auto: this much of the device's free memory at start


class CupyBackend:
    name = "cupy"

    def __init__(self, device: str, device_budget: int | None):
        from .cuda import get_device

        self.dev = get_device(device)
        if device_budget is None:  # auto: leave room for the kernels' outputs and the memory pool's slack
            with self.dev.device:
                free, _total = self.dev.cp.cuda.runtime.memGetInfo()
            device_budget = int(free * AUTO_GPU_FRACTION)
        self.device_budget = device_budget

    def load(self, raw: np.ndarray):
        return self.dev.to_device(raw)

    def amax(self, x, dtype: str, name: str) -> np.float32:
        return self.dev.amax(x, dtype, name)

    def amaxes(self, items) -> list[np.float32]:
        return self.dev.amaxes(items)

    def quantizer(self, fmt: str, gs: np.float32):
        return _CupyQuantizer(self.dev, fmt, gs)


class _CupyQuantizer:
    def __init__(self, dev, fmt: str, gs: np.float32):
        self.dev, self.fmt, self.gs = dev, fmt, np.float32(gs)

    def quantize(self, x, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, block scales or None), on the host; the kernel is the format's declared one."""
        kernel = formats.declared(self.fmt).kernel
        if not kernel or not hasattr(self.dev, kernel):
            raise ShardquantError(f"format {self.fmt!r} has no GPU kernel; use --device cpu")
        out = getattr(self.dev, kernel)(x, dtype, self.gs, name=name)  # name: a kernel's NaN/Inf refusal names it
        host = self.dev.to_host(*(out if isinstance(out, tuple) else (out,)))
        return host[0], (host[1] if len(host) > 1 else None)


def get_backend(device: str, device_budget: int | None):
    """--device auto|cpu|cuda|cuda:N -> a backend. auto takes the GPU when cupy sees one."""
    if device == "cpu":
        return NumpyBackend()
    if device == "auto":
        from .cuda import available

        return CupyBackend("cuda", device_budget) if available() else NumpyBackend()
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return CupyBackend(device, device_budget)
    raise ShardquantError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")


def get_backends(device: str, devices: str | None, device_budget: int | None) -> list:
    """One backend per GPU named by --devices ("0,1,3" or "all"), else the one --device picks."""
    if not devices:
        return [get_backend(device, device_budget)]
    if device not in ("auto", "cuda"):
        raise ShardquantError(f"--devices picks GPUs; it does not go with --device {device}")
    from .cuda import available, device_count

    if not available():
        raise ShardquantError("--devices: no CUDA device visible to cupy")
    n = device_count()
    if devices == "all":
        ids = list(range(n))
    else:
        try:
            ids = [int(x) for x in devices.split(",") if x.strip()]
        except ValueError:
            raise ShardquantError(f"--devices must be 'all' or a list such as 0,1; not {devices!r}") from None
        if not ids or len(set(ids)) != len(ids) or any(not 0 <= i < n for i in ids):
            raise ShardquantError(f"--devices {devices}: {n} CUDA device(s) visible, numbered 0..{n - 1}, each once")
    return [CupyBackend(f"cuda:{i}", device_budget) for i in ids]
