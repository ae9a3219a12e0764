"""Generation: answers that do not depend on their batch, mlx-lm's greedy answers, scoring with the head on answers only,
and numpy's swiglu on the CPU.

    python -m pytest -q tests/test_generation.py
"""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate
from mlx_lm.models import activations
from mlx_lm.sample_utils import make_sampler

from mipo_mlx.chat import encode_answer, encode_prompt
from mipo_mlx.generation import SamplerSettings, generate_answers, shared_prefix
from mipo_mlx.pipeline import run_stages
from mipo_mlx.recipe import parse_recipe
from mipo_mlx.rundir import open_run
from mipo_mlx.scoring import pad_batch, score_answers, score_pairs, target_logprobs
from mipo_mlx.swiglu import host_swiglu
from tiny_models import tiny_model

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "My cat Luna likes",
             "Hola, como estas?", "Here are three tips", "Which gas do plants absorb?", "Never use commas."]
SETTINGS = {
    "greedy": SamplerSettings(0.0, 1.0, 24),
    "nucleus": SamplerSettings(0.8, 0.9, 24),
    "whole vocabulary": SamplerSettings(1.0, 1.0, 24),
}


def job(tokenizer, n=70):
    """n prompts of different lengths that share the chat template's start."""
    return [encode_prompt(tokenizer, [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": " ".join([QUESTIONS[i % 7]] * (1 + i % 4))}])
            for i in range(n)]


@pytest.mark.parametrize("arch, quantized", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("sampler", list(SETTINGS))
def test_answers_are_the_same_at_batch_1_7_and_64(arch, quantized, sampler):
    model, tokenizer = tiny_model(arch, quantized=quantized)
    prompts, settings = job(tokenizer), SETTINGS[sampler]
    keys = [f"p{i}" for i in range(len(prompts))]
    answers = {batch: [(a.token_ids, a.finish_reason) for a in
                       generate_answers(model, tokenizer, prompts, settings, seed=3, keys=keys, batch_size=batch)]
               for batch in (1, 7, 64)}
    assert answers[1] == answers[7] == answers[64]
    if arch == "llama" and sampler != "greedy":  # (the tiny Qwen2's nucleus is nearly one token)
        # Rows end at different steps, so rows are refilled mid-batch.
        assert {reason for _, reason in answers[7]} == {"stop", "length"}
        # An answer is a function of (seed, key): the same prompt under another key is another draw.
        again = generate_answers(model, tokenizer, prompts[:8], settings, seed=3,
                                 keys=[f"other{i}" for i in range(8)], batch_size=4)
        assert [a.token_ids for a in again] != [ids for ids, _ in answers[1][:8]]


@pytest.mark.parametrize("arch, quantized", [("llama", False), ("qwen2", True)])
def test_greedy_answers_are_mlx_lm_generates(arch, quantized):
    model, tokenizer = tiny_model(arch, quantized=quantized)
    prompts = job(tokenizer, 6)
    ours = generate_answers(model, tokenizer, prompts, SamplerSettings(0.0, 1.0, 20), seed=0, batch_size=4)
    for prompt, answer in zip(prompts, ours):
        assert answer.text == generate(model, tokenizer, prompt, max_tokens=20, sampler=make_sampler(0.0))


def test_the_shared_prefix_leaves_every_prompt_a_token_and_an_empty_job_answers_nothing():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]]) == [1, 2]
    assert shared_prefix([[7, 8], [9]]) == []
    model, tokenizer = tiny_model("llama")
    assert generate_answers(model, tokenizer, [], SETTINGS["nucleus"], seed=0) == []


def test_pairs_are_byte_identical_at_sampling_batch_1_7_and_64(tmp_path, tiny_model_dirs):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": QUESTIONS[i % 7] + f" ({i})",
                                           "context": f"I am user {i % 5}."}) + "\n" for i in range(20)))
    files = []
    for batch in (1, 7, 64):
        text = (f"model: {{path: {tiny_model_dirs[('llama', False)]}}}\ndata: {{train: {prompts}, test: null}}\n"
                f"output_dir: {tmp_path / 'runs'}\nrun_name: b{batch}\n")
        recipe = parse_recipe(text, "r.yaml", ["sampling.negative=swap_context", "sampling.max_tokens=16",
                                               "sampling.temperature=0.8", f"sampling.batch_size={batch}"])
        run_stages(open_run(recipe, resume=False), ["sample"])
        files.append((tmp_path / "runs" / f"b{batch}" / "pairs.jsonl").read_bytes())
    assert files[0].count(b"\n") == 20
    assert files[0] == files[1] == files[2]


