"""Where the arithmetic runs: NumPy on the CPU (the reference) or CuPy on a GPU, one interface.

`load` moves a member's raw storage to where the arithmetic happens (identity on the CPU),
`amax` reduces it, `quantizer(fmt, global_scale).quantize` returns NumPy outputs ready to write.
"""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager, nullcontext

import numpy as np

from . import formats
from .encoding import Encoded
from .errors import ShardquantError
from .formats.base import tensor_amax
from .plan import device_lanes


class NumpyBackend:
    name = "numpy"
    device_budget = None  # the host copy is the working copy
    fallback: str | None = None  # --device auto on a machine with an NVIDIA GPU: why not the GPU, and the fix

    decodes: tuple[str, ...] = ()  # source kinds it decodes itself (shardquant/encoding.py Encoded)

    def lanes(self) -> list:
        """One: NumPy threads each kernel itself (formats/base.py threads)."""
        return [self]

    def ticket(self) -> None:
        return None

    def hold(self, ticket, nbytes: int | float, stop: threading.Event):
        return nullcontext()

    def load(self, raw) -> np.ndarray:
        return raw.decode() if isinstance(raw, Encoded) else raw

    def amax(self, x: np.ndarray, dtype: str, name: str) -> np.float32:
        return tensor_amax(x, dtype, name)

    def amaxes(self, items) -> list[np.float32]:
        """max |x| of each (array, dtype, name)."""
        return [self.amax(x, dtype, name) for x, dtype, name in items]

    def quantizer(self, fmt: str, gs: np.float32, search: str = "none"):
        q = formats.get(fmt).Quantizer
        return q(gs) if search == "none" else q(gs, search)  # only formats declaring scale_search take one


AUTO_GPU_FRACTION = 0.8  # --gpu-memory auto: this much of the device's free memory at start


class DeviceMemory:
    """One GPU's memory budget shared by its lanes (plan.device_lanes). A lane holds min(bytes, budget)
    while it quantizes a group (its members kept on the device, shardquant/pipeline.py quantize_group).
    Grants go in ticket order, the order groups were handed out, so a later group never takes the
    memory an earlier one waits for: outputs are written in plan order, the earlier must finish first."""

    def __init__(self, budget: int):
        self.budget = self.free = budget
        self.issued = self.granted = 0
        self.users = 0  # lanes holding memory now
        self.whole = False  # one of them holds the whole budget
        self.cond = threading.Condition()

    def ticket(self) -> int:
        with self.cond:
            self.issued += 1
            return self.issued - 1

    @contextmanager
    def hold(self, ticket: int, nbytes: int | float, stop: threading.Event):
        """`nbytes` at least the budget: the whole GPU, no other lane at the same time."""
        whole = nbytes >= self.budget
        n = self.budget if whole else int(nbytes)
        with self.cond:
            while self.granted != ticket or self.free < n or self.whole or (whole and self.users):
                if stop.is_set():  # the run is failing: nothing more is granted
                    raise InterruptedError("the run stopped")
                self.cond.wait(0.1)
            self.granted += 1
            self.free -= n
            self.users += 1
            self.whole = whole
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.free += n
                self.users -= 1
                self.whole = False if whole else self.whole
                self.cond.notify_all()


def pinned_host() -> bool:
    """SHARDQUANT_PINNED_HOST=1: a quantizer's members read into, and its outputs copied back into,
    page-locked host memory (cupy's pinned pool), so the copies to and from the GPU are DMA the lane
    does not wait on, instead of the driver's copies through its own staging buffers. Under measurement
    (docs/benchmarks/README.md); cupy's pool keeps freed buffers for reuse by later reads."""
    raw = os.environ.get("SHARDQUANT_PINNED_HOST", "").strip()
    if raw not in ("", "0", "1"):
        raise ShardquantError(f"SHARDQUANT_PINNED_HOST must be 0 or 1, not {raw!r}")
    return raw == "1"


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
        self.memory = DeviceMemory(device_budget)
        if pinned_host():
            self.dev.pinned = True
            self.host_empty = self.dev.pinned_empty  # the reader reads a quantizer's members into it

    def lanes(self) -> list:
        """This backend and plan.device_lanes() - 1 twins on the same GPU: each its own stream, one memory budget."""
        from .cuda import Device

        twins = []
        for _ in range(device_lanes() - 1):
            twin = object.__new__(CupyBackend)
            twin.dev, twin.device_budget, twin.memory = Device(self.dev.index), self.device_budget, self.memory
            twin.dev.pinned = self.dev.pinned
            twins.append(twin)
        return [self] + twins

    def ticket(self) -> int:
        return self.memory.ticket()

    def hold(self, ticket: int, nbytes: int | float, stop: threading.Event):
        return self.memory.hold(ticket, nbytes, stop)

    # block FP8 decoded on the GPU: half the bytes uploaded, no decoding on the reader threads
    # (docs/benchmarks/README.md: decoding on the CPU held block-FP8 -> NVFP4 to 0.32 of the disk)
    decodes = ("block-fp8",)

    def load(self, raw):
        if isinstance(raw, Encoded):
            enc = raw.info.encoding
            codes, scales = raw.raws
            return self.dev.block_fp8_decode(codes, scales, enc.block, enc.scale_dtype != "F32")
        return self.dev.to_device(raw)

    def amax(self, x, dtype: str, name: str) -> np.float32:
        return self.dev.amax(x, dtype, name)

    def amaxes(self, items) -> list[np.float32]:
        return self.dev.amaxes(items)

    def quantizer(self, fmt: str, gs: np.float32, search: str = "none"):
        if search != "none" and search not in gpu_searches(fmt):  # shardquant/convert.py converts on the CPU
            raise ShardquantError(f"--scale-search {search} for --format {fmt} has no GPU kernel yet; use --device cpu")
        return _CupyQuantizer(self.dev, fmt, gs, search)


