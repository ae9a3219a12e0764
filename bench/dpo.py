"""Tokens/s and peak memory of our DPO step next to mlx-lm-lora's DPO trainer: same model, pairs and batch.

    pip install --no-deps --target /tmp/mlx-lm-lora mlx-lm-lora==5.10.2   # outside our venv; its DPO
    python bench/dpo.py --mlx-lm-lora /tmp/mlx-lm-lora                     # trainer needs only mlx, mlx-lm, tqdm
    python bench/dpo.py --mlx-lm-lora /tmp/mlx-lm-lora --pairs runs/quickstart/pairs.jsonl --batch-size 4

Both train the same LoRA (the recipe's defaults) with sigmoid DPO, beta 0.1 and AdamW on
the same token ids. mlx-lm-lora loads a second copy of the model as the reference and runs
it on every step; ours reads reference log-probs from the pairs (scored once, before the
clock starts, when the pairs have none). Tokens are the non-padding tokens of both
sequences of each pair (prompt and answer), counted the same way for both; the first
steps (compilation) are not timed. Goal: at least 1.5x its tokens/s, at most 0.6x its
peak memory.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import mipo_mlx  # noqa: F401  (before mlx: loads the fast BLAS)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mipo_mlx.data import read_prompts
from mipo_mlx.loading import load_model
from mipo_mlx.lora import apply_lora
from mipo_mlx.pipeline import open_run
from mipo_mlx.recipe import LoraConfig, parse_recipe
from mipo_mlx.trainer import Example, Trainer, build_examples, read_pairs

MAX_SEQ_LENGTH = 1024


def bundled_pairs(count: int) -> list[dict]:
    """Pairs on the bundled personalization prompts; the answers are other profiles' texts (length is what counts)."""
    records = read_prompts("bundled:personalization/train")[: count + 1]
    return [
        {"prompt": r.messages(), "chosen": r.context, "rejected": records[(i + 1) % len(records)].context}
        for i, r in enumerate(records[:count])
    ]


def tokenized(args, pairs: list[dict]):
    """Token ids and reference log-probs of the pairs (scored once here when missing), for both trainers."""
    loaded = load_model(args.model)
    apply_lora(loaded.model, LoraConfig())
    return build_examples(pairs, loaded.model, loaded.tokenizer, MAX_SEQ_LENGTH)


def sequence_tokens(mask: mx.array) -> int:
    """Non-padding tokens of mlx-lm-lora's rows: each answer mask ends where its sequence ends."""
    mask = np.array(mask)  # (B, T)
    return int((mask.shape[1] - np.argmax(mask[:, ::-1] > 0, axis=1)).sum())


def fresh_memory() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def bench_ours(args, examples: list[Example]) -> tuple[float, float]:
    fresh_memory()
    loaded = load_model(args.model)
    apply_lora(loaded.model, LoraConfig())
    with tempfile.TemporaryDirectory() as directory:
        recipe = parse_recipe(f"model: {{path: {args.model}}}\noutput_dir: {directory}\nrun_name: bench\n", "bench.yaml",
                              [f"training.batch_size={args.batch_size}", "training.epochs=1000", "training.warmup_ratio=0"])
        run = open_run(recipe, resume=False)
        trainer = Trainer(run, loaded.model, loaded.tokenizer, examples, [], provenance={})
        loaded.model.train()
        for _ in range(args.warmup):
            trainer.train_step()
        start, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            tokens += trainer.train_step()["tokens"]
        seconds = time.perf_counter() - start
        run.events.close()
    return tokens / seconds, mx.get_peak_memory() / 1e9


def bench_mlx_lm_lora(args, examples: list[Example]) -> tuple[float, float]:
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora.trainer import dpo_trainer

    fresh_memory()
    loaded = load_model(args.model)
    reference = load_model(args.model).model.freeze()  # what mlx-lm-lora's train.py does: a second copy
    apply_lora(loaded.model, LoraConfig())
    dataset = [{"chosen": e.chosen[0], "rejected": e.rejected[0],
                "chosen_prompt_length": e.chosen[1], "rejected_prompt_length": e.rejected[1]} for e in examples]

    tokens_per_step, report_times = [], []
    real_batches = dpo_trainer.iterate_dpo_batches

    def counted_batches(*a, **k):
        for chosen, rejected, chosen_mask, rejected_mask in real_batches(*a, **k):
            tokens_per_step.append(sequence_tokens(chosen_mask) + sequence_tokens(rejected_mask))
            yield chosen, rejected, chosen_mask, rejected_mask

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            report_times.append(time.perf_counter())

    iters = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as directory:
        training = dpo_trainer.DPOTrainingArgs(
            batch_size=args.batch_size, iters=iters, steps_per_report=1, steps_per_save=iters + 1,
            adapter_file=str(Path(directory) / "adapters.safetensors"), max_seq_length=MAX_SEQ_LENGTH,
        )
        info = mx.device_info()
        # The CPU backend reports no GPU working set; their trainer reads one for mx.set_wired_limit.
        info.setdefault("max_recommended_working_set_size", 0)
        with mock.patch.object(dpo_trainer, "iterate_dpo_batches", counted_batches), \
                mock.patch.object(mx, "device_info", lambda: info):
            dpo_trainer.train_dpo(loaded.model, reference, optim.AdamW(learning_rate=1e-5), dataset,
                                  args=training, training_callback=Clock(), loss_type="sigmoid")
    timed = slice(args.warmup, iters)
    seconds = report_times[iters - 1] - report_times[args.warmup - 1]
    return sum(tokens_per_step[timed]) / seconds, mx.get_peak_memory() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="Any model mipo-mlx loads (default: the embedded one).")
    parser.add_argument("--pairs", help="A pairs.jsonl (default: pairs built from the bundled personalization prompts).")
    parser.add_argument("--count", type=int, default=32, help="Pairs to build when --pairs is not given.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (compilation).")
    parser.add_argument("--mlx-lm-lora", help="Folder holding the mlx_lm_lora package, if not installed here.")
    args = parser.parse_args()
    if args.mlx_lm_lora:
        sys.path.append(args.mlx_lm_lora)  # after our site-packages: it must not shadow our mlx or mlx-lm
    pairs = read_pairs(Path(args.pairs)) if args.pairs else bundled_pairs(args.count)

    examples = tokenized(args, pairs)
    ours = bench_ours(args, examples)
    theirs = bench_mlx_lm_lora(args, examples)
    print(f"model {args.model}, {len(examples)} pairs, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    print(f"mipo-mlx DPO step:      {ours[0]:8.1f} tok/s   peak memory {ours[1]:.2f} GB")
    print(f"mlx-lm-lora train_dpo:  {theirs[0]:8.1f} tok/s   peak memory {theirs[1]:.2f} GB")
    print(f"speed {ours[0] / theirs[0]:.2f}x (goal: at least 1.5x), memory {ours[1] / theirs[1]:.2f}x (goal: at most 0.6x)")


if __name__ == "__main__":
    main()
