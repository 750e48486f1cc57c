"""SwiGLU's element-wise passes fused into one: a small C file (`fused.c`), compiled with the machine's C compiler
the first time a process needs it and kept in the user's cache directory.

The spectral MLP's slices (`sct_edge/model/swiglu.py`) are tokens × 512 tensors, 4 MiB each for llama3-8b at
4 × 512: too large for a core's L2, so every element-wise pass streams them from L3. In backward, torch takes
five passes per slice (SiLU, the product fed to down, the two gradients, SiLU's backward), computes the sigmoid
twice and allocates three slices; the forward takes two passes. One pass of `fused.c` reads each input once,
computes the sigmoid once and writes its outputs over its inputs.

The loops run on torch's own OpenMP threads: where torch's runtime is libgomp (Linux wheels), the library is
built with -fopenmp and its `libgomp.so.1` resolves to the copy torch loaded. Python threads instead would wait
for the core that torch's OpenMP worker keeps spinning on after each op (GOMP_SPINCOUNT, `sct_edge/cli.py`):
measured, two of them ran no faster than one. With any other runtime the kernels run on one thread, since a
second runtime's threads would compete with torch's for the cores.

Where no C compiler works (or for bfloat16, or non-contiguous tensors) the same results come from torch's own
ops; `available()` says which. Results equal torch's to float rounding (float32's exponential is `fused.c`'s
own polynomial, not torch's).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).with_name("fused.c")
# 512-bit vectors where the CPU has them: gcc 12 tunes an AVX-512 Zen for 256 bits unless told.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-shared", "-fPIC")
_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}


def openmp_runtime_paths() -> list[str]:
    """The files of the OpenMP runtimes loaded in this process (torch's libgomp on Linux wheels), found in the
    process's memory map; none where there is no /proc (macOS)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line})
    except OSError:
        return []


def _openmp_flags() -> tuple[str, ...]:
    runtimes = openmp_runtime_paths()
    return ("-fopenmp",) if len(runtimes) == 1 and "libgomp.so.1" in runtimes[0] else ()


def _cpu_model() -> str:
    """The CPU's model name, part of the cache key: -march=native ties a build to the CPU it was made on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sct-edge"


def _build(command: list[str], source: bytes, target: Path) -> None:
    """Compile `source` to `target`, atomically: concurrent processes each build their own copy and rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*command, "-x", "c", "-", "-o", str(built), "-lm"], input=source, check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]
    if compiler[0] is None:
        return None
    command, source = [*compiler, *FLAGS, *_openmp_flags()], SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), _cpu_model().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"fused-{key}.so"
    try:
        if not target.exists():
            _build(command, source, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None  # no working compiler, no writable cache, or a library the loader refuses: torch's ops
    for suffix in _SUFFIXES.values():
        # attribute access, not indexing: ctypes keeps the function object, and its argtypes, only then
        getattr(library, f"silu_mul_{suffix}").argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long]
        getattr(library, f"silu_mul_backward_{suffix}").argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long]
    return library


def available() -> bool:
    """Whether the fused kernels run in this process (else torch's ops give the same results)."""
    return _library() is not None


def _kernel(name: str, tensors: tuple[Tensor, ...]) -> Callable[..., None] | None:
    """The compiled `name` for these tensors' dtype, or None where torch's ops must do it."""
    first = tensors[0]
    if first.dtype not in _SUFFIXES or first.device.type != "cpu" or first.requires_grad:
        return None
    if any(t.dtype != first.dtype or t.shape != first.shape or not t.is_contiguous() for t in tensors):
        return None
    library = _library()
    return None if library is None else getattr(library, f"{name}_{_SUFFIXES[first.dtype]}")


def silu_mul_(g: Tensor, u: Tensor) -> Tensor:
    """silu(g) * u, written over g, which it returns."""
    kernel = _kernel("silu_mul", (g, u))
    if kernel is None:
        return F.silu(g, inplace=True).mul_(u)
    kernel(g.data_ptr(), u.data_ptr(), g.numel())
    return g


def silu_mul_backward_(g: Tensor, u: Tensor, grad_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For p = silu(g) * u and its gradient `grad_p`: (∂/∂g, p, ∂/∂u). The results may take the inputs' memory,
    so none of the three inputs may be used afterwards."""
    kernel = _kernel("silu_mul_backward", (g, u, grad_p))
    if kernel is None:
        silu = F.silu(g)
        grad_u = grad_p * silu
        # silu_backward: the kernel F.silu's autograd uses
        return torch.ops.aten.silu_backward(grad_p.mul_(u), g), silu.mul_(u), grad_u
    kernel(g.data_ptr(), u.data_ptr(), grad_p.data_ptr(), g.numel())
    return g, u, grad_p
