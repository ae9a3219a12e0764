"""The DPO stage: a LoRA adapter trained on the run's pairs, with one model in memory.

    mipo-mlx train recipes/quickstart.yaml [--resume]     # this is its second stage

    examples = build_examples(read_pairs(path), model, tokenizer, max_seq_length=1024)
    trainer = Trainer(model, tokenizer, examples, [], recipe.training, seed=0)   # no run directory
    metrics = trainer.train_step()

Trainer is the step and its state alone; run_stage and fit add the run directory (the
reports in its event log, the checkpoints, the final adapter).

Reference log-probs come from the pairs file (stored at sampling time); pairs without
them (e.g. a TRL data set) are scored once before training with the adapter off, and
answers cut at training.max_seq_length, whose stored log-probs cover tokens the policy
never sees, once by the model as training starts (Trainer.references). Each
step runs each pair's prompt through the model once and its chosen and rejected answers
after it in one concatenated forward (2B rows; whole sequences instead where
scoring.shares_prompts rules it out or with gradient checkpointing), scores answer tokens
only, and updates the adapter with AdamW (bias-corrected, as torch's and TRL's), warm-up
then cosine, linear or constant, and gradient clipping, accumulating gradients over
micro-batches when asked. The vocabulary head and swiglu get backward passes that keep
less (scoring.head_logprobs, swiglu.lean_swiglu).

Besides the DPO loss (dpo.py; DPO-Positive with training.dpop_lambda): an NLL term on the
chosen answers (training.nll_weight, TRL's "sft" loss) and TRL's length desensitization
(training.ld_alpha: answer tokens past the shorter answer of a pair count with weight
alpha, in the policy's and in the reference's log-probs; TRL weighs the policy's alone, so
its loss does not start at ln 2. The weighted reference comes from the pairs file's whole
and public log-probs, or for pairs without the latter is scored once by the model as
training starts: the base, or in a later round the previous round's model).

Held-out evidence (fit): every training.eval_every steps (and at the last step, which takes
the place of a periodic one less than half an interval before it) the held-out pairs' DPO metrics,
and training.probe_prompts held-out prompts answered greedily, with the share of answers
in a repetition loop, the share that copy their context (compare's context_echo) and their
length, against the same answers before training (a run that starts to loop or to echo
says so: a warning note). training.select_checkpoint picks the final
adapter: the last step, or the evaluation with the best held-out DPO loss or reward
accuracy among those whose probe answers loop no more than before training (if none, the
fewest loops); training.early_stopping_patience stops when that has not improved for so
many evaluations. adapters/ is the selected step's adapter, and its adapter_config.json
and the stage summary say which step and why.

Self-checks stop a run that would learn nothing: the first loss must equal the loss at
policy == reference (ln 2 for sigmoid) within 1e-4; the first update must have a
non-zero gradient and change the adapter; a NaN or infinite loss or gradient stops the
run, keeping the last good checkpoint, and names the command that continues it with a
lower learning rate (`--resume --set training.learning_rate=...`). Checkpoints (adapter,
optimizer state, data position, a fingerprint of the training pairs, the sha256 of each
file) are written atomically; `--resume` continues the exact trajectory: batch order and
dropout noise are functions of the recipe's seed and the step, so the RNG state is
(seed, step). It first checks the newest checkpoint against its digests and against the
tensors (names, shapes, dtypes) this recipe's adapter and optimizer have, before loading
any of it; a damaged one is reported in one line, set aside and the one before it used.
Ctrl+C (the TUI's stop button sends SIGINT) finishes the current step, saves a checkpoint
and stops; a second Ctrl+C stops at once, keeping the last checkpoint.

Iterative MIPO (training.rounds): round N >= 2 trains on pairs the previous round's model
sampled and scored, so that model is the reference, and the adapter starts from the previous
round's adapters/ (lora.use_adapter) with a fresh optimizer and schedule; the first-step
check then holds as in round 1 (policy == reference). The adapter goes on rather than a new
one on a base with the old one merged in: LoRA on a quantized base (QLoRA, as on a Mac)
cannot merge losslessly, the merged weights being either dequantized (a bigger model than
the one the run started with) or quantized again (a reference that is not the model that
sampled). TRL's DPO documentation ("Reference model considerations with PEFT") warns of
that merge for the same reason and instead loads the trained adapter twice, one copy to go
on training and one as the reference; with the reference log-probs stored in the pairs, one
copy is enough here. Each round's held-out metrics and loop probe are in its stage summary
(held_out); the probe counts loops against the base, the product's promise.

On several ranks (mlx.launch; distributed.py) each takes its share of every micro-batch's
pairs, the gradients are summed over the ranks weighted by those shares (the same step as
one process), and rank 0 alone writes checkpoints and the adapter; a resume gets rank 0's
checkpoint on every rank, on any number of ranks, and a later round starts every rank from
rank 0's adapter of the round before (lora.use_adapter).
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mipo_mlx import distributed
from mipo_mlx.chat import encode_answer
from mipo_mlx.data import context_of
from mipo_mlx.dpo import dpo_losses, dpo_metrics, infonce_losses, initial_loss
from mipo_mlx.generation import SamplerSettings, generate_answers
from mipo_mlx.metrics import copies_context, repetition_loop
from mipo_mlx.errors import UserError
from mipo_mlx.files import atomic_folder, sha256_of
from mipo_mlx.lora import (
    adapter_config, adapter_disabled, apply_lora, lora_layers, save_adapter, use_adapter, write_adapter,
)
from mipo_mlx.rundir import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTERS_DIR, OPTIMIZER_FILE, PAIRS_FILE, STATE_FILE, Pair, checkpoint_dir, is_held_out,
    no_checkpoint_left, read_checkpoint_state, read_pairs, set_aside, usable_checkpoint, write_checkpoint_state,
)
from mipo_mlx.scoring import (
    PAD_MULTIPLE, SCORING_ROWS, length_desensitized, pad_batch, pad_pairs, pair_rows, pair_token_logprobs,
    score_answers, shares_prompts, token_logprobs,
)
from mipo_mlx.seeds import derived_seed
from mipo_mlx.swiglu import lean_swiglu

logger = logging.getLogger("mipo_mlx")
INITIAL_LOSS_TOLERANCE = 1e-4
# mx dtypes as a safetensors header names them (what mx.save_safetensors writes).
SAFETENSORS_DTYPE_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint64: "U64",
                           mx.int64: "I64", mx.uint32: "U32", mx.int32: "I32"}


class TrainingStopped(RuntimeError):
    """A self-check failed; the message says what and what to do."""


@dataclass
class Example:
    prompt_id: str
    chosen: tuple[list[int], int]  # token ids and where the answer starts
    rejected: tuple[list[int], int]
    ref_chosen: float | None  # None: not known for these tokens (an answer cut at max_seq_length): Trainer.references
    ref_rejected: float | None
    context: str = ""  # the prompt's system messages: what the training probe checks its answers copy
    ref_public: tuple[float, float] | None = None  # reference log-probs of the pair's public parts (chosen, rejected)

    @property
    def length(self) -> int:
        return max(len(self.chosen[0]), len(self.rejected[0]))

    @property
    def prompt(self) -> list[int]:
        return self.chosen[0][: self.chosen[1]]

    @property
    def group(self) -> tuple:
        """What the pairs of one prompt and chosen answer share (its k negatives, its echo pair)."""
        return self.prompt_id, tuple(self.chosen[0])


def build_examples(pairs: list[Pair], model, tokenizer, max_seq_length: int) -> list[Example]:
    """Token ids of both answers (chat.encode_answer) and their reference log-probs: the stored ones, or for pairs
    without them scored here with the adapter off (the base model); None where an answer is cut at max_seq_length,
    as its log-probs must cover the tokens the policy sees (Trainer.references scores those)."""
    encoded = []  # (pair index, messages, chosen, rejected, uncut)
    for n, pair in enumerate(pairs):
        messages = pair.prompt_messages()
        chosen = encode_answer(tokenizer, messages, pair.chosen_text)
        rejected = encode_answer(tokenizer, messages, pair.rejected_text)
        if max(chosen[1], rejected[1]) >= max_seq_length:
            continue  # the prompt alone fills the context: nothing to score
        encoded.append((n, messages, chosen, rejected, max(len(chosen[0]), len(rejected[0])) <= max_seq_length))
    refs = {n: pairs[n].ref_logps for n, *_, uncut in encoded if uncut}
    missing = [n for n, ref in refs.items() if ref is None]
    if missing:
        # Pairs from elsewhere: score them once, with the adapter off (the base model).
        items = [(pairs[n].prompt_messages(), text) for n in missing for text in (pairs[n].chosen_text, pairs[n].rejected_text)]
        with adapter_disabled(model):
            logps = distributed.split_work(items, lambda part: score_answers(model, tokenizer, part)[0], SCORING_ROWS)
        for i, n in enumerate(missing):
            refs[n] = (logps[2 * i], logps[2 * i + 1])
    examples = []
    for n, messages, chosen, rejected, uncut in encoded:
        pair = pairs[n]
        prompt_id = pair.mipo.prompt_id if pair.mipo and pair.mipo.prompt_id is not None else n
        examples.append(Example(
            str(prompt_id), (chosen[0][:max_seq_length], chosen[1]), (rejected[0][:max_seq_length], rejected[1]),
            *refs.get(n, (None, None)), context_of(messages), pair.ref_public_logps if uncut else None,
        ))
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    held = {e.prompt_id for e in examples if is_held_out(e.prompt_id, fraction, seed)}
    return [e for e in examples if e.prompt_id not in held], [e for e in examples if e.prompt_id in held]


def prompt_groups(examples: list[Example], indices) -> list[list[int]]:
    """The indices grouped by prompt and chosen answer (a prompt's k negatives, an echo pair beside its prompt's own
    pair), in order of first appearance."""
    groups = {}
    for i in indices:
        groups.setdefault(examples[i].group, []).append(i)
    return list(groups.values())


def make_batches(examples: list[Example], batch_size: int, whole_groups: bool) -> list[list[int]]:
    """Indices bucketed by length so a batch pads little, in batches of whole prompt_groups up to batch_size pairs, so
    that a batch runs their shared prompt and chosen answer once. A group larger than batch_size is split, unless
    whole_groups (the infonce loss takes a prompt's negatives at once): then it is a batch of its own."""
    ordered = sorted(prompt_groups(examples, range(len(examples))), key=lambda g: max(examples[i].length for i in g))
    batches, batch = [], []
    for group in ordered:
        for part in [group] if whole_groups else [group[i : i + batch_size] for i in range(0, len(group), batch_size)]:
            if batch and len(batch) + len(part) > batch_size:
                batches.append(batch)
                batch = []
            batch = batch + part
    return batches + [batch] if batch else batches


def collate(examples: list[Example], indices: list[int], pad_id: int, shared_prompts: bool):
    """A batch as batch_token_logprobs takes it, the rows of each pair's (chosen, rejected) answers (B, 2), each pair's
    prompt_groups number (B,), refs (B, 2; NaN where Trainer.references has yet to score them), real tokens (an int:
    both whole sequences of every pair).

    shared_prompts: pad_pairs' arrays, each distinct prompt and answer once (pair_rows).
    Otherwise whole sequences, tokens (2B, T) and a mask (2B, W) over the last W targets, from
    the batch's first answer token (rounded down so that few shapes compile): the vocabulary
    head skips the prompt before it.
    """
    rows = [examples[i].chosen for i in indices] + [examples[i].rejected for i in indices]
    refs = mx.array([[math.nan if ref is None else ref for ref in (examples[i].ref_chosen, examples[i].ref_rejected)]
                     for i in indices], dtype=mx.float32)  # (B, 2)
    real_tokens = sum(len(ids) for ids, _ in rows)
    pairs = np.stack([np.arange(len(indices)), len(indices) + np.arange(len(indices))], axis=1)  # (B, 2)
    numbers = {}
    group = np.array([numbers.setdefault(examples[i].group, len(numbers)) for i in indices], dtype=np.int32)  # (B,)
    if shared_prompts:
        prompts, answers, answer_prompts, pairs = pair_rows(
            [(examples[i].prompt, *(ids[start:] for ids, start in (examples[i].chosen, examples[i].rejected)))
             for i in indices])
        return pad_pairs(prompts, answers, answer_prompts, pad_id), mx.array(pairs), mx.array(group), refs, real_tokens
    tokens, mask = pad_batch([ids for ids, _ in rows], [start for _, start in rows], pad_id)
    first = (min(start for _, start in rows) - 1) // PAD_MULTIPLE * PAD_MULTIPLE
    return (tokens, mask[:, first:]), mx.array(pairs), mx.array(group), refs, real_tokens


def batch_token_logprobs(model, batch: tuple, shared_prompts: bool) -> mx.array:
    """Answer-token log-probs of the rows of a batch collated with the same shared_prompts, 0 off the answers:
    (rows, W), in the columns of the batch's mask."""
    *arrays, mask = batch
    if shared_prompts:
        return pair_token_logprobs(model, *arrays) * mask
    tokens = arrays[0]
    return token_logprobs(model, tokens, tokens.shape[1] - 1 - mask.shape[-1]) * mask


def pair_sums(tokens: mx.array, mask: mx.array, pairs: mx.array, ld_alpha: float | None) -> tuple[mx.array, mx.array]:
    """Each pair's (chosen, rejected) answer log-probs, summed (B, 2), and weighted by training.ld_alpha when it is set
    (else the same sums), from its rows' token log-probs and mask (rows, W) (batch_token_logprobs)."""
    answers = tokens[pairs]  # (B, 2, W)
    whole = answers.sum(axis=-1)
    if ld_alpha is None:
        return whole, whole
    return whole, (answers * length_desensitized(mask[pairs], ld_alpha)).sum(axis=-1)


def same_prompts(examples: list[Example]) -> bool:
    return all(e.prompt == e.rejected[0][: e.rejected[1]] for e in examples)


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the training tokens and reference log-probs: a resume must see the same data."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.chosen, e.rejected, e.ref_chosen, e.ref_rejected]).encode())
    return digest.hexdigest()


def epoch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_batches))
    random.Random(derived_seed(seed, "epoch", epoch)).shuffle(order)
    return order


