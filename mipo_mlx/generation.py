"""Batched answer generation with a real sampler, for sampling pairs and for evaluation.

    settings = SamplerSettings(temperature=0.7, top_p=0.9, max_tokens=96)
    answers = generate_answers(model, tokenizer, [prompt_ids, ...], settings, seed=0, batch_size=16)
    answers[0].text, answers[0].finish_reason      # "stop" (end of turn) or "length"
    for delta in stream_answer(model, tokenizer, prompt_ids, settings, seed=0): ...

Generation runs on mlx-lm's BatchGenerator (continuous batching; its default sampler is
greedy, so ours is always passed). Prompts are generated in fixed chunks of `batch_size`,
each with its own seed derived from (seed, chunk index): the same inputs give the same
answers whichever chunks were already done, which is what makes sampling resumable.
"""

import hashlib
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.sample_utils import make_sampler


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float
    top_p: float
    max_tokens: int

    def sampler(self):
        # mlx-lm treats top_p 1.0 (or 0) as "off"; temperature 0 is argmax.
        return make_sampler(temp=self.temperature, top_p=self.top_p if self.top_p < 1.0 else 0.0)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def derived_seed(*parts) -> int:
    """A 31-bit seed from any values, stable across runs and machines."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
