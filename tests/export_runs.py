"""Tiny finished runs for the export tests: a base model, a trained-looking adapter, metrics and answers.

    run_dir = make_run(tmp_path, "llama")                        # float mlx-lm directory as the base
    run_dir = make_run(tmp_path, "llama", quantized=True)        # 4-bit base
    run_dir = make_run(tmp_path, "qwen2", base="gguf")           # a llama.cpp-style GGUF file as the base
    run_dir = make_run(tmp_path, "qwen2", base="q4_k_m")         # a GGUF mixing types as a Q4_K_M file does
    reference = adapted_logprobs(run_dir)                        # (B,) what every export must reproduce

The adapter is mlx-lm's LoRA on the recipe's modules with random, non-zero lora_b, saved by
mipo_mlx.lora.save_adapter exactly as the trainer saves it.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gguf_fixtures import write_tiny_gguf
from mipo_mlx.events import EventLog
from mipo_mlx.export import probe_batch
from mipo_mlx.loading import load_model
from mipo_mlx.lora import adapter_config, apply_lora, load_adapter, save_adapter
from mipo_mlx.recipe import Recipe, dump_recipe, parse_recipe
from mipo_mlx.scoring import answer_logprobs
from tiny_models import save_tiny_model

# The types llama.cpp's Q4_K_M of Qwen2.5-Coder-0.5B mixes: Q5_0 (most matrices, the embedding) and these.
Q4_K_M_TYPES = {"mlp.down_proj": "Q6_K", "mlp.up_proj": "Q4_K", "self_attn.v_proj": "Q8_0", "lm_head": "Q8_0"}
PAIRS = [
    ("My cat Luna likes the sofa.", "What is the capital of France?", "The capital of France is Paris.", "Paris."),
    ("I live in Lisbon.", "Write a short poem about the sea.", "The sea, the sun and the sand.", "Hola, gracias."),
]


def make_run(root: Path, arch: str = "llama", quantized: bool = False, base: str = "dir", seed: int = 0,
             rank: int = 4, scale: float = 4.0, num_layers: int = -1, keys: list | None = None) -> Path:
    """A run directory whose adapter, events and compare files look like a finished training run."""
    root = Path(root)
    if base == "gguf":
        model_path, _ = write_tiny_gguf(root / f"{arch}.gguf", arch, "Q4_0" if quantized else "F32", "F32", seed=seed)
    elif base == "q4_k_m":
        model_path, _ = write_tiny_gguf(root / f"{arch}.gguf", arch, "Q5_0", "Q5_0", seed=seed, types=Q4_K_M_TYPES)
    else:
        model_path = save_tiny_model(root / f"{arch}-base", arch, quantized, seed=seed)
    recipe = Recipe()
    recipe.model.path, recipe.output_dir, recipe.run_name = str(model_path), str(root / "runs"), "tiny"
    recipe.lora.rank, recipe.lora.scale, recipe.lora.num_layers = rank, scale, num_layers
    if keys:
        recipe.lora.keys = keys
    run_dir = root / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")

    model = load_model(str(model_path)).model
    apply_lora(model, recipe.lora)
    mx.random.seed(seed + 1)
    # A trained adapter: lora_b moved away from its zero initialization.
    updates = [(name, mx.random.normal(value.shape) * 0.2) for name, value in tree_flatten(model.trainable_parameters())
               if name.endswith("lora_b")]
    model.load_weights(updates, strict=False)
    save_adapter(model, run_dir / "adapters", adapter_config(model, recipe.lora, str(model_path)))

    _write_pairs(run_dir)
    _write_events(run_dir)
    _write_compare(run_dir)
    return run_dir


def _write_pairs(run_dir: Path) -> None:
    lines = []
    for n, (context, question, chosen, rejected) in enumerate(PAIRS):
        pair = {"prompt": [{"role": "system", "content": context}, {"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "mipo": {"id": f"p{n}#0", "prompt_id": f"p{n}"}}
        lines.append(json.dumps(pair) + "\n")
    (run_dir / "pairs.jsonl").write_text("".join(lines), encoding="utf-8")


def _write_events(run_dir: Path) -> None:
    with EventLog(run_dir / "events.jsonl") as log:
        for step in range(1, 9):
            log.emit("metrics", stage="train", split="train", step=step, epoch=0, loss=0.7 / step,
                     **{"rewards/margins": 0.5 * step, "rewards/accuracies": min(1.0, 0.25 * step)})
        log.emit("metrics", stage="train", split="eval", step=8, epoch=0, loss=0.4)


def _write_compare(run_dir: Path) -> None:
    compare = run_dir / "compare"
    compare.mkdir()
    metrics = {"adherence/overall": {"n": 2, "before": 0.25, "before_ci": [0.0, 0.5], "after": 0.75,
                                     "after_ci": [0.5, 1.0], "difference_ci": [0.25, 0.75], "p_value": 0.031},
               "self_bleu": {"n": 2, "before": 0.4, "after": 0.2}}
    (compare / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    row = {"id": "u1-q1", "prompt": [{"role": "system", "content": "Answer in Italian."},
                                     {"role": "user", "content": "What is a simple dessert?"}],
           "base": "Ice cream.", "adapted": "Un gelato, grazie.", "reference": None,
           "checks": {"base": {"language": False}, "adapted": {"language": True}}, "tokens": {"base": 3, "adapted": 5}}
    (compare / "answers.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")


def adapted_logprobs(run_dir: Path, compute: str = "auto") -> np.ndarray:
    """The adapted model's summed answer log-probs on the run's probe batch, as trained."""
    recipe_path = Path(run_dir) / "recipe.yaml"
    recipe = parse_recipe(recipe_path.read_text(encoding="utf-8"), str(recipe_path))
    loaded = load_model(recipe.model.path, compute=compute)
    load_adapter(loaded.model, Path(run_dir) / "adapters")
    return np.array(answer_logprobs(loaded.model, *probe_batch(Path(run_dir), loaded.tokenizer)))


def logprobs_of(model, run_dir: Path, tokenizer) -> np.ndarray:
    return np.array(answer_logprobs(model, *probe_batch(Path(run_dir), tokenizer)))