def schedule(training, total_steps: int):
    """Linear warm-up, then training.lr_scheduler_type to the last step."""
    warmup, peak = int(training.warmup_ratio * total_steps), training.learning_rate
    steps = max(total_steps - warmup, 1)
    after = {
        "cosine": optim.cosine_decay(peak, steps),
        "linear": optim.linear_schedule(peak, 0.0, steps),
        "constant": lambda step: mx.array(peak, dtype=mx.float32),
    }[training.lr_scheduler_type]
    if warmup == 0:
        return after
    # Warm-up starts above zero so that the first update is a real one (and checkable).
    return optim.join_schedules([optim.linear_schedule(peak / (warmup + 1), peak, warmup), after], [warmup])


@contextlib.contextmanager
def checkpointed_layers(layer: nn.Module):
    """mlx-lm's gradient checkpointing, which patches the layer's class, undone on exit."""
    cls = type(layer)
    original = cls.__call__
    grad_checkpoint(layer)
    try:
        yield
    finally:
        cls.__call__ = original


class Trainer:
    """The DPO step on a model with LoRA layers, and its state (step, data cursor, optimizer); it writes no file.

        trainer = Trainer(model, tokenizer, train_examples, held_out_examples, recipe.training, seed=0)
        metrics = trainer.train_step()       # one optimizer step; TRL-named metrics as floats
        metrics = trainer.held_out_metrics()
    """

    def __init__(self, model, tokenizer, train: list[Example], held_out: list[Example], training, seed: int):
        self.model, self.tokenizer, self.training, self.seed = model, tokenizer, training, seed
        self.train_examples, self.held_out = train, held_out
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Gradient checkpointing recomputes each layer, which would run a shared prompt's cache twice.
        self.shared_prompts = (shares_prompts(model) and not training.grad_checkpoint
                               and same_prompts(train) and same_prompts(held_out))
        self.batches = make_batches(train, training.batch_size, whole_groups=training.loss == "infonce")
        steps_per_epoch = math.ceil(len(self.batches) / training.grad_accumulation)
        self.total_steps = steps_per_epoch * training.epochs
        if training.max_steps:
            self.total_steps = min(self.total_steps, training.max_steps)
        self.optimizer = optim.AdamW(
            learning_rate=schedule(training, self.total_steps),
            betas=list(training.adam_betas), weight_decay=training.weight_decay, bias_correction=True,
        )
        self.step, self.epoch, self.position = 0, 0, 0  # optimizer steps done; data cursor
        self.best = None  # the selected evaluation so far: {"step", "value", "excess_loops"} (fit)
        self.stopped_early = False
        self.train_examples, self.held_out = self.references(train, held_out)
        self._compile()

    def references(self, *splits: list[Example]) -> list[list[Example]]:
        """The splits with reference log-probs summed as the policy's will be: the stored ones (with training.ld_alpha
        weighted from the stored whole and public parts: public + alpha * (whole - public)), and where they are not
        known for these tokens (answers cut at max_seq_length; with ld_alpha, pairs stored without public parts)
        scored once by the model as it is before the first step, the reference (a new adapter is zero; a later
        round's starts as the previous round's)."""
        alpha = self.training.ld_alpha

        def stored(e: Example) -> tuple[float, float] | None:
            if e.ref_chosen is None or (alpha is not None and e.ref_public is None):
                return None
            if alpha is None:
                return e.ref_chosen, e.ref_rejected
            return (alpha * e.ref_chosen + (1 - alpha) * e.ref_public[0],
                    alpha * e.ref_rejected + (1 - alpha) * e.ref_public[1])

        def scored(indices: list[int], examples: list[Example]) -> list[list[float]]:
            refs = []
            for start in range(0, len(indices), self.training.batch_size):
                batch_indices = indices[start : start + self.training.batch_size]
                batch, pairs, _, _, _ = collate(examples, batch_indices, self.pad_id, self.shared_prompts)
                tokens = batch_token_logprobs(self.model, batch, self.shared_prompts)
                refs += pair_sums(tokens, batch[-1], pairs, alpha)[1].tolist()
            return refs

        referenced = []
        for examples in splits:
            refs = [stored(e) for e in examples]
            unknown = [i for i, ref in enumerate(refs) if ref is None]  # the same on every rank
            if unknown:
                self.model.eval()
                # Whole batches go round the ranks: each batch is scored as one process scores it.
                scores = distributed.split_work(unknown, partial(scored, examples=examples), self.training.batch_size)
                for i, ref in zip(unknown, scores):
                    refs[i] = ref
            referenced.append([dataclasses.replace(e, ref_chosen=c, ref_rejected=r) for e, (c, r) in zip(examples, refs)])
        return referenced

    def _compile(self):
        # Dropout draws from the random state inside the gradient step; the update does not.
        state = [self.model.state, mx.random.state]
        self._grad_step = partial(mx.compile, inputs=state, outputs=state)(self._loss_and_grad)
        update_state = [self.model.state, self.optimizer.state]
        self._update = partial(mx.compile, inputs=update_state, outputs=update_state)(self._apply)

    def _loss(self, model, batch, pairs, group, refs):
        t = self.training
        mask = batch[-1]
        counts = mask.sum(axis=-1)[pairs]  # (B, 2) answer tokens of each pair's answers
        tokens = batch_token_logprobs(model, batch, self.shared_prompts)  # (rows, W)
        whole, weighted = pair_sums(tokens, mask, pairs, t.ld_alpha)  # (B, 2) each
        pc, pr = weighted[:, 0], weighted[:, 1]  # length-desensitized when training.ld_alpha is set
        if t.loss == "infonce":
            same = group[:, None] == group[None, :]  # (B, B): pairs of one prompt and chosen answer
            # Row b: its group's chosen answer against all the group's negatives, so each group's loss
            # is there once per pair; weighted by 1 / size, the mean over groups.
            losses, _, _ = infonce_losses(pc, mx.where(same, pr[None], -mx.inf), refs[:, 0],
                                          mx.where(same, refs[None, :, 1], 0.0), t.beta)  # (B,)
            size = same.sum(axis=1)
            loss = (losses / size).sum() / (1 / size).sum()
            chosen_rewards, rejected_rewards = t.beta * (pc - refs[:, 0]), t.beta * (pr - refs[:, 1])
        else:
            losses, chosen_rewards, rejected_rewards = dpo_losses(
                pc, pr, refs[:, 0], refs[:, 1], t.beta, t.loss, t.label_smoothing, counts[:, 0], counts[:, 1],
                dpop_lambda=t.dpop_lambda,
            )
            loss = losses.mean()
        metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, pc, pr)
        if t.nll_weight:
            # TRL's "sft" loss: cross-entropy over all chosen tokens of the batch, not a mean of per-answer means.
            metrics["nll_loss"] = -whole[:, 0].sum() / counts[:, 0].sum()
            loss = loss + t.nll_weight * metrics["nll_loss"]
        metrics["loss"] = loss
        return loss, metrics

    def _loss_and_grad(self, batch, pairs, group, refs):
        # Traced once per batch shape: the patch is in place while the graph is built.
        with lean_swiglu(self.model):
            (loss, metrics), grads = nn.value_and_grad(self.model, self._loss)(self.model, batch, pairs, group, refs)
        return metrics, grads

    def _apply(self, grads):
        clipped, norm = optim.clip_grad_norm(grads, self.training.max_grad_norm)
        self.optimizer.update(self.model, clipped)
        return norm

    def next_micro_batches(self) -> tuple[list[list[int]], tuple[int, int]]:
        """The next step's micro-batches and the data cursor (epoch, position) after them."""
        epoch, position, batches = self.epoch, self.position, []
        for _ in range(self.training.grad_accumulation):
            batches.append(self.batches[epoch_order(len(self.batches), self.seed, epoch)[position]])
            epoch, position = (epoch + 1, 0) if position + 1 == len(self.batches) else (epoch, position + 1)
        return batches, (epoch, position)

    def train_step(self) -> dict:
        """One optimizer step over grad_accumulation micro-batches; metrics averaged over them."""
        accumulated, sums, tokens_seen = None, {}, 0
        # Dropout noise depends on the step alone, so a resumed run repeats it exactly.
        mx.random.seed(derived_seed(self.seed, "step", self.step))
        batches, cursor = self.next_micro_batches()
        for indices in batches:
            # On several ranks each takes its share of the prompt groups; its means count by that share.
            mine = [i for group in distributed.share(prompt_groups(self.train_examples, indices)) for i in group]
            loss_share, pair_share = self.loss_share(self.train_examples, mine, indices), len(mine) / len(indices)
            batch, pairs, group, refs, real_tokens = collate(self.train_examples, mine or indices[:1], self.pad_id,
                                                             self.shared_prompts)
            metrics, grads = self._grad_step(batch, pairs, group, refs)
            if (loss_share, pair_share) != (1, 1):
                grads = tree_map(lambda g: g * loss_share, grads)
                metrics = {k: v * (loss_share if k == "loss" else pair_share) for k, v in metrics.items()}
            accumulated = grads if accumulated is None else tree_map(mx.add, accumulated, grads)
            sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
            tokens_seen += real_tokens if mine else 0
        n = len(batches)
        grad_norm = self._update(tree_map(lambda g: g / n, distributed.sum_arrays(accumulated)))
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, grad_norm, sums)
        self.step, (self.epoch, self.position) = self.step + 1, cursor
        result = {k: v / n for k, v in distributed.sum_values({k: v.item() for k, v in sums.items()}).items()}
        rank_tokens = distributed.per_rank(tokens_seen)
        result.update(grad_norm=grad_norm.item(), learning_rate=self.optimizer.learning_rate.item(),
                      tokens=int(sum(rank_tokens)))
        if len(rank_tokens) > 1:
            result["rank_tokens"] = rank_tokens
        return result

    def held_out_metrics(self) -> dict:
        """The step's metrics on the held-out pairs, without an update and without dropout (the model is left in eval
        mode; fit puts it back in train mode before each step)."""
        sums, everything = {}, list(range(len(self.held_out)))
        self.model.eval()
        for indices in make_batches(self.held_out, self.training.batch_size, whole_groups=self.training.loss == "infonce"):
            mine = [i for group in distributed.share(prompt_groups(self.held_out, indices)) for i in group]
            if not mine:
                continue
            batch, pairs, group, refs, _ = collate(self.held_out, mine, self.pad_id, self.shared_prompts)
            _, metrics = self._loss(self.model, batch, pairs, group, refs)
            # The loss is a mean over its units (loss_share), the other metrics over pairs.
            share = {"loss": self.loss_share(self.held_out, mine, everything)}
            sums = {k: sums.get(k, 0) + v.item() * share.get(k, len(mine) / len(everything)) for k, v in metrics.items()}
        return distributed.sum_values(sums)

    def loss_share(self, examples: list[Example], part: list[int], whole: list[int]) -> float:
        """The share of the whole's loss units in its part: pairs, or prompt groups for infonce."""
        if self.training.loss != "infonce":
            return len(part) / len(whole)
        return len(prompt_groups(examples, part)) / len(prompt_groups(examples, whole))

    def state(self) -> dict:
        """Where training is: what a checkpoint's state.json holds."""
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "total_steps": self.total_steps,
                "seed": self.seed, "data_sha256": fingerprint(self.train_examples), "best": self.best,
                "stopped_early": self.stopped_early}

    def restore(self, state: dict, adapter_weights: dict, optimizer_state: dict) -> None:
        """Continue from a saved Trainer.state, adapter weights and optimizer state ({name: array} each)."""
        self.model.load_weights(list(adapter_weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(optimizer_state.items()))
        self._compile()  # the compiled update must capture the new state dict
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best, self.stopped_early = state.get("best"), state.get("stopped_early", False)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def initial_dpo_loss(self) -> tuple[float, float]:
        """The DPO loss of the first step's first micro-batch before its update, with dropout off (eval mode), and
        what it is at policy == reference (ln 2 for sigmoid; for infonce the mean of ln(k + 1) over its prompts).

        From round 2 on (training.rounds) the adapter does not start at zero, and LoRA dropout
        would make the policy differ from the model that scored.
        """
        t, indices = self.training, self.next_micro_batches()[0][0]
        batch, pairs, group, refs, _ = collate(self.train_examples, indices, self.pad_id, self.shared_prompts)
        _, metrics = self._loss(self.model.eval(), batch, pairs, group, refs)
        nll = metrics["nll_loss"].item() if "nll_loss" in metrics else 0.0
        negatives = [len(g) for g in prompt_groups(self.train_examples, indices)] if t.loss == "infonce" else [1]
        expected = sum(initial_loss(t.beta, t.loss, t.label_smoothing, k) for k in negatives) / len(negatives)
        return metrics["loss"].item() - t.nll_weight * nll, expected

    def check_first_step(self, initial: tuple[float, float], metrics: dict, before: dict) -> None:
        """Stop unless the loss before the first update is the one at policy == reference (initial_dpo_loss), and the
        first step (its metrics; the adapter `before` it) had a gradient and changed the adapter."""
        dpo_loss, expected = initial
        if abs(dpo_loss - expected) > INITIAL_LOSS_TOLERANCE:
            raise TrainingStopped(
                f"first loss {dpo_loss:.6f} is not {expected:.6f} (policy == reference): either the adapter "
                "does not start at zero (in a later round: as the previous round's) or the stored reference "
                "log-probs do not match this model and tokenizer; sample the pairs again with this model"
            )
        if not metrics["grad_norm"] > 0:
            raise TrainingStopped("the first gradient is zero: nothing would be learned; check lora.keys and the data")
        after = dict(tree_flatten(self.model.trainable_parameters()))
        if all(mx.array_equal(before[k], after[k]).item() for k in before):
            raise TrainingStopped("the first update left the adapter unchanged; check training.learning_rate")


def save_checkpoint(trainer: Trainer, run, config: dict) -> Path:
    """The adapter, the optimizer state and Trainer.state as RUN_DIR/checkpoints/step-NNNNNN, written whole, unless
    that step's checkpoint is there already (the held-out evaluation saves the step it selects).

    state.json goes last, with the sha256 of the other files (rundir.write_checkpoint_state). Rank 0 alone looks in
    the run directory and writes: on another machine a rank may find no such folder, another run's or one it may
    not read there, and since it writes nothing, whether the step is saved is no question for it.
    """
    directory = checkpoint_dir(run.dir, trainer.step)
    if not distributed.is_main() or (directory / STATE_FILE).is_file():
        return directory
    optimizer_state = dict(tree_flatten(trainer.optimizer.state))
    with atomic_folder(directory, replace=True) as staging:
        write_adapter(staging, trainer.model, config)
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), optimizer_state)
        write_checkpoint_state(staging, trainer.state())
    run.events.emit("checkpoint_saved", step=trainer.step, path=str(directory),
                    sha256=sha256_of(directory / ADAPTER_WEIGHTS))
    return directory


