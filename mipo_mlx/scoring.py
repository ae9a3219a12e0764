"""Summed answer log-probs of a causal LM: the quantity DPO and MIPO's PMI are built on.

    tokens, mask = pad_batch([ids_a, ids_b], [start_a, start_b], pad_id)
    logps = answer_logprobs(model, tokens, mask)     # (B,) log p(answer | prompt)

Only answer tokens count (the mask is aligned with the targets, padding never scores).
The same function serves the reference pass at sampling time, the DPO loss (inside
value_and_grad) and evaluation, so all three agree to the last token. A mask may cover
only the last targets (the trainer starts it at the batch's first answer token): the
vocabulary head then skips the prompt positions before it, which score nothing anyway.
"""

import mlx.core as mx
import numpy as np

# Pad lengths up to a multiple of this so compiled steps see few distinct shapes.
PAD_MULTIPLE = 16
# mlx-lm architectures whose logits are the head (tied embeddings or lm_head) on the body's
# last hidden states, so that the head can run on some positions only.
PLAIN_HEAD_MODELS = ("llama", "qwen2", "qwen3")
HEAD_SLICE = 64


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


def plain_head(model):
    """The vocabulary head as a function of the body's last hidden states, or None for other architectures."""
    if getattr(model, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    return model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head


def target_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log softmax(logits) at each target: (..., L)."""
    logits = logits.astype(mx.float32)
    return mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1) - mx.logsumexp(logits, axis=-1)


def head_logprobs(head, hidden: mx.array, targets: mx.array) -> mx.array:
    """target_logprobs(head(hidden), targets): (B, L), with the head run on HEAD_SLICE positions at a time.

    Its backward recomputes each slice's logits rather than keeping all (B, L, V) of them
    (and a softmax and a gradient as large) while the body's activations are all alive:
    one more head matmul, a fraction of the memory. Values as with the head in one piece, up
    to float rounding.
    """
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    bounds = [(start, min(start + HEAD_SLICE, len(targets))) for start in range(0, len(targets), HEAD_SLICE)]

    @mx.custom_function
    def sliced(hidden, targets):
        return mx.concatenate([target_logprobs(head(hidden[a:b]), targets[a:b]) for a, b in bounds])

    @sliced.vjp
    def sliced_vjp(primals, cotangent, output):
        hidden, targets = primals
        grads = []
        for a, b in bounds:
            logits = head(hidden[a:b]).astype(mx.float32)
            onehot = mx.arange(logits.shape[-1]) == targets[a:b, None]
            dlogits = (onehot - mx.softmax(logits, axis=-1)) * cotangent[a:b, None]
            grads.append(mx.vjp(lambda h: head(h).astype(mx.float32), [hidden[a:b]], [dlogits])[1][0])
        return mx.concatenate(grads), mx.zeros_like(targets)

    return sliced(hidden, targets).reshape(shape)


def token_logprobs(model, tokens: mx.array, first: int = 0) -> mx.array:
    """log p(token t+1 | tokens <= t) for positions t = first..T-2: (B, T-1-first)."""
    inputs, targets = tokens[:, :-1], tokens[:, first + 1 :]
    head = plain_head(model)
    if head is None:
        return target_logprobs(model(inputs)[:, first:], targets)
    return head_logprobs(head, model.model(inputs)[:, first:], targets)


def answer_logprobs(model, tokens: mx.array, mask: mx.array) -> mx.array:
    """Sum of answer-token log-probs per sequence: (B,). mask (B, W) covers the last W targets."""
    return (token_logprobs(model, tokens, tokens.shape[1] - 1 - mask.shape[1]) * mask).sum(axis=-1)
