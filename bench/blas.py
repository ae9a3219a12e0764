"""MLX fp32 matmul GFLOP/s next to numpy's on the same shapes, in one run.

    python bench/blas.py

`import mipo_mlx` gives MLX's Linux CPU backend an optimized BLAS (mipo_mlx/backend.py);
the goal is at least 80% of numpy's speed. The BLAS each side uses and the OpenBLAS
environment variables are printed, since they change the numbers.
"""

import os
import time

import mipo_mlx  # noqa: F401  (before mlx: loads the fast BLAS)
import mlx.core as mx
import numpy as np

from mipo_mlx.backend import describe_backend

# Square sizes and the shapes of SmolLM2-135M's layers (batch of 64 or 512 tokens).
SHAPES = [
    (512, 512, 512),
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (64, 576, 1536),
    (512, 576, 1536),
    (512, 1536, 576),
    (512, 576, 49152),
]


def gflops(run, m, k, n, seconds=1.0) -> float:
    run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def numpy_blas() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)" for i in threadpool_info())
    except ImportError:
        return "see numpy.show_config()"


def main() -> None:
    print(f"MLX BLAS:   {describe_backend()['blas']}")
    print(f"numpy BLAS: {numpy_blas()}")
    print("OPENBLAS_CORETYPE={} OPENBLAS_L2_SIZE={} OPENBLAS_NUM_THREADS={}".format(
        *(os.environ.get(k, "-") for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS"))))
    print(f"{'m x k x n':>20} {'MLX GFLOP/s':>12} {'numpy GFLOP/s':>14} {'ratio':>7}")
    ratios = []
    for m, k, n in SHAPES:
        a, b = np.random.standard_normal((m, k)).astype(np.float32), np.random.standard_normal((k, n)).astype(np.float32)
        ma, mb = mx.array(a), mx.array(b)
        mlx_speed = gflops(lambda: mx.eval(ma @ mb), m, k, n)
        numpy_speed = gflops(lambda: a @ b, m, k, n)
        ratios.append(mlx_speed / numpy_speed)
        print(f"{f'{m} x {k} x {n}':>20} {mlx_speed:12.1f} {numpy_speed:14.1f} {ratios[-1]:7.2f}")
    geometric_mean = float(np.exp(np.mean(np.log(ratios))))
    print(f"MLX / numpy, geometric mean: {geometric_mean:.2f} (goal: at least 0.80)")


if __name__ == "__main__":
    main()
