"""Tokens/s of our batched sampler next to a loop of mlx_lm.generate, same prompts and sampler.

    python bench/sampling.py [--prompts 16] [--max-tokens 64] [--batch-size 16]

Both run the embedded model as the recipes load it (float32 on the CPU backend) on the
bundled personalization prompts, with temperature 0.7 and top_p 0.9 (goal: at least 4x).
"""

import argparse
import time

import mipo_mlx  # noqa: F401  (before mlx: loads the fast BLAS)
import mlx.core as mx
from mlx_lm import generate

from mipo_mlx.chat import encode_prompt
from mipo_mlx.data import read_prompts
from mipo_mlx.generation import SamplerSettings, generate_answers
from mipo_mlx.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    records = read_prompts("bundled:personalization/train")[: args.prompts]
    prompts = [encode_prompt(loaded.tokenizer, r.messages()) for r in records]
    settings = SamplerSettings(temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)

    start = time.perf_counter()
    answers = generate_answers(loaded.model, loaded.tokenizer, prompts, settings, seed=0, batch_size=args.batch_size)
    batched_tokens, batched_seconds = sum(len(a.token_ids) for a in answers), time.perf_counter() - start

    mx.random.seed(0)
    start, loop_tokens = time.perf_counter(), 0
    for prompt in prompts:
        text = generate(loaded.model, loaded.tokenizer, prompt, max_tokens=args.max_tokens, sampler=settings.sampler())
        loop_tokens += len(loaded.tokenizer.encode(text, add_special_tokens=False))
    loop_seconds = time.perf_counter() - start

    ours, theirs = batched_tokens / batched_seconds, loop_tokens / loop_seconds
    print(f"prompts {len(prompts)}, max tokens {args.max_tokens}, batch {args.batch_size}")
    print(f"mipo-mlx batched sampler: {batched_tokens} tokens in {batched_seconds:.1f} s = {ours:.1f} tok/s")
    print(f"mlx_lm.generate loop:     {loop_tokens} tokens in {loop_seconds:.1f} s = {theirs:.1f} tok/s")
    print(f"speed-up: {ours / theirs:.2f}x (goal: at least 4x)")


if __name__ == "__main__":
    main()