def checkpoint_tensors(trainer: Trainer) -> dict:
    """{file: {name: (safetensors dtype, shape)}}: what a checkpoint of this trainer holds (rundir.checkpoint_problem)."""
    parameters = trainer.model.trainable_parameters()
    fresh = type(trainer.optimizer)(learning_rate=0.0)
    fresh.init(parameters)  # zeros, never computed: only their names, shapes and dtypes are read

    def described(tree) -> dict:
        return {name: (SAFETENSORS_DTYPE_NAMES.get(value.dtype, str(value.dtype)), tuple(value.shape))
                for name, value in tree_flatten(tree)}

    return {ADAPTER_WEIGHTS: described(parameters), OPTIMIZER_FILE: described(fresh.state)}


def resume_checkpoint(trainer: Trainer, run) -> Path | None:
    """The newest checkpoint that is whole and holds this recipe's adapter; each newer one is reported and set aside."""
    good, damaged = usable_checkpoint(run.dir, checkpoint_tensors(trainer))
    if damaged and good is None:
        raise no_checkpoint_left(run.dir, damaged)
    for path, problem in damaged:
        aside = set_aside(path)
        logger.warning(f"checkpoint {path} is damaged: {problem}; set aside as {aside.name}, continuing from "
                       f"{good.name if good else 'the first step'}")
    return good


