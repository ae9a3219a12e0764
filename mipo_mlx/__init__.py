"""mipo-mlx: MIPO preference optimization for small quantized models, in MLX.

Importing the package first gives MLX's Linux CPU backend an optimized BLAS (backend.py),
which must happen before anything imports mlx.
"""

from mipo_mlx.backend import preload_fast_blas

preload_fast_blas()
__version__ = "0.1.0"
