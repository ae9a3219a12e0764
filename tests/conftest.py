"""Shared fixtures: tiny model directories (Llama/Qwen2, float/quantized) and the embedded model."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mipo_mlx  # noqa: E402,F401  (loads the fast BLAS before mlx is imported)
from tiny_models import save_tiny_model  # noqa: E402

TINY_VARIANTS = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """{(arch, quantized): mlx-lm model directory} for every tiny variant."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        (arch, quantized): save_tiny_model(root / f"{arch}-{'q4' if quantized else 'f32'}", arch, quantized)
        for arch, quantized in TINY_VARIANTS
    }


@pytest.fixture(params=TINY_VARIANTS, ids=[f"{a}-{'q4' if q else 'f32'}" for a, q in TINY_VARIANTS])
def tiny_model_dir(request, tiny_model_dirs) -> Path:
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct as the recipes load it (float32 on the CPU)."""
    from mipo_mlx.loading import load_model

    return load_model("smollm2-135m")