def plain_logprobs(model, tokenizer, messages, answer, first: int | None = None) -> float:
    """log p(answer | messages) from the model's whole logits, one sequence at a time; of its first tokens only."""
    ids, start = encode_answer(tokenizer, messages, answer)
    tokens, mask = pad_batch([ids], [start], 0)
    if first is not None:
        mask = mask * (mx.cumsum(mask, axis=-1) <= first)
    return (target_logprobs(model(tokens[:, :-1]), tokens[:, 1:]) * mask).sum().item()


# Log-probs equal up to float rounding: within 1e-4, or within a float32 sum's rounding of its size where the sum is in
# the hundreds (the tiny random models' answers score -100 to -1000, and 1e-4 is two float32 steps at 1000).
ROUNDING = {"atol": 1e-4, "rtol": 1e-6}


def scoring_items():
    return [([{"role": "user", "content": q}], a) for q, a in
            zip(QUESTIONS, ["Paris.", "The sea is wide and blue, the sun is warm.", "to sleep on the sofa",
                            "Bien, gracias.", "1. drink water 2. sleep well", "B", "Fine"])]


@pytest.mark.parametrize("arch, quantized", [("llama", False), ("qwen2", True)])
def test_scoring_with_the_head_on_answers_equals_the_plain_forward(arch, quantized):
    model, tokenizer = tiny_model(arch, quantized=quantized)
    items = scoring_items() * 2  # 14 answers: two forwards of up to 8 rows
    logps, counts = score_answers(model, tokenizer, items)
    expected = [plain_logprobs(model, tokenizer, m, a) for m, a in items]
    assert np.allclose(logps, expected, **ROUNDING)
    assert all(answer > 0 for _, answer in counts)


def test_scoring_on_the_embedded_model_equals_the_plain_forward(embedded_model):
    model, tokenizer = embedded_model.model, embedded_model.tokenizer
    items = scoring_items()
    logps, _ = score_answers(model, tokenizer, items)
    expected = [plain_logprobs(model, tokenizer, m, a) for m, a in items]
    assert np.allclose(logps, expected, **ROUNDING)
    assert min(logps) < -1.0  # real answers, not a degenerate zero
    assert_pair_scoring_equals_the_plain_forward(model, tokenizer)


@pytest.mark.parametrize("arch, quantized", [("llama", False), ("qwen2", True)])
def test_pair_scoring_equals_the_plain_forward(arch, quantized):
    assert_pair_scoring_equals_the_plain_forward(*tiny_model(arch, quantized=quantized))


def assert_pair_scoring_equals_the_plain_forward(model, tokenizer):
    """score_pairs (each prompt once, its distinct answers one after another in one row) against each answer's whole
    sequence alone, with pairs that share their prompt and chosen answer (k negatives, an echo pair): whole answers
    and their public parts (the pair's shorter answer's length: a shared chosen answer has one per pair)."""
    items = scoring_items()
    pairs = []
    for n, (m, a) in enumerate(items):  # the first three prompts with a second negative beside the first
        pairs += [(m, a, negative) for negative in [items[(n + 1) % len(items)][1],
                                                    "a second negative, longer than most of the answers here"][: 1 + (n < 3)]]
    logps, publics, counts = score_pairs(model, tokenizer, pairs)
    expected = [[plain_logprobs(model, tokenizer, m, answer) for answer in (c, r)] for m, c, r in pairs]
    assert np.allclose(logps, expected, **ROUNDING)
    shorter = [min(count["chosen"], count["rejected"]) for count in counts]
    assert any(shorter[2 * n] != shorter[2 * n + 1] for n in range(3))  # a chosen answer with two public lengths
    expected = [[plain_logprobs(model, tokenizer, m, answer, n) for answer in (c, r)]
                for (m, c, r), n in zip(pairs, shorter)]
    assert np.allclose(publics, expected, **ROUNDING)
    assert not np.allclose(publics, logps, **ROUNDING)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_host_swiglu_gives_mlx_lms_logits_and_is_undone_after_its_block(arch):
    model, _ = tiny_model(arch, quantized=False)
    module = sys.modules[type(model).__module__]
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 8]])
    expected = model(tokens)
    with host_swiglu(model):
        assert module.swiglu is not activations.swiglu  # the CPU backend: numpy's
        got = model(tokens)
    assert module.swiglu is activations.swiglu  # training's gradients need MLX's again
    assert mx.allclose(got, expected, atol=1e-5, rtol=1e-5).item()
    with pytest.raises(KeyError), host_swiglu(model):
        raise KeyError("stopped")
    assert module.swiglu is activations.swiglu