def gpu_searches(fmt: str) -> tuple[str, ...]:
    """The --scale-search modes the GPU computes for this format (shardquant/cuda SEARCHES, by the
    format's declared kernel); importing shardquant.cuda needs no cupy."""
    from .cuda import SEARCHES

    return SEARCHES.get(formats.declared(fmt).kernel, ())


class _CupyQuantizer:
    def __init__(self, dev, fmt: str, gs: np.float32, search: str = "none"):
        self.dev, self.fmt, self.gs, self.search = dev, fmt, np.float32(gs), search

    def quantize(self, x, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, block scales or None), on the host; the kernel is the format's declared one."""
        kernel = formats.declared(self.fmt).kernel
        if not kernel or not hasattr(self.dev, kernel):
            raise ShardquantError(f"format {self.fmt!r} has no GPU kernel; use --device cpu")
        searched = {} if self.search == "none" else {"search": self.search}  # methods without a search take none
        out = getattr(self.dev, kernel)(x, dtype, self.gs, name=name, **searched)  # name: a NaN/Inf refusal names it
        host = self.dev.to_host(*(out if isinstance(out, tuple) else (out,)))
        return host[0], (host[1] if len(host) > 1 else None)


def get_backend(device: str, device_budget: int | None):
    """--device auto|cpu|cuda|cuda:N -> a backend. auto takes the GPU when cupy sees one."""
    if device == "cpu":
        return NumpyBackend()
    if device == "auto":
        from .cuda import available

        if available():
            return CupyBackend("cuda", device_budget)
        cpu = NumpyBackend()
        cpu.fallback = gpu_fallback_reason()
        return cpu
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


def describe(backends: list) -> str:
    """Where the arithmetic runs, for the start and summary lines: "cuda:0 (NVIDIA H200) with CuPy
    13.6.0", "cuda:0, cuda:1 (2 x NVIDIA H200) with CuPy 13.6.0" or "the CPU with NumPy 2.4.6, 16
    threads" (formats/base.py threads(): SHARDQUANT_THREADS, else every core)."""
    gpus = [b for b in backends if getattr(b, "dev", None) is not None]
    if not gpus:
        return f"the CPU with NumPy {np.__version__}, {formats.base.threads()} threads"
    cp = gpus[0].dev.cp
    names = []
    for b in gpus:
        try:
            raw = cp.cuda.runtime.getDeviceProperties(b.dev.index)["name"]
            names.append(raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))
        except Exception:  # a name is a nicety; the conversion does not need it
            names.append("GPU")
    kinds = sorted(set(names))
    what = (f"{len(names)} x {kinds[0]}" if len(names) > 1 else kinds[0]) if len(kinds) == 1 else ", ".join(names)
    return f"{', '.join(f'cuda:{b.dev.index}' for b in gpus)} ({what}) with CuPy {cp.__version__}"


def nvidia_driver(proc: str = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA driver's version when this machine has one ("570.86.15"), "" when only nvidia-smi
    says so, None without one. Cheap: a file read, no import, no subprocess."""
    try:
        with open(proc, encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return "" if shutil.which("nvidia-smi") else None
    for word in text.split():
        head = word.split(".")[0]
        if head.isdigit() and "." in word and int(head) >= 100:
            return word
    return ""


def gpu_install_hint(driver: str | None) -> str:
    """The pip command for CuPy that this driver runs: CuPy's CUDA 13 wheels need driver 580 or
    newer, its CUDA 12 wheels 525 or newer (pyproject.toml extras `gpu` and `gpu-cuda12`)."""
    major = int(driver.split(".")[0]) if driver and driver.split(".")[0].isdigit() else None
    if major is None:
        return ('pip install "shardquant[gpu]" (CUDA 13, driver 580+) or "shardquant[gpu-cuda12]" (CUDA 12, '
                "driver 525+); nvidia-smi shows the driver")
    if major >= 580:
        return 'pip install "shardquant[gpu]" (CuPy for CUDA 13)'
    if major >= 525:
        return f'pip install "shardquant[gpu-cuda12]" (CuPy for CUDA 12: driver {driver} is too old for CUDA 13)'
    return f"driver {driver} is too old for CuPy's CUDA 12 and 13 wheels: update it to 580+, then " \
           'pip install "shardquant[gpu]"'


def gpu_fallback_reason() -> str | None:
    """Why --device auto converts on the CPU on a machine with an NVIDIA GPU, with the fix; None on
    a machine without one (the CPU is then simply the machine's processor)."""
    driver = nvidia_driver()
    if driver is None:
        return None
    shown = f"driver {driver}" if driver else "nvidia-smi found"
    try:
        import cupy
    except ImportError:
        return f"this machine has an NVIDIA GPU ({shown}) but CuPy is not installed; for the GPU: " \
               + gpu_install_hint(driver)
    except Exception as e:  # a broken install: the first line says what
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return f"CuPy does not import ({type(e).__name__}: {first}); reinstall it: {gpu_install_hint(driver)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cupy's CUDARuntimeError: "cudaErrorInsufficientDriver: ..." and the like
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "NoDevice" in msg or "no CUDA-capable device" in msg:
            return f"no CUDA device visible to CuPy{env}: {msg}"
        fix = gpu_install_hint(driver)
        if "InsufficientDriver" in msg or "insufficient" in msg:
            fix = f"this CuPy needs a newer driver than {driver or 'this one'}: pip uninstall the cupy-cuda* " \
                  f"package, then {fix}; or update the driver"
        return f"CUDA driver error ({msg}); {fix}"
    if n == 0:
        return f"no CUDA device visible to CuPy{env}"
    return None

