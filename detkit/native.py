"""Native kernels of the CPU fast path, compiled on first use with the system C compiler.

Winograd's input and output transforms as PyTorch ops take four to five passes over memory and
as many OpenMP parallel regions per layer (pad, tile copy, transform matmul; transform matmul,
activation, crop). With passive OpenMP waiting every region wakes the thread pool, and on a
light layer (0.4 GFLOP) those wake-ups and passes cost more than Winograd saves. The C versions
(detkit/csrc/kernels.c) do each transform in one pass and one region; so do darknet's maxpool
(two strided maxima, or pad + max_pool2d, as PyTorch ops) and the [yolo] head's activation and
decode (about ten ops: copies, sigmoids, exps, concatenations).

The library is built once per source, compiler and CPU (`-O3 -march=native -fopenmp`) into
detkit's cache directory ($DETKIT_CACHE, else $XDG_CACHE_HOME/detkit or ~/.cache/detkit) and
bound to the libgomp torch has already loaded. Without a C compiler, or with DETKIT_NATIVE=0,
`kernels()` returns None and the fast path uses the PyTorch ops instead: same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("detkit")

SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
ACTIVATION_CODES = {"linear": 0, "leaky": 1, "relu": 2, "logistic": 3}
# Below this many elements a transform runs on the calling thread alone: waking the pool costs
# more than the second thread saves (PyTorch's own grain size for elementwise ops).
PARALLEL_MIN_ELEMENTS = 32768

_LIBRARY: ctypes.CDLL | None = None
_TRIED = False
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes."""
    if os.environ.get("DETKIT_CACHE"):
        return Path(os.environ["DETKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "detkit"


def _compiler() -> list[str] | None:
    """The C compiler's command ($CC may carry arguments, e.g. "ccache gcc")."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _build_key(compiler: list[str]) -> str:
    """Source, compiler version, flags and the CPU's instruction sets (-march=native)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             timeout=30)
    digest.update(version.stdout.encode() + " ".join(FLAGS).encode())
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
        digest.update(flags.encode())
    except (OSError, StopIteration):
        pass
    return digest.hexdigest()[:16]


def _private_directory() -> Path:
    """A directory only this user can write to, for when the cache directory cannot be made:
    a library loaded from a directory others can write to could be anyone's code."""
    directory = Path(tempfile.gettempdir()) / f"detkit-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = directory.lstat()
        if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
                and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return directory
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="detkit-"))   # this process's own, built anew


def _build(compiler: list[str]) -> Path:
    """The compiled library, built now if this source/compiler/CPU has none cached yet."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = _private_directory()
    target = directory / f"kernels-{_build_key(compiler)}.so"
    if not target.is_file():
        # built under a unique name, then renamed: processes started together (DDP) never
        # load a half-written file
        handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(handle)
        try:
            subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"], check=True,
                           capture_output=True, text=True, timeout=300)
            os.chmod(partial, 0o755)   # mkstemp's 0600 would lock out a shared $DETKIT_CACHE
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.detkit_winograd_input.argtypes = [pointer, size, size, size, size, ctypes.c_int,
                                              pointer, ctypes.c_int]
    library.detkit_winograd_output.argtypes = [pointer, size, size, size, size, ctypes.c_int,
                                               ctypes.c_int, pointer, ctypes.c_int]
    library.detkit_maxpool.argtypes = [pointer, size, size, size, size, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, size, size, pointer, ctypes.c_int]
    library.detkit_maxpool_bf16.argtypes = library.detkit_maxpool.argtypes
    library.detkit_yolo_decode.argtypes = [pointer, size, size, size, size, size, pointer,
                                           pointer, ctypes.c_float, ctypes.c_float,
                                           ctypes.c_float, pointer, ctypes.c_int]
    for function in (library.detkit_winograd_input, library.detkit_winograd_output,
                     library.detkit_maxpool, library.detkit_maxpool_bf16,
                     library.detkit_yolo_decode):
        function.restype = ctypes.c_int
    return library


def kernels() -> ctypes.CDLL | None:
    """The native kernels, or None where they cannot be built (logged once)."""
    global _LIBRARY, _TRIED
    with _LOCK:
        if not _TRIED:
            _LIBRARY = _load()
            _TRIED = True
    return _LIBRARY


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DETKIT_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler: the fast path runs PyTorch ops instead of native kernels (slower)")
        return None
    try:
        return _bind(_build(compiler))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native kernels not built (%s): using PyTorch ops", detail)
        return None


def kernels_for(x: torch.Tensor) -> ctypes.CDLL | None:
    """The native kernels for an eager float32 CPU call on x. None on other devices and dtypes,
    and while a graph is being traced, exported or compiled: the C code is invisible to
    torch.jit, torch.onnx and torch.compile, which would record only the empty outputs."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or _capturing_a_graph():
        return None
    return kernels()