def restore_checkpoint(trainer: Trainer, run, directory: Path) -> None:
    """Continue from a checkpoint that resume_checkpoint found whole."""
    state = read_checkpoint_state(directory)
    if state["data_sha256"] != fingerprint(trainer.train_examples):
        raise UserError(f"{run.path(PAIRS_FILE)} changed since {directory}; the run cannot continue "
                        "exactly: start a new run with --set run_name=NEW", key="--resume")
    trainer.restore(state, mx.load(str(directory / ADAPTER_WEIGHTS)), mx.load(str(directory / OPTIMIZER_FILE)))


def share_main_state(trainer: Trainer) -> None:
    """Rank 0's adapter, optimizer state and position (a checkpoint it resumed from, in its run directory) on every rank."""
    if distributed.size() == 1:
        return
    state = distributed.from_main(trainer.state)
    weights = distributed.arrays_from_main(dict(tree_flatten(trainer.model.trainable_parameters())))
    optimizer_state = distributed.arrays_from_main(dict(tree_flatten(trainer.optimizer.state)))
    if not distributed.is_main():
        trainer.restore(state, weights, optimizer_state)


def not_finite(trainer: Trainer, run, metrics: dict) -> TrainingStopped:
    """The stop for a NaN or infinite step, naming the checkpoint to continue from and the command that does.

    Every rank stops at the same step (the metrics are summed over the ranks); the checkpoint is rank 0's to name.
    """

    def newest() -> str | None:
        good, _ = usable_checkpoint(run.dir)
        return good and str(good)

    good = distributed.from_main(newest)
    lower = f"{trainer.training.learning_rate / 10:.3g}"
    start = f"from {good}" if good else "from the first step (no checkpoint yet)"
    return TrainingStopped(
        f"step {trainer.step}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} is not finite; "
        f"continue {start} with a lower learning rate: run the same command with --resume --set "
        f"training.learning_rate={lower}"
    )


