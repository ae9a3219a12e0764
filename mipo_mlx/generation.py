"""Batched answer generation with a real sampler, for sampling pairs and for evaluation.

    settings = SamplerSettings(temperature=0.7, top_p=0.9, max_tokens=96)
    answers = generate_answers(model, tokenizer, [prompt_ids, ...], settings, seed=0, batch_size=16)
    answers[0].text, answers[0].finish_reason      # "stop" (end of turn) or "length"
    for delta in stream_answer(model, tokenizer, prompt_ids, settings, seed=0): ...

Generation runs on mlx-lm's BatchGenerator (continuous batching; its default sampler is
greedy, so ours is always passed). Prompts are generated in fixed chunks of `batch_size`,
each with its own seed derived from (seed, chunk index): the same inputs give the same
answers whichever chunks were already done, which is what makes sampling resumable.

The sampler is mlx-lm's nucleus sampling (top_p on the untempered distribution, then a
temperature draw) restricted to the most likely NUCLEUS_CANDIDATES tokens when the
nucleus lies within them, which it nearly always does: mlx-lm sorts the whole vocabulary
at every step, which on the CPU costs more than the batch-16 forward pass itself.
"""

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.sample_utils import make_sampler

from mipo_mlx.seeds import derived_seed


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float
    top_p: float
    max_tokens: int

    def sampler(self):
        """A function from log-probs (B, V) to tokens (B,)."""
        if self.temperature == 0 or self.top_p >= 1.0:
            # mlx-lm treats top_p 1.0 as "off"; temperature 0 is argmax.
            return make_sampler(temp=self.temperature)
        return partial(nucleus_sample, temperature=self.temperature, top_p=self.top_p)


NUCLEUS_CANDIDATES = 1024


def nucleus_sample(logprobs: mx.array, temperature: float, top_p: float) -> mx.array:
    """mlx-lm's top_p + temperature sampling over the top candidates; the full sort only when needed."""
    k = min(NUCLEUS_CANDIDATES, logprobs.shape[-1])
    candidates = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]  # (B, k), unordered
    values = mx.take_along_axis(logprobs, candidates, axis=-1)
    order = mx.argsort(-values, axis=-1)  # (B, k), most likely first
    candidates, values = mx.take_along_axis(candidates, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
    probs = mx.exp(values)
    mass_above = mx.cumsum(probs, axis=-1) - probs  # (B, k) mass of the more likely candidates
    # A token is kept while the mass above it is under top_p (of a total of 1: log-probs are normalized).
    scaled = mx.where(mass_above < top_p, values * (1.0 / temperature), -float("inf"))
    tokens = mx.take_along_axis(candidates, mx.random.categorical(scaled)[:, None], axis=-1)[:, 0]  # (B,)
    wide = [row for row, covered in enumerate((mass_above[:, -1] + probs[:, -1] >= top_p).tolist()) if not covered]
    if wide:  # rows whose nucleus is wider than k tokens: mlx-lm's full sort
        rows = mx.array(wide)
        tokens[rows] = make_sampler(temp=temperature, top_p=top_p)(logprobs[rows]).astype(tokens.dtype)
    return tokens


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def _generate_chunk(model, tokenizer, prompts: list[list[int]], settings: SamplerSettings) -> list[Answer]:
    generator = BatchGenerator(
        model,
        max_tokens=settings.max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=settings.sampler(),
        completion_batch_size=max(len(prompts), 1),
        prefill_batch_size=max(len(prompts), 1),
    )
    uids = generator.insert(prompts, [settings.max_tokens] * len(prompts))
    tokens = {uid: [] for uid in uids}
    finish = {}
    while responses := generator.next_generated():
        for response in responses:
            if response.finish_reason != "stop":
                tokens[response.uid].append(response.token)
            if response.finish_reason is not None:
                finish[response.uid] = response.finish_reason
    generator.close()
    return [
        Answer(text=tokenizer.decode(tokens[uid]), token_ids=tokens[uid], finish_reason=finish.get(uid, "length"))
        for uid in uids
    ]


def generate_answers(
    model, tokenizer, prompts: list[list[int]], settings: SamplerSettings, seed: int, batch_size: int
) -> list[Answer]:
    """Answers to `prompts` (token ids), in order; same seed and chunking give the same answers."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        answers += generate_chunk(model, tokenizer, prompts[start : start + batch_size], settings, seed, start // batch_size)
    return answers


def generate_chunk(model, tokenizer, prompts, settings: SamplerSettings, seed: int, chunk_index: int) -> list[Answer]:
    """One chunk of answers, seeded by (seed, chunk_index) alone."""
    mx.random.seed(derived_seed(seed, "chunk", chunk_index))
    return _generate_chunk(model, tokenizer, prompts, settings)


def stream_answer(model, tokenizer, prompt_ids: list[int], settings: SamplerSettings, seed: int) -> Iterator[str]:
    """Text pieces of one answer as they are generated (for the TUI)."""
    mx.random.seed(derived_seed(seed, "stream"))
    for response in stream_generate(
        model, tokenizer, mx.array(prompt_ids), max_tokens=settings.max_tokens, sampler=settings.sampler()
    ):
        if response.text:
            yield response.text
