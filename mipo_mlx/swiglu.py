"""The SwiGLU of mlx-lm's Llama and Qwen MLPs, swapped for the job at hand while a block runs.

    with lean_swiglu(model): loss, grads = value_and_grad(...)   # training: keeps less for the backward
    with host_swiglu(model): logits = model(tokens)              # a forward only: faster on the CPU

mlx-lm's MLP calls the `swiglu` of its model's module (mlx_lm.models.llama, .qwen2, ...);
each context manager sets that name for the block and puts back what was there (MLX work
runs on one thread here: the CLI's, or the TUI's generation worker). A model whose module
has no mlx-lm swiglu there is left alone.
"""

import contextlib
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import activations


@mx.custom_function
def _lean_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return nn.silu(gate) * x


@_lean_swiglu.vjp
def _lean_swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    # Not mx.sigmoid: mx.compile would merge it with the forward's and keep that one alive.
    sigmoid = 1 / (1 + mx.exp(-gate))
    return cotangent * x * sigmoid * (1 + gate * (1 - sigmoid)), cotangent * gate * sigmoid


def _host_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x computed by numpy: (..., intermediate) float32 in, the same out."""
    if gate.dtype != mx.float32 or x.dtype != mx.float32:
        return activations.swiglu(gate, x)
    g, u = np.asarray(gate), np.asarray(x)  # evaluates them; on the CPU backend a view, no copy
    out = np.negative(g)
    with np.errstate(over="ignore"):  # exp(-g) is inf for g < -88: silu is then -0, as MLX's
        np.exp(out, out=out)
    out += 1
    np.divide(g, out, out=out)
    out *= u
    return mx.array(out)


_SWAPS = (activations.swiglu, _lean_swiglu, _host_swiglu)


@contextlib.contextmanager
def _swapped(model: nn.Module, swiglu):
    module = sys.modules[type(model).__module__]
    before = getattr(module, "swiglu", None)
    if swiglu is None or before not in _SWAPS:
        yield
        return
    module.swiglu = swiglu
    try:
        yield
    finally:
        module.swiglu = before


def lean_swiglu(model: nn.Module):
    """mlx-lm's swiglu with a backward that recomputes the sigmoid.

    Autodiff keeps sigmoid(gate) and silu(gate) for the backward: two (rows, T, intermediate)
    arrays per layer, the largest activations of a LoRA step. Same values, less memory.
    """
    return _swapped(model, _lean_swiglu)


def host_swiglu(model: nn.Module):
    """On MLX's CPU backend, the forward's swiglu in numpy; elsewhere mlx-lm's. Never under a gradient or mx.compile.

    MLX's CPU wheel is built for baseline x86-64: its exp is scalar code (~10 ns a value),
    where numpy's dispatches to the machine's SIMD (~0.6 ns a value with AVX-512). On the
    embedded model that is ~100 against ~11 ms a layer for a prefill of 64 prompts (64, 69,
    1536) and ~1.4 against ~0.06 ms a layer for a decode step at batch 64: ~20% more tokens/s
    when sampling (bench/sampling.py). The values are mlx-lm's up to float rounding
    (4e-7 relative). numpy reads the evaluated arrays, so this is for a plain forward only:
    under mx.grad the MLP would be a constant, and mx.compile cannot evaluate.
    """
    return _swapped(model, _host_swiglu if mx.default_device() == mx.cpu else None)
