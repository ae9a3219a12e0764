"""Tokens/s of our batched sampler next to a loop of mlx_lm.generate, same prompts and sampler, and the machine's limit.

    python bench/sampling.py [--prompts 64] [--loop-prompts 16] [--max-tokens 64] [--batch-size N]

Both run the embedded model as the recipes load it (float32 on the CPU backend) on the
bundled personalization prompts, temperature 0.7 and top_p 0.9 (mlx-lm's make_sampler for
the loop). Ours answers all `--prompts` in one job (batch: `--batch-size`, else what
generation.auto_batch_size chooses, as `mipo-mlx sample` does); the loop answers the first
`--loop-prompts` one at a time (its tokens/s does not depend on how many). Goal: at least 8x.

The roofline is measured in the same run: this machine's float32 matmul rate through MLX
(GFLOP/s) and its memory bandwidth (GB/s, reading a 1 GB array). The job's least possible
time is, for its prefill, the FLOPs at that rate, and for each decode step the larger of
its FLOPs at that rate and reading the weights once at that bandwidth; the fraction printed
is that least time over the measured one.

Measured at 932aee6 (the MLP's swiglu in numpy on the CPU: swiglu.host_swiglu), on a quiet VM
of this kind (Linux x86_64, 2 vCPUs of an AMD EPYC with AVX-512, OpenBLAS, mlx 0.32.4; the
defaults: 64 prompts, 16 in the loop), two runs: ours 3656 tokens in 22.1 and 19.9 s = 165.4
and 183.9 tok/s at batch 64, 36% of the limit both times (matmul 229 and 262 GFLOP/s, memory
8.3 and 8.5 GB/s); the loop 17.5 and 18.5 tok/s: 9.46x and 9.94x. The same answers as before
it, token for token. Before it (e10526e, the
same VM kind): 149.4 against 19.4 tok/s, 7.71x; side by side in one process, quiet, the
swiglu in numpy against MLX's: 178.6 and 165.0 against 147.3 and 140.3 tok/s. On an earlier
VM of this kind (matmul ~100 GFLOP/s, no AVX-512; other jobs running, load 5-7,
--loop-prompts 8): 54.5 against 5.6 tok/s, 9.74x.

Where the time went before the numpy swiglu (profiled quiet on the AVX-512 VM): the prefill
of the 64 prompts took ~9 s of the 24.5 (4416 tokens, ~0.9 TFLOP: ~3.7 s at the matmul
rate). MLX's CPU wheel is built for baseline x86-64, so its exp is scalar code calling
libm's fmaf (~10-13 ns a value, numpy's ~0.6 with AVX-512): the SwiGLU's sigmoid cost ~100
ms a layer on the prefill's (64, 69, 1536) activations, ~2.8 s in all (numpy: ~11 ms a
layer), and ~1.4 ms a layer in a decode step at batch 64 (numpy: 0.06). A decode step at
batch 64 took ~230 ms: the matmuls ~100 ms, the attention ~2.1 ms a layer (64 rows x 3 KV
heads of small matmuls, ~65 ms in all), the swiglu ~40 ms, the head ~15 ms, the sampler on
the host ~18 ms. The sampler runs in numpy because MLX's exp over the (64, 49152) logits
would take longer than the rest of sampling.
Tried and not kept (each side by side, quiet): the attention's softmax in numpy as well
(scores and the weighted sum in MLX): +3% and +7% tok/s, the same answers; its time is in
the small matmuls, not the exp. An exp of MLX elementwise ops under mx.compile (the fused
kernels are scalar too) took the prefill's SwiGLU from 92 to 77 ms a layer. A layout that
gives each row one matmul over its 3 KV heads made the decode attention slower (3.6 against
2.1 ms a layer).
"""

import argparse
import time

import mipo_mlx  # noqa: F401  (before mlx: loads the fast BLAS)
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.sample_utils import make_sampler

from mipo_mlx.backend import describe_backend
from mipo_mlx.chat import encode_prompt
from mipo_mlx.data import read_prompts
from mipo_mlx.generation import BatchDecoder, SamplerSettings, auto_batch_size
from mipo_mlx.loading import load_model


def matmul_gflops(n: int = 1536, repeats: int = 10) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def bandwidth_gbs(gigabytes: float = 1.0, repeats: int = 5) -> float:
    x = mx.ones((int(gigabytes * 2**30) // 4,), dtype=mx.float32)
    mx.eval(x.sum())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(x.sum())
    return x.nbytes * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--loop-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    records = read_prompts("bundled:personalization/train")[: args.prompts]
    prompts = [encode_prompt(tokenizer, r.messages()) for r in records]
    settings = SamplerSettings(temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
    batch = args.batch_size or auto_batch_size(model, max(map(len, prompts)), args.max_tokens)

    start = time.perf_counter()
    decoder = BatchDecoder(model, tokenizer, prompts, settings, 0, list(range(len(prompts))), batch)
    steps = [len(report) for report in decoder.steps()]  # live rows per step
    ours_seconds, ours_tokens = time.perf_counter() - start, sum(steps)

    start, loop_tokens = time.perf_counter(), 0
    for prompt in prompts[: args.loop_prompts]:
        text = generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=make_sampler(0.7, 0.9))
        loop_tokens += len(tokenizer.encode(text, add_special_tokens=False))
    loop_seconds = time.perf_counter() - start

    # FLOPs: 2 per weight per token (the head once per prompt in prefill), attention aside.
    weights = dict(tree_flatten(model.parameters()))
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).size
    body = sum(v.size for k, v in weights.items() if k.startswith("model.layers."))
    weight_bytes = sum(v.nbytes for v in weights.values())  # each decode step reads every weight once
    prefill_flops = 2 * body * sum(len(p) - len(decoder.prefix) for p in prompts) + 2 * head * len(prompts)
    gflops, gbs = matmul_gflops(), bandwidth_gbs()
    least = prefill_flops / (gflops * 1e9) + sum(
        max(2 * (body + head) * rows / (gflops * 1e9), weight_bytes / (gbs * 1e9)) for rows in steps[1:])

    ours, theirs = ours_tokens / ours_seconds, loop_tokens / loop_seconds
    backend = describe_backend()
    print(f"{backend['backend']}, {backend['blas']}, mlx {backend['mlx']}: matmul {gflops:.0f} GFLOP/s, "
          f"memory {gbs:.1f} GB/s")
    print(f"prompts {len(prompts)} (loop: {args.loop_prompts}), max tokens {args.max_tokens}, batch {batch}")
    print(f"mipo-mlx batched sampler: {ours_tokens} tokens in {ours_seconds:.1f} s = {ours:.1f} tok/s "
          f"({least / ours_seconds:.0%} of the machine's limit: at least {least:.1f} s for this job)")
    print(f"mlx_lm.generate loop:     {loop_tokens} tokens in {loop_seconds:.1f} s = {theirs:.1f} tok/s")
    print(f"speed-up: {ours / theirs:.2f}x (goal: at least 8x)")


if __name__ == "__main__":
    main()
