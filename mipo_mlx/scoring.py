"""Summed answer log-probs of a causal LM: the quantity DPO and MIPO's PMI are built on.

    tokens, mask = pad_batch([ids_a, ids_b], [start_a, start_b], pad_id)
    logps = answer_logprobs(model, tokens, mask)     # (B,) log p(answer | prompt)

Only answer tokens count (the mask is aligned with the targets, padding never scores).
The same function serves the reference pass at sampling time, the DPO loss (inside
value_and_grad) and evaluation, so all three agree to the last token.
"""

import mlx.core as mx
import numpy as np

# Pad lengths up to a multiple of this so compiled steps see few distinct shapes.
PAD_MULTIPLE = 16


def pad_batch(sequences: list[list[int]], answer_starts: list[int], pad_id: int) -> tuple[mx.array, mx.array]:
    """Right-pad token sequences; return tokens (B, T) and the answer mask over targets (B, T-1)."""
    longest = max(len(s) for s in sequences)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.full((len(sequences), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), width - 1), dtype=np.float32)
    for row, (ids, start) in enumerate(zip(sequences, answer_starts)):
        tokens[row, : len(ids)] = ids
        # Target t is token t+1: answer tokens start..len-1 are targets start-1..len-2.
        mask[row, start - 1 : len(ids) - 1] = 1.0
    return mx.array(tokens), mx.array(mask)


def token_logprobs(model, tokens: mx.array) -> mx.array:
    """log p(token t+1 | tokens <= t) for every position: (B, T-1)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)  # (B, T-1, V)
    targets = tokens[:, 1:]  # (B, T-1)
    target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)  # (B, T-1)
    return target_logits - mx.logsumexp(logits, axis=-1)


def answer_logprobs(model, tokens: mx.array, mask: mx.array) -> mx.array:
    """Sum of answer-token log-probs per sequence: (B,)."""
    return (token_logprobs(model, tokens) * mask).sum(axis=-1)