@contextlib.contextmanager
def stop_after_step_on_sigint():
    """Ctrl+C sets the event this yields (stop at the end of the current step); a second one interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield stop
        return

    def request_stop(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def report(trainer: Trainer, events, window: list[dict], seconds: float, started: float, first_step: int) -> None:
    """The window's mean metrics and the stage's progress, as events."""
    metrics = {k: sum(m[k] for m in window) / len(window) for k in window[0] if k not in ("tokens", "rank_tokens")}
    tokens_per_second = sum(m["tokens"] for m in window) / max(seconds, 1e-9)
    metrics.update(tokens_per_second=tokens_per_second, peak_memory_gb=mx.get_peak_memory() / 1e9)
    ranks = [sum(n) for n in zip(*(m["rank_tokens"] for m in window))] if "rank_tokens" in window[0] else [0]
    rates = distributed.per_rank_rates(ranks, seconds)
    events.emit("metrics", stage="train", split="train", step=trainer.step, epoch=trainer.epoch, **metrics, **rates)
    steps_per_second = (trainer.step - first_step) / max(time.time() - started, 1e-9)
    events.emit("progress", stage="train", done=trainer.step, total=trainer.total_steps, unit="steps",
                rate=steps_per_second, tokens_per_second=tokens_per_second,
                eta_seconds=(trainer.total_steps - trainer.step) / steps_per_second, **rates)


class Probe:
    """Held-out prompts answered greedily during training: the share that loops or copies its context, and their
    length, then and before."""

    def __init__(self, trainer: Trainer, count: int, max_tokens: int):
        examples = {e.prompt_id: e for e in trainer.held_out}  # one per prompt: a prompt has k pairs
        probed = [examples[key] for key in sorted(examples)[:count]]
        self.prompts, self.contexts = [e.prompt for e in probed], [e.context for e in probed]
        self.with_context = sum(1 for context in self.contexts if context)
        self.trainer, self.settings = trainer, SamplerSettings(0.0, 1.0, max_tokens)
        with adapter_disabled(trainer.model):
            self.before = self.answer()

    def answer(self) -> dict:
        """Answers in a repetition loop ("loops"), answers that copy their context ("echoes", as compare's
        context_echo), and the mean answer length in tokens ("tokens")."""
        model = self.trainer.model.eval()

        def answered(part: list[int]) -> list[list]:
            answers = generate_answers(model, self.trainer.tokenizer, [self.prompts[i] for i in part], self.settings,
                                       self.trainer.seed, keys=part, batch_size=len(part))
            return [[repetition_loop(a.text), copies_context(a.text, self.contexts[i]), len(a.token_ids)]
                    for a, i in zip(answers, part)]

        answers = distributed.split_work(list(range(len(self.prompts))), answered)
        return {"loops": sum(a[0] for a in answers), "echoes": sum(a[1] for a in answers),
                "tokens": sum(a[2] for a in answers) / len(answers)}


SELECTION_METRICS = {"eval_loss": ("loss", 1.0), "eval_reward_accuracy": ("rewards/accuracies", -1.0)}
# The held-out evidence a stage summary (and each round's) ends with: the DPO loss, reward accuracy, probe loops and
# (for prompts with a context) probe echoes.
HELD_OUT_SUMMARY = ("loss", "rewards/accuracies", "generation/repetition_loop", "generation/context_echo")


def evaluate_held_out(trainer: Trainer, run, config: dict, probe: Probe | None) -> tuple[bool, dict]:
    """Held-out metrics and probe answers as an event; select the step if it is the best; whether to stop early, and
    the metrics."""
    t, events = trainer.training, run.events
    metrics = trainer.held_out_metrics()
    excess = 0
    if probe:
        now, before = probe.answer(), probe.before
        metrics.update({"generation/repetition_loop": now["loops"] / len(probe.prompts),
                        "generation/answer_tokens": now["tokens"]})
        excess = max(now["loops"] - before["loops"], 0)
        if excess:
            events.emit("note", level="warning", text=f"step {trainer.step}: {now['loops']} of {len(probe.prompts)} "
                        f"held-out answers loop ({before['loops']} before training)")
        if probe.with_context:
            metrics["generation/context_echo"] = now["echoes"] / probe.with_context
            if now["echoes"] > before["echoes"]:
                events.emit("note", level="warning", text=f"step {trainer.step}: {now['echoes']} of "
                            f"{probe.with_context} held-out answers copy their context ({before['echoes']} before "
                            "training)")
    events.emit("metrics", stage="train", split="eval", step=trainer.step, epoch=trainer.epoch, **metrics)
    if t.select_checkpoint == "last":
        return False, metrics
    name, sign = SELECTION_METRICS[t.select_checkpoint]
    # Fewer answers that loop more than before training first, then the held-out metric.
    key = (excess, sign * metrics[name])
    best = trainer.best
    if best is None or key < (best["excess_loops"], sign * best["value"]):
        trainer.best = {"step": trainer.step, "value": metrics[name], "excess_loops": excess}
        save_checkpoint(trainer, run, config)  # the selected adapter must be on disk
        return False, metrics
    patience = t.early_stopping_patience
    if patience and (trainer.step - best["step"]) // t.eval_every >= patience:
        events.emit("note", level="info", text=f"stopping early at step {trainer.step}: {name} has not improved "
                    f"for {patience} evaluations since step {best['step']}")
        return True, metrics
    return False, metrics


def write_final_adapter(trainer: Trainer, run, config: dict) -> dict:
    """adapters/: the selected step's adapter (the last step's unless training.select_checkpoint says otherwise)."""
    t, best = trainer.training, trainer.best
    if t.select_checkpoint == "last" or best is None:
        selected = {"step": trainer.step, "selected_by": "last"}
        if not distributed.is_main():
            return selected
        save_adapter(trainer.model, run.path(ADAPTERS_DIR), {**config, "mipo": {**config["mipo"], **selected}})
        return selected
    selected = {"step": best["step"], "selected_by": t.select_checkpoint, "value": best["value"],
                "excess_loops": best["excess_loops"]}
    if not distributed.is_main():
        return selected
    with atomic_folder(run.path(ADAPTERS_DIR), replace=True) as staging:
        shutil.copy(checkpoint_dir(run.dir, best["step"]) / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
        (staging / ADAPTER_CONFIG).write_text(json.dumps({**config, "mipo": {**config["mipo"], **selected}}, indent=2))
    return selected


def evaluates_before_last(step: int, total_steps: int, eval_every: int) -> bool:
    """Whether a periodic held-out evaluation comes at this step: not less than half an interval before the last
    step's, which would repeat it at the same cost (an evaluation costs a few steps)."""
    return step % eval_every == 0 and 2 * (total_steps - step) >= eval_every


