"""Batched answer generation for pair sampling, evaluation and the TUI: continuous batching, and
answers that do not depend on the batch they were generated in.

    settings = SamplerSettings(temperature=0.7, top_p=0.9, max_tokens=96)
    answers = generate_answers(model, tokenizer, [prompt_ids, ...], settings, seed=0, keys=["p-1", ...])
    for index, answer in answer_stream(model, tokenizer, prompts, settings, seed=0, keys=keys): ...  # as they end
    for text in stream_answer(model, tokenizer, prompt_ids, settings, seed=0): ...  # one answer, piece by piece
    batch = auto_batch_size(model, longest_prompt, settings.max_tokens)

Each answer's sampling noise is a function of (seed, its key, token position) alone: one
uniform number per row and step (counter-based, `uniforms`), turned into a token by
inverting the cumulative distribution of mlx-lm's sampler (top_p on the untempered
distribution, then temperature). And a row's arithmetic does not depend on its batch: every
prompt's tokens start at column 0 of its own cache row (no left padding), matmuls are per
row, and attention over columns past a row's position adds exact zeros. So the same seed
gives the same answers at batch 1 or 64, in any chunk, on resume, and on any number of ranks
(tests/test_generation.py checks it on the tiny models).

Why not mlx-lm's BatchGenerator, which this replaces (we keep mlx-lm's model classes; only
the cache objects and the loop are ours):
- its prefill runs the vocabulary head on every prompt position, of which only the last is
  used (on the embedded model the head is a fifth of a token's work); here the head runs on
  each prompt's last position only;
- the prompts' shared beginning (the chat template's system turn) is computed once, not
  once per prompt;
- a finished row is refilled from the queue at once (continuous batching across the whole
  job), so rows never idle while prompts wait, and the batch can be as large as memory
  allows (`auto_batch_size`): on a CPU a decode step at batch 64 gives ~3x the tokens/s of
  batch 16, per-op overhead on small matrices being what limits batch 16;
- its sampler state is one stream for the whole batch, so an answer depends on its batch.
The sampler runs on the host in numpy (draw_tokens says why) and sorts only the tokens
that can be in the nucleus; on MLX's CPU backend the MLPs' swiglu runs in numpy too
(swiglu.host_swiglu: MLX's exp is scalar code there). The step is not mx.compile'd: the
caches would go in and out of a compiled function as explicit state, and a cache the caller
still holds cannot be written in place, so each step would copy every layer's cache to
write one column; at the batches used here the step's time is in its matmuls and MLP
activations, not in op dispatch (measured on the CPU: ~18 us an op, ~1000 ops a step,
~20 ms of a ~300 ms batch-64 step).
"""

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mipo_mlx.scoring import plain_head
from mipo_mlx.seeds import derived_seed
from mipo_mlx.swiglu import host_swiglu

# The auto batch: at most this many rows (on a 2-core CPU batch 128 gave only ~1.1x the
# tokens/s of 64), and its caches at most this share of the memory left beside the weights.
AUTO_BATCH_MAX = 64
AUTO_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float
    top_p: float
    max_tokens: int


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens)


