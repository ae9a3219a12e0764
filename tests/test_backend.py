"""MLX's Linux CPU backend gets an optimized BLAS on import, or one warning and a working fallback."""

import os
import subprocess
import sys

import pytest

from mipo_mlx.backend import BLAS_CANDIDATES, runs_on_linux_cpu_wheel

MATMUL_CHECK = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import mipo_mlx, numpy as np, mlx.core as mx
a = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((80, 64)).astype(np.float32)
product = np.array(mx.array(a) @ mx.array(b))
assert np.allclose(product, a @ b, atol=1e-4), "matmul is wrong"
from mipo_mlx.backend import BLAS_CANDIDATES
maps = open("/proc/self/maps").read()
# numpy maps its own (symbol-suffixed) OpenBLAS too; look for the system library only.
print("openblas" if any(os.path.realpath(p) in maps for p in BLAS_CANDIDATES) else "bundled")
"""

needs_linux_cpu_wheel = pytest.mark.skipif(not runs_on_linux_cpu_wheel(), reason="only MLX's Linux CPU wheel needs it")


def run_check(**env):
    return subprocess.run(
        [sys.executable, "-c", MATMUL_CHECK], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@needs_linux_cpu_wheel
def test_import_loads_openblas_and_matmul_is_right():
    if not any(os.path.exists(path) for path in BLAS_CANDIDATES):
        pytest.fail("install libopenblas0-pthread (scripts/install.sh does) to run this test")
    result = run_check()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "openblas"
    assert result.stderr == ""


@needs_linux_cpu_wheel
def test_missing_blas_gives_one_warning_and_still_computes(tmp_path):
    result = run_check(MIPO_MLX_BLAS=str(tmp_path / "libnothing.so"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bundled"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "is not a loadable library" in lines[0] and "apt-get install libopenblas0-pthread" in lines[0]


@needs_linux_cpu_wheel
def test_opt_out_keeps_the_bundled_blas_silently():
    result = run_check(MIPO_MLX_BLAS="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bundled"
    assert result.stderr == ""