def fit(trainer: Trainer, run, config: dict) -> dict:
    """Train to the last step (or an early stop), with reports, held-out evidence and checkpoints; adapters/ at the end."""
    t, events, model = trainer.training, run.events, trainer.model
    events.emit("stage_started", stage="train", total=trainer.total_steps, unit="steps")
    probe = Probe(trainer, t.probe_prompts, run.recipe.eval.max_tokens) if trainer.held_out and t.probe_prompts else None
    started, first_step, window, window_start = time.time(), trainer.step, [], time.time()
    held_out = None  # the last held-out evaluation's metrics
    with stop_after_step_on_sigint() as stop:
        while trainer.step < trainer.total_steps and not trainer.stopped_early:
            before = dict(tree_flatten(model.trainable_parameters())) if trainer.step == first_step == 0 else None
            initial = trainer.initial_dpo_loss() if before is not None else None
            model.train()
            metrics = trainer.train_step()
            if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm")):
                raise not_finite(trainer, run, metrics)
            if before is not None:
                trainer.check_first_step(initial, metrics, before)
            window.append(metrics)
            last_step = trainer.step == trainer.total_steps
            if trainer.step % t.report_every == 0 or last_step:
                report(trainer, events, window, time.time() - window_start, started, first_step)
                window = []
            if trainer.held_out and (last_step or evaluates_before_last(trainer.step, trainer.total_steps, t.eval_every)):
                trainer.stopped_early, held_out = evaluate_held_out(trainer, run, config, probe)
            # Every rank stops after the same step (Ctrl+C reaches each at its own moment).
            stopping = distributed.any_rank(stop.is_set()) and not last_step and not trainer.stopped_early
            if trainer.step % t.save_every == 0 or last_step or stopping or trainer.stopped_early:
                checkpoint = save_checkpoint(trainer, run, config)
            if stopping:
                events.emit("note", level="info", text=f"stopped; checkpoint {checkpoint}")
                raise KeyboardInterrupt
            if not window:  # evaluation and checkpoints do not count against the training speed
                window_start = time.time()
    model.eval()
    selected = write_final_adapter(trainer, run, config)
    summary = {"steps": trainer.step, "train_pairs": len(trainer.train_examples), "eval_pairs": len(trainer.held_out),
               "selected": selected,
               "held_out": held_out and {name: held_out[name] for name in HELD_OUT_SUMMARY if name in held_out}}
    events.emit("stage_finished", stage="train", seconds=time.time() - started, **summary)
    return summary


