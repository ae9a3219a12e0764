"""Which MLX backend runs here, and a fast BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheel (mlx-cpu) links a reference BLAS: fp32 matmul runs at a few
GFLOP/s. Loading an optimized BLAS with RTLD_GLOBAL *before* mlx is imported makes MLX's
cblas/LAPACK calls resolve to it (~30x faster on a laptop-class CPU). `import mipo_mlx`
does this once, so this module must not import mlx at module level.

    MIPO_MLX_BLAS=0                       # keep MLX's own BLAS
    MIPO_MLX_BLAS=/path/to/libopenblas.so # use this library
"""

import ctypes
import importlib.metadata
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger("mipo_mlx")
# Debian/Ubuntu's OpenBLAS (apt-get install libopenblas0-pthread), then other common places.
BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_loaded_blas: str | None = None
_preload_done = False


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def runs_on_linux_cpu_wheel() -> bool:
    """True when MLX will use its Linux CPU build (mlx-cpu installed, no CUDA build)."""
    if platform.system() != "Linux":
        return False
    cuda = any(_installed(name) for name in ("mlx-cuda", "mlx-cuda-12", "mlx-cuda-13"))
    return _installed("mlx-cpu") and not cuda


def preload_fast_blas() -> str | None:
    """Load an optimized BLAS for MLX's CPU backend; return its path, or None. Idempotent."""
    global _loaded_blas, _preload_done
    if _preload_done:
        return _loaded_blas
    _preload_done = True
    choice = os.environ.get("MIPO_MLX_BLAS", "")
    if choice == "0" or not runs_on_linux_cpu_wheel():
        return None
    candidates = [choice] if choice else list(BLAS_CANDIDATES)
    for candidate in candidates:
        if Path(candidate).is_file():
            try:
                ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _loaded_blas = candidate
            return candidate
    where = f"MIPO_MLX_BLAS={choice} is not a loadable library" if choice else "no optimized BLAS found"
    logger.warning(
        f"{where}: MLX's CPU backend runs on its slow reference BLAS; "
        "install one with `apt-get install libopenblas0-pthread`"
    )
    return None


def describe_backend() -> dict:
    """Device, backend and BLAS in use, for `mipo-mlx info` and reports."""
    import mlx.core as mx

    if mx.metal.is_available():
        backend = "metal"
    elif mx.cuda.is_available():
        backend = "cuda"
    else:
        backend = "cpu"
    return {
        "device": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "backend": backend,
        "blas": _loaded_blas or ("MLX's bundled BLAS" if runs_on_linux_cpu_wheel() else "platform default"),
        "mlx": mx.__version__,
    }
