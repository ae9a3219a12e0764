"""Summed answer log-probs of a causal LM: the quantity DPO and MIPO's PMI are built on.

    tokens, mask = pad_batch([ids_a, ids_b], [start_a, start_b], pad_id)
    logps = answer_logprobs(model, tokens, mask)     # (B,) log p(answer | prompt)
    *arrays, mask = pad_pairs(*pair_rows(pairs)[:3], pad_id)
    logps = (pair_token_logprobs(model, *arrays) * mask).sum(axis=-1)  # (A,): each distinct answer once
    logps, counts = score_answers(model, tokenizer, [(messages, answer), ...])  # floats, chat-encoded
    logps, publics, counts = score_pairs(model, tokenizer, [(messages, chosen, rejected), ...])  # (chosen, rejected)

Only answer tokens count (the mask is aligned with the targets, padding never scores).
score_answers (the reference pass of pairs without one before training, compare's rewards)
runs the vocabulary head on the answer positions only (window_logprobs); token_logprobs
scores whole sequences for the trainer, and answer_logprobs sums them for export's checks.
score_pairs (the reference pass at sampling time) and the DPO step score pairs with
pair_token_logprobs where the model allows it:
each distinct prompt runs once for all its answers and each distinct answer once for all its
pairs (pair_rows: a prompt's k negatives, an echo pair beside its prompt's own pair), a
prompt's answers one after another in one row after it (pad_pairs), the same log-probs up to
float rounding (the trainer's first-step check holds them to the stored reference). A mask
may cover only the last targets: the vocabulary head then skips the prompt positions before
it, which score nothing anyway. score_answers and score_pairs, forwards only, run the MLPs'
swiglu in numpy on the CPU (swiglu.host_swiglu), as generation does.
"""

import contextlib

import mlx.core as mx
import numpy as np

from mipo_mlx.chat import encode_answer
from mipo_mlx.swiglu import host_swiglu

# Pad lengths up to a multiple of this so compiled steps see few distinct shapes.
PAD_MULTIPLE = 16
# mlx-lm architectures whose logits are the head (tied embeddings or lm_head) on the body's
# last hidden states, so that the head can run on some positions only.
PLAIN_HEAD_MODELS = ("llama", "qwen2", "qwen3")
HEAD_SLICE = 64
SCORING_ROWS = 8  # sequences per score_answers forward


def padded_width(lengths: list[int]) -> int:
    """The longest length rounded up to a multiple of PAD_MULTIPLE."""
    return -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE


def pad_batch(sequences: list[list[int]], answer_starts: list[int], pad_id: int) -> tuple[mx.array, mx.array]:
    """Right-pad token sequences; return tokens (B, T) and the answer mask over targets (B, T-1)."""
    width = padded_width([len(s) for s in sequences])
    tokens = np.full((len(sequences), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), width - 1), dtype=np.float32)
    for row, (ids, start) in enumerate(zip(sequences, answer_starts)):
        tokens[row, : len(ids)] = ids
        # Target t is token t+1: answer tokens start..len-1 are targets start-1..len-2.
        mask[row, start - 1 : len(ids) - 1] = 1.0
    return mx.array(tokens), mx.array(mask)


def pad_pairs(prompts: list[list[int]], answers: list[list[int]], answer_prompts: list[int], pad_id: int):
    """P prompts and A answers, answer a after prompt answer_prompts[a], as pair_token_logprobs takes them (and the
    mask).

    Returns prompts left-padded (P, W) and their left padding (P,); each prompt's answers one
    after another in its row (P, T), right-padded, with each token's index in its answer
    (P, T; 0 on padding); where answer a's token l sits in the flattened rows (A, L), and the
    mask of the answers' tokens (A, L), token l of answer a at [a, l].
    """
    row_lengths = np.bincount(answer_prompts, weights=[len(a) for a in answers], minlength=len(prompts))
    width, length, row_length = (padded_width(lengths) for lengths in
                                 ([len(p) for p in prompts], [len(a) for a in answers], row_lengths.astype(int)))
    left = np.array([width - len(p) for p in prompts], dtype=np.int32)
    padded_prompts = np.full((len(prompts), width), pad_id, dtype=np.int32)
    packed = np.full((len(prompts), row_length), pad_id, dtype=np.int32)
    step = np.zeros((len(prompts), row_length), dtype=np.int32)
    place = np.zeros((len(answers), length), dtype=np.int32)
    mask = np.zeros((len(answers), length), dtype=np.float32)
    for row, ids in enumerate(prompts):
        padded_prompts[row, left[row] :] = ids
    filled = [0] * len(prompts)
    for a, (ids, row) in enumerate(zip(answers, answer_prompts)):
        start, filled[row] = filled[row], filled[row] + len(ids)
        packed[row, start : start + len(ids)] = ids
        step[row, start : start + len(ids)] = np.arange(len(ids))
        place[a, : len(ids)] = row * row_length + start + np.arange(len(ids))
        mask[a, : len(ids)] = 1.0
    return tuple(mx.array(x) for x in (padded_prompts, left, packed, step, place, mask))