def provenance(recipe, loaded) -> dict:
    """What adapter_config.json records besides mlx-lm's keys: where the adapter came from."""
    template = loaded.tokenizer.chat_template or ""
    return {
        "revision": recipe.model.revision, "compute": loaded.compute, "seed": recipe.seed,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "sampling": vars(recipe.sampling), "training": vars(recipe.training),
    }


def run_stage(run, load_model) -> dict:
    recipe = run.recipe
    loaded = load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    if not lora_layers(model):
        mx.random.seed(derived_seed(recipe.seed, "lora"))
        apply_lora(model, recipe.lora)
    if run.round > 1:
        use_adapter(model, run.adapter_of_round(run.round - 1))  # go on from it: it is this round's reference
    pairs = distributed.pairs_from_main(lambda: read_pairs(run.path(PAIRS_FILE)))
    examples = build_examples(pairs, model, tokenizer, recipe.training.max_seq_length)
    train, held_out = split_examples(examples, recipe.training.eval_fraction, recipe.seed)
    if len(train) < recipe.training.batch_size:
        raise UserError(
            f"{len(train)} training pairs is fewer than training.batch_size {recipe.training.batch_size}; "
            "sample more prompts or lower the batch size", key="training.batch_size",
        )
    trainer = Trainer(model, tokenizer, train, held_out, recipe.training, recipe.seed)
    ranks, batch = distributed.size(), recipe.training.batch_size
    if batch % ranks:
        logger.info(f"training.batch_size {batch} does not divide among {ranks} ranks: each rank takes "
                    f"{-(-batch // ranks)} or {batch // ranks} of each batch's pairs (the same steps; the ranks with "
                    "more set the pace)")
    def resume():
        checkpoint = resume_checkpoint(trainer, run) if run.resumed else None
        if checkpoint:
            restore_checkpoint(trainer, run, checkpoint)

    distributed.from_main(resume)  # the checkpoints are rank 0's
    share_main_state(trainer)
    config = adapter_config(model, recipe.lora, recipe.model.path, **provenance(recipe, loaded))
    checkpointing = recipe.training.grad_checkpoint
    try:
        with checkpointed_layers(model.model.layers[0]) if checkpointing else contextlib.nullcontext():
            return fit(trainer, run, config)
    except TrainingStopped as error:
        raise UserError(str(error), key="training") from None