def pool_kernels_for(x: torch.Tensor) -> ctypes.CDLL | None:
    """kernels_for, for the maxpool, which also has a bfloat16 kernel (the CPU bf16 path)."""
    if x.dtype != torch.bfloat16:
        return kernels_for(x)
    if x.device.type != "cpu" or _capturing_a_graph():
        return None
    return kernels()


def _capturing_a_graph() -> bool:
    compiler = getattr(torch, "compiler", None)
    checks = (torch.jit.is_tracing, torch.onnx.is_in_onnx_export,
              getattr(compiler, "is_compiling", None), getattr(compiler, "is_exporting", None))
    return any(check is not None and check() for check in checks)


def _check(status: int, problem: str) -> None:
    """The C functions return -1 for arguments they do not handle (checked before any work)."""
    if status != 0:
        raise ValueError(problem)


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= PARALLEL_MIN_ELEMENTS else 1


def winograd_input(library: ctypes.CDLL, x: torch.Tensor, m: int) -> torch.Tensor:
    """V (tiles, (m+2)^2, C) of a channels-last float32 CPU map x (N, C, H, W)."""
    n, c, h, w = x.shape
    tiles = n * -(-h // m) * -(-w // m)
    v = torch.empty((tiles, (m + 2) ** 2, c), dtype=x.dtype)
    _check(library.detkit_winograd_input(x.data_ptr(), n, h, w, c, m, v.data_ptr(),
                                         _threads(v.numel())),
           f"native Winograd input transform: bad m={m}")
    return v


def winograd_output(library: ctypes.CDLL, mm: torch.Tensor, shape: tuple[int, int, int, int],
                    m: int, activation: str) -> torch.Tensor:
    """act(A^T M A) as a channels-last (N, C, H, W) map, from M (tiles, (m+2)^2, C)."""
    n, c, h, w = shape
    y = torch.empty((n, c, h, w), dtype=mm.dtype, memory_format=torch.channels_last)
    _check(library.detkit_winograd_output(mm.data_ptr(), n, h, w, c, m,
                                          ACTIVATION_CODES[activation], y.data_ptr(),
                                          _threads(mm.numel())),
           f"native Winograd output transform: bad m={m} or {activation}")
    return y


def maxpool(library: ctypes.CDLL, x: torch.Tensor, size: int, stride: int, before: int,
            out_hw: tuple[int, int]) -> torch.Tensor:
    """Darknet's maxpool (pixels outside the map skipped, as under its -inf padding) of a
    channels-last float32 or bfloat16 CPU map x (N, C, H, W), channels-last out."""
    n, c, h, w = x.shape
    out_h, out_w = out_hw
    y = torch.empty((n, c, out_h, out_w), dtype=x.dtype, memory_format=torch.channels_last)
    function = library.detkit_maxpool_bf16 if x.dtype == torch.bfloat16 else library.detkit_maxpool
    _check(function(x.data_ptr(), n, h, w, c, size, stride, before, out_h, out_w, y.data_ptr(),
                    _threads(x.numel())),
           f"native maxpool: bad size {size} or stride {stride}")
    return y


def yolo_decode(library: ctypes.CDLL, x: torch.Tensor, anchors: torch.Tensor, scale_xy: float,
                net_hw: tuple[int, int]) -> torch.Tensor:
    """[yolo] head predictions (B, A*H*W, 5+C) straight from the logits x (B, A*(5+C), H, W),
    float32 CPU, any memory format: YoloHead.decode(YoloHead.forward(x)) in one pass."""
    b, channels, h, w = x.shape
    count = anchors.shape[0]
    k = channels // count
    out = torch.empty((b, count * h * w, k), dtype=torch.float32)
    strides = (ctypes.c_int64 * 4)(*x.stride())
    anchor_wh = anchors.to(torch.float32).contiguous()
    _check(library.detkit_yolo_decode(x.data_ptr(), b, h, w, count, k, strides,
                                      anchor_wh.data_ptr(), scale_xy, net_hw[1] / w,
                                      net_hw[0] / h, out.data_ptr(), _threads(x.numel())),
           f"native [yolo] decode: {channels} channels for {count} anchors")
    return out