def pair_rows(pairs: list[tuple[list[int], list[int], list[int]]]):
    """(prompt, chosen, rejected) token ids of B pairs as pad_pairs takes them, each distinct prompt and each
    distinct answer to it once: the chosen answers first, then the rejected ones, in pair order.

    Returns prompts, answers, answer_prompts and the rows of each pair's (chosen, rejected) answers
    (B, 2). Pairs that share a prompt and an answer (k negatives of one prompt, an echo pair beside
    its prompt's pair) run them once; B pairs that share nothing are B prompts and 2B answers.
    """
    prompts, answers, answer_prompts = {}, {}, []
    index = np.zeros((len(pairs), 2), dtype=np.int32)
    for side in (0, 1):
        for n, (prompt_ids, *answer_ids) in enumerate(pairs):
            prompt = prompts.setdefault(tuple(prompt_ids), len(prompts))
            key = (prompt, tuple(answer_ids[side]))
            if key not in answers:
                answers[key] = len(answers)
                answer_prompts.append(prompt)
            index[n, side] = answers[key]
    return [list(p) for p in prompts], [list(a) for _, a in answers], answer_prompts, index


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
    """Sum of answer-token log-probs per sequence: (B,). mask (B, W) covers the last W targets.

    The mask may be weights, or a stack of them (K, B, W): then the K weighted sums, (K, B).
    """
    return (token_logprobs(model, tokens, tokens.shape[1] - 1 - mask.shape[-1]) * mask).sum(axis=-1)


def window_logprobs(model, tokens: mx.array, windows: list[tuple[int, int]]) -> mx.array:
    """Summed log-probs of targets a..b-1 of each row, for windows (a, b): (B,). Inference only.

    The vocabulary head runs on the window positions alone (the prompt positions before
    them score nothing), where whole logits would cost a head pass over every position.
    """
    rows = np.concatenate([np.full(b - a, row) for row, (a, b) in enumerate(windows)]).astype(np.int32)
    columns = np.concatenate([np.arange(a, b) for a, b in windows]).astype(np.int32)
    rows, columns = mx.array(rows), mx.array(columns)
    targets = tokens[rows, columns + 1]  # (N,)
    head = plain_head(model)
    if head is None:
        logps = target_logprobs(model(tokens[:, :-1])[rows, columns], targets)
    else:
        logps = head_logprobs(head, model.model(tokens[:, :-1])[rows, columns], targets)  # (N,)
    return mx.zeros(len(windows), dtype=logps.dtype).at[rows].add(logps)


def score_answers(model, tokenizer, items: list[tuple[list[dict], str]]) -> tuple[list[float], list[tuple[int, int]]]:
    """log p(answer | messages) under `model` for (messages, answer) items, and their (prompt, answer) token counts."""
    encoded = [encode_answer(tokenizer, messages, answer) for messages, answer in items]
    logps = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(encoded), SCORING_ROWS):
        chunk = encoded[start : start + SCORING_ROWS]
        tokens, _ = pad_batch([ids for ids, _ in chunk], [s for _, s in chunk], pad_id)
        # Target t is token t+1: answer tokens start..len-1 are targets start-1..len-2.
        with host_swiglu(model):
            values = window_logprobs(model, tokens, [(s - 1, len(ids) - 1) for ids, s in chunk])  # (rows,)
            mx.eval(values)
        logps += values.tolist()
    return logps, [(start, len(ids) - start) for ids, start in encoded]