def uniforms(row_seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One number in [0, 1) per row, a function of (row seed, position) alone: (B,) float32.

    splitmix64's finalizer over seed and position; 24 bits, exactly representable in float32.
    """
    x = row_seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + positions.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return ((x >> np.uint64(40)).astype(np.float64) / 2**24).astype(np.float32)


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """Index drawn from unnormalized weights (K,) with a uniform u."""
    cdf = np.cumsum(weights, dtype=np.float64)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(weights) - 1)


def draw_tokens(logits: mx.array, u: np.ndarray, settings: SamplerSettings) -> np.ndarray:
    """Tokens (B,) from last-position logits (B, V) and one uniform per row (B,), by the settings' sampler.

    mlx-lm's sampler: top_p on the untempered distribution (a token is kept while the mass
    of the more likely ones is under top_p), then a temperature draw among the kept. On the
    host in numpy, row by row: MLX's CPU exp over a (64, 49152) batch takes longer than the
    rest of a decode step's sampling together, numpy's is ~20x faster, and the logits
    must come to the host anyway to see which rows stopped.
    """
    if settings.temperature == 0:
        return np.array(mx.argmax(logits, axis=-1))
    scaled = np.array(logits.astype(mx.float32))
    scaled -= scaled.max(axis=-1, keepdims=True)  # (B, V): 0 for each row's most likely token
    mass = np.exp(scaled)  # unnormalized probabilities
    tokens = np.empty(len(scaled), dtype=np.int64)
    for row in range(len(scaled)):
        if settings.top_p >= 1.0:  # mlx-lm treats top_p 1.0 as off: the whole vocabulary
            kept = np.arange(scaled.shape[1])
        else:
            # Tokens under this share of the row's mass hold at most 1 - top_p of it all
            # together, so the nucleus lies among the others: sort only those.
            total = mass[row].sum(dtype=np.float64)
            candidates = np.flatnonzero(mass[row] >= (1.0 - settings.top_p) * total / len(mass[row]))
            by_rank = candidates[np.argsort(-mass[row, candidates], kind="stable")]
            above = np.cumsum(mass[row, by_rank], dtype=np.float64) - mass[row, by_rank]
            # Kept tokens in vocabulary order, not by rank: two nearly equally likely tokens
            # whose ranks a rounding difference swaps still give the same draw.
            kept = np.sort(by_rank[above < settings.top_p * total])
        weights = np.exp(scaled[row, kept] * (1.0 / settings.temperature))
        tokens[row] = kept[_inverse_cdf(weights, float(u[row]))]
    return tokens


class RowsCache:
    """One layer's keys and values for a batch of rows, each row's tokens from column 0, as mlx-lm's attention uses a cache.

    Prefill (`offset` an int): every row writes the same columns, offset .. offset + N.
    Decode (`offset` a (B,) array): each row writes one token at its own column. Attention
    sees the first `width` columns, up to the batch's furthest position (the step is not
    compiled, so a width that grows with every token costs no recompilation, and no column
    past it is read); columns past a row's position are masked, which adds exact zeros to
    its sums. The arrays are made at the first write, when the layer's key shape is known,
    with the job's shared prompt prefix (`prefix`: keys and values, (1, H_kv, P, D)) in
    their first columns.
    """

    def __init__(self, rows: int, capacity: int, offset, width: int, prefix=None):
        self.rows, self.capacity, self.prefix = rows, capacity, prefix
        self.keys = self.values = None  # (B, H_kv, capacity, D)
        self.offset, self.width = offset, width

    def _allocate(self, like: mx.array) -> None:
        shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
        self.keys, self.values = mx.zeros(shape, like.dtype), mx.zeros(shape, like.dtype)
        if self.prefix is not None:
            prefix_keys, prefix_values = self.prefix
            self.keys[:, :, : prefix_keys.shape[2]] = prefix_keys
            self.values[:, :, : prefix_values.shape[2]] = prefix_values

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self._allocate(keys)
        if isinstance(self.offset, int):
            end = self.offset + keys.shape[2]
            self.keys[:, :, self.offset : end] = keys
            self.values[:, :, self.offset : end] = values
        else:
            columns = mx.broadcast_to(self.offset[:, None, None, None], keys.shape)  # (B, H_kv, 1, D)
            self.keys = mx.put_along_axis(self.keys, columns, keys, axis=2)
            self.values = mx.put_along_axis(self.values, columns, values, axis=2)
        return self.keys[:, :, : self.width], self.values[:, :, : self.width]

    def make_mask(self, n: int, **kwargs) -> mx.array:
        columns = mx.arange(self.width)
        if isinstance(self.offset, int):
            return columns[None] <= (self.offset + mx.arange(n))[:, None]  # (N, width): causal
        return (columns[None] <= self.offset[:, None])[:, None, None, :]  # (B, 1, 1, width)


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The tokens every prompt begins with, leaving each prompt at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return prompts[0][:n]


@dataclass
class _Row:
    index: int  # the prompt's position in the job
    length: int  # prompt tokens
    seed: int
    tokens: list[int] = field(default_factory=list)  # sampled so far; the last one not yet fed


class BatchDecoder:
    """Answers to a job of prompts, `batch_size` rows at a time, each row refilled from the queue when its answer ends."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], settings: SamplerSettings, seed: int,
                 keys: list, batch_size: int):
        self.model, self.tokenizer, self.settings, self.prompts = model, tokenizer, settings, prompts
        self.generated_tokens = 0
        self.seeds = [derived_seed(seed, "answer", key) for key in keys]
        self.stop = set(tokenizer.eos_token_ids)
        self.batch_size = max(1, min(batch_size, len(prompts)))
        self.capacity = max((len(p) for p in prompts), default=0) + settings.max_tokens
        self.head = plain_head(model)
        self.prefix = shared_prefix(prompts) if prompts else []
        self.prefix_kv = None
        if self.prefix:
            caches = self._caches(1, 0, len(self.prefix))
            with host_swiglu(self.model):
                self.model.model(mx.array(self.prefix)[None], cache=caches)
                self.prefix_kv = [(c.keys[:, :, : len(self.prefix)], c.values[:, :, : len(self.prefix)])
                                  for c in caches]
                mx.eval(self.prefix_kv)

    def _caches(self, rows: int, offset, end: int) -> list[RowsCache]:
        prefixes = self.prefix_kv or [None] * len(self.model.layers)
        return [RowsCache(rows, self.capacity, offset, end, prefix) for prefix in prefixes]

    def _forward(self, inputs: mx.array, caches: list[RowsCache], last: mx.array) -> mx.array:
        """Logits (B, V) at column `last` (B,) of each row's new tokens."""
        rows = mx.arange(inputs.shape[0])
        with host_swiglu(self.model):  # evaluates each layer's MLP input: the layers up to it run here
            if self.head is None:
                return self.model(inputs, cache=caches)[rows, last]
            return self.head(self.model.model(inputs, cache=caches)[rows, last])  # the head on one position a row

    def _prefill(self, indices: list[int]) -> tuple[list[RowsCache], mx.array]:
        """Caches of new rows and their logits at each prompt's last token (G, V)."""
        start = len(self.prefix)
        suffixes = [self.prompts[i][start:] for i in indices]
        longest = max(len(s) for s in suffixes)
        inputs = np.zeros((len(indices), longest), dtype=np.int32)  # right-padded: no real token attends to padding
        for row, ids in enumerate(suffixes):
            inputs[row, : len(ids)] = ids
        caches = self._caches(len(indices), start, start + longest)
        return caches, self._forward(mx.array(inputs), caches, mx.array([len(s) - 1 for s in suffixes]))

    def _draw(self, logits: mx.array, rows: list) -> np.ndarray:
        seeds = np.array([row.seed if row else 0 for row in rows], dtype=np.uint64)
        positions = np.array([len(row.tokens) if row else 0 for row in rows])
        return draw_tokens(logits, uniforms(seeds, positions), self.settings)

    def answers(self) -> Iterator[tuple[int, Answer]]:
        """(prompt index, answer) for each prompt, as each answer ends."""
        tokens: dict[int, list[int]] = {}
        for report in self.steps():
            for index, token, finish in report:
                if token is not None:
                    tokens.setdefault(index, []).append(token)
                if finish is not None:
                    ids = tokens.pop(index, [])
                    yield index, Answer(self.tokenizer.decode(ids), ids, finish)

    def steps(self) -> Iterator[list[tuple[int, int | None, str | None]]]:
        """Per step, each live row's (prompt index, its new token or None at a stop, finish reason or None)."""
        if not self.prompts:
            return
        queue = deque(range(len(self.prompts)))
        rows: list[_Row | None] = []
        caches: list[RowsCache] = []
        tokens = None  # (B,) numpy: each row's last sampled token
        while True:
            free = [slot for slot, row in enumerate(rows) if row is None] if rows else list(range(self.batch_size))
            if queue and free:
                slots = free[: len(queue)]
                indices = [queue.popleft() for _ in slots]
                new_caches, logits = self._prefill(indices)
                new_rows = [_Row(i, len(self.prompts[i]), self.seeds[i]) for i in indices]
                new_tokens = self._draw(logits, new_rows)
                if not rows:
                    rows, caches, tokens = new_rows, new_caches, new_tokens
                else:
                    at = mx.array(slots)
                    for cache, new in zip(caches, new_caches):
                        cache.keys[at], cache.values[at] = new.keys, new.values
                    tokens[slots] = new_tokens
                    for slot, row in zip(slots, new_rows):
                        rows[slot] = row
            elif free and len(free) >= len(rows) - len(free):
                # Nothing left to start and half the rows idle: drop them (at most log2(B) copies of the caches).
                live = [slot for slot, row in enumerate(rows) if row is not None]
                keep = mx.array(live)
                for cache in caches:
                    cache.keys, cache.values = cache.keys[keep], cache.values[keep]
                rows, tokens = [rows[slot] for slot in live], tokens[live]
            # The sampled tokens to the host: which rows stopped, which reached max_tokens.
            report, sampled = [], tokens.tolist()
            for slot, row in enumerate(rows):
                if row is None:
                    continue
                token = sampled[slot]
                row.tokens.append(token)
                if token in self.stop:
                    report.append((row.index, None, "stop"))
                elif len(row.tokens) >= self.settings.max_tokens:
                    report.append((row.index, token, "length"))
                else:
                    report.append((row.index, token, None))
                    continue
                rows[slot] = None
            self.generated_tokens += len(report)
            yield report
            if all(row is None for row in rows):
                if not queue:
                    return
                continue
            # One decode step: each row feeds its last token at its own column (idle rows at column 0, ignored).
            columns = [row.length + len(row.tokens) - 1 if row else 0 for row in rows]
            for cache in caches:
                cache.offset, cache.width = mx.array(columns), max(columns) + 1
            logits = self._forward(mx.array(tokens)[:, None], caches, mx.zeros(len(rows), dtype=mx.int32))
            tokens = self._draw(logits, rows)