def score_pairs(model, tokenizer, items: list[tuple[list[dict], str, str]]
                ) -> tuple[list[tuple[float, float]], list[tuple[float, float] | None], list[dict]]:
    """log p(chosen | messages) and log p(rejected | messages) for (messages, chosen, rejected) items, the same over
    each pair's first min(chosen, rejected) answer tokens (LD-DPO's public part, which training.ld_alpha weighs 1), and
    token counts {"prompt", "chosen", "rejected"}.

    Each distinct prompt and answer runs once (pair_rows and pair_token_logprobs, as the DPO step scores
    them) where shares_prompts allows it; otherwise score_answers, without the public parts (None).
    """
    encoded = [[encode_answer(tokenizer, messages, answer) for answer in (chosen, rejected)]
               for messages, chosen, rejected in items]
    counts = [{"prompt": c[1], "chosen": len(c[0]) - c[1], "rejected": len(r[0]) - r[1]} for c, r in encoded]
    if not shares_prompts(model):
        logps, _ = score_answers(model, tokenizer, [(m, answer) for m, c, r in items for answer in (c, r)])
        return list(zip(logps[0::2], logps[1::2])), [None] * len(items), counts
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logps, publics = [], []
    for start in range(0, len(encoded), SCORING_ROWS // 2):
        chunk = [(c[0][: c[1]], c[0][c[1] :], r[0][r[1] :]) for c, r in encoded[start : start + SCORING_ROWS // 2]]
        prompts, answers, answer_prompts, index = pair_rows(chunk)
        *arrays, mask = pad_pairs(prompts, answers, answer_prompts, pad_id)
        rows = mx.array(index)  # (B, 2) each pair's answer rows
        with host_swiglu(model):
            tokens = pair_token_logprobs(model, *arrays) * mask  # (A, L)
            public_values = (tokens[rows] * length_desensitized(mask[rows], 0.0)).sum(axis=-1)  # (B, 2)
            values = tokens.sum(axis=-1)  # (A,)
            mx.eval(values, public_values)
        values = values.tolist()
        logps += [(values[c], values[r]) for c, r in index.tolist()]
        publics += [tuple(pair) for pair in public_values.tolist()]
    return logps, publics, counts


def length_desensitized(masks: mx.array, alpha: float) -> mx.array:
    """TRL's ld_alpha weights of pairs' (chosen, rejected) answer masks (B, 2, W): 1 on a pair's first min(chosen,
    rejected) answer tokens (its public part), alpha after them (0: the public part alone)."""
    public = masks.sum(axis=-1).min(axis=1)  # (B,)
    position = mx.cumsum(masks, axis=-1)  # 1 at each answer's first token
    return masks * mx.where(position <= public[:, None, None], 1.0, alpha)


def shares_prompts(model) -> bool:
    """Whether pair_token_logprobs can run this model: a plain head and full attention in every layer."""
    return plain_head(model) is not None and getattr(model.model, "swa_idx", None) is None


class SharedPromptCache:
    """A layer's cache, as mlx-lm's attention uses one: P left-padded prompts, then each prompt's answers in its row.

    The first pass (the prompts) keeps its keys and values; in the second, each token attends
    to its prompt's, then causally to its own answer's tokens (a token `step` into its answer
    starts it `step` columns back). Positions count from each prompt's first real token: per
    token in the second pass (token_positions). No query attends to padding, except a padding
    query to itself (an attention row with nothing to attend to would be NaN).
    """

    def __init__(self, left_padding: mx.array, step: mx.array):
        self.left_padding, self.step = left_padding, step
        self.offset = -left_padding  # the rotary position of each row's first column
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self.keys, self.values = keys, values
            self.offset = (keys.shape[2] - self.left_padding)[:, None] + self.step  # (P, T): each token's position
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def make_mask(self, n: int, **kwargs) -> mx.array:
        queries, left = mx.arange(n)[:, None], self.left_padding[:, None, None, None]
        if self.keys is None:
            keys = mx.arange(n)[None]
            return ((keys >= left) & (keys <= queries)) | (keys == queries)  # (P, 1, W, W)
        width = self.keys.shape[2]
        keys, first = mx.arange(width + n)[None], (queries[None] - self.step[:, :, None])[:, None]  # first: (P, 1, T, 1)
        answer = (keys - width <= queries) & (keys - width >= first)  # its own answer's tokens up to itself
        return mx.where(keys < width, keys >= left, answer)  # (P, 1, T, W + T)


@contextlib.contextmanager
def token_positions(model):
    """The model's rotary embedding taking a position per token, when the offset is (B, L) positions.

    mlx-lm's attention rotates by cache.offset, one start per row; a row that holds several
    answers after one prompt needs each answer to start where the prompt ends.
    """
    cls = type(model.layers[0].self_attn.rope)
    original = cls.__call__

    def call(self, x, offset=0):
        if not (isinstance(offset, mx.array) and offset.ndim == 2):
            return original(self, x, offset=offset)
        rows, heads, length, dims = x.shape  # each token its own row, at its own offset
        tokens = x.transpose(0, 2, 1, 3).reshape(rows * length, heads, 1, dims)
        rotated = original(self, tokens, offset=offset.reshape(-1))
        return rotated.reshape(rows, length, heads, dims).transpose(0, 2, 1, 3)

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = original


def pair_token_logprobs(model, prompts: mx.array, left_padding: mx.array, packed: mx.array, step: mx.array,
                        place: mx.array) -> mx.array:
    """Log-probs of A answers' tokens, each answer after its prompt: (A, L), token l of answer a at [a, l] (past an
    answer's end: pad_pairs' mask is 0 there). Arrays from pad_pairs but the mask.

    Each prompt goes through the model once for all its answers, and its answers one after
    another in one row: where whole sequences would run the prompt once per answer and pad
    every answer to the longest. For models where shares_prompts is true.
    """
    caches = [SharedPromptCache(left_padding, step) for _ in model.layers]
    last = model.model(prompts, cache=caches)[:, -1:]  # (P, 1, D): what predicts each answer's first token
    with token_positions(model):
        hidden = model.model(packed, cache=caches)  # (P, T, D)
    # Token t is predicted by the hidden state before it in its answer, an answer's first by the prompt's last.
    columns = mx.where(step == 0, 0, mx.arange(packed.shape[1])[None])  # (P, T) into [last, hidden]
    predictors = mx.take_along_axis(mx.concatenate([last, hidden], axis=1), columns[..., None], axis=1)  # (P, T, D)
    logps = head_logprobs(plain_head(model), predictors, packed).reshape(-1)  # (P * T,)
    return logps[place]