def answer_stream(model, tokenizer, prompts: list[list[int]], settings: SamplerSettings, seed: int, keys: list,
                  batch_size: int) -> Iterator[tuple[int, Answer]]:
    """(prompt index, answer) for each prompt, as each answer ends; the answer depends on (seed, key) alone."""
    yield from BatchDecoder(model, tokenizer, prompts, settings, seed, keys, batch_size).answers()


def generate_answers(model, tokenizer, prompts: list[list[int]], settings: SamplerSettings, seed: int,
                     keys: list | None = None, batch_size: int | None = None) -> list[Answer]:
    """Answers to `prompts` (token ids), in order. Keys name each prompt's noise (default: its position)."""
    keys = list(range(len(prompts))) if keys is None else keys
    if batch_size is None:
        batch_size = auto_batch_size(model, max((len(p) for p in prompts), default=1), settings.max_tokens)
    answers = dict(answer_stream(model, tokenizer, prompts, settings, seed, keys, batch_size))
    return [answers[i] for i in range(len(prompts))]


def stream_answer(model, tokenizer, prompt_ids: list[int], settings: SamplerSettings, seed: int) -> Iterator[str]:
    """Text pieces of one answer as they are generated (the TUI's live answers)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for report in BatchDecoder(model, tokenizer, [prompt_ids], settings, seed, ["stream"], 1).steps():
        for _, token, finish in report:
            if token is not None:
                detokenizer.add_token(token)
            if finish is not None:
                detokenizer.finalize()
        piece = detokenizer.last_segment  # the text since the last call
        if piece:
            yield piece


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes in all layers' caches, in the model's compute dtype."""
    args = model.args
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    embedding = model.model.embed_tokens
    dtype = getattr(embedding, "scales", embedding.weight).dtype  # a quantized table computes in its scales' dtype
    return 2 * len(model.layers) * kv_heads * head_dim * dtype.size


def memory_bytes() -> int:
    """The memory generation may plan with: the GPU's recommended working set, else the machine's memory."""
    info = mx.device_info()
    return int(info.get("max_recommended_working_set_size") or info.get("memory_size")
               or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_batch_size(model, longest_prompt: int, max_tokens: int) -> int:
    """Rows to generate together: AUTO_BATCH_MAX, or fewer where their caches and logits would not fit the budget."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    budget = (memory_bytes() - weights) * AUTO_MEMORY_SHARE
    vocab = model.model.embed_tokens.weight.shape[0]
    per_row = kv_bytes_per_token(model) * (longest_prompt + max_tokens) + 4 * vocab * 8
    return int(max(1, min(AUTO_BATCH_MAX, budget // per_row)))
