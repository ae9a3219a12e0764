"""The MIPO sampling stage: chosen and rejected answers with stored reference log-probs.

    mipo-mlx sample recipes/quickstart.yaml        # or as the first stage of `mipo-mlx train`

For each prompt x the chosen answer is the model's answer to x; the rejected answer is
the model's answer to a different prompt x' (recipe `sampling.negative`):
- random_prompt: another prompt of the set, by a seeded derangement (never x itself);
- drop_context: the same question with the user's context left out;
- swap_context: the same question with another user's context (never an identical one).
Both are stored as answers to the full prompt x, with log p_base(answer | x) summed over
answer tokens (chat.encode_answer + scoring.answer_logprobs, exactly what the trainer
uses), so DPO needs no reference model.

Resumable by construction: requests are generated in fixed chunks, each seeded by its
index alone; a pair is written (one flushed line) right after the chunk that completes
it. A rerun recovers answers from the pairs already written, regenerates the chunks it
still needs (identically), and appends the missing pairs in the same order.
"""

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mipo_mlx.chat import encode_answer, encode_prompt
from mipo_mlx.data import PromptRecord, read_prompts
from mipo_mlx.errors import UserError
from mipo_mlx.generation import Answer, SamplerSettings, derived_seed, generate_chunk
from mipo_mlx.scoring import answer_logprobs, pad_batch

PAIRS_FILE = "pairs.jsonl"
SCORING_ROWS = 8  # sequences per reference forward; bounds the (rows, T, vocab) logits
LINE_SEPARATORS = ("\x85", "\u2028", "\u2029")  # line breaks to str.splitlines that json.dumps keeps raw


@dataclass
class Request:
    """One answer to generate: a prompt's messages."""

    id: str
    messages: list[dict]


@dataclass
class PairPlan:
    id: str
    record: PromptRecord
    chosen: Request
    rejected: Request
    negative_source: str


def derangement(n: int, rng: random.Random) -> list[int]:
    """A random permutation with no fixed point (n >= 2)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def plan_pairs(records: list[PromptRecord], strategy: str, k: int, seed: int) -> tuple[list[Request], list[PairPlan]]:
    """Every request to generate and every pair to make, in one canonical order."""
    if strategy in ("drop_context", "swap_context") and not all(r.context for r in records):
        missing = next(r.id for r in records if not r.context)
        raise UserError(
            f"the {strategy} negative needs a context on every prompt, and {missing!r} has none; "
            "use prompts with 'context' or a system message, or sampling.negative: random_prompt",
            key="sampling.negative",
        )
    if len(records) < 2 and strategy != "drop_context":
        raise UserError(f"the {strategy} negative needs at least 2 prompts", key="data.train")
    contexts = sorted({r.context for r in records if r.context})
    if strategy == "swap_context" and len(contexts) < 2:
        raise UserError("swap_context needs at least 2 different contexts in the data", key="sampling.negative")
    positives = {r.id: Request(f"{r.id}/chosen", r.messages()) for r in records}
    requests, pairs = [], []
    rng = random.Random(derived_seed(seed, "negatives"))
    derangements = [derangement(len(records), rng) for _ in range(k)] if strategy == "random_prompt" else []
    for index, record in enumerate(records):
        requests.append(positives[record.id])
        for j in range(k):
            if strategy == "random_prompt":
                other = records[derangements[j][index]]
                negative, source = positives[other.id], other.id
            elif strategy == "drop_context":
                negative = Request(f"{record.id}/no-context/{j}", record.messages(context=None))
                source = f"{record.id} without context"
                requests.append(negative)
            else:
                others = [c for c in contexts if c != record.context]
                context = others[rng.randrange(len(others))]
                owner = next(r.id for r in records if r.context == context)
                negative = Request(f"{record.id}/context-of/{owner}/{j}", record.messages(context=context))
                source = f"context of {owner}"
                requests.append(negative)
            pairs.append(PairPlan(f"{record.id}#{j}", record, positives[record.id], negative, source))
    return requests, pairs


def _finish(answer: Answer) -> str:
    return answer.finish_reason if answer.finish_reason in ("stop", "length") else "length"


def reference_logps(model, tokenizer, items: list[tuple[list[dict], str]]) -> tuple[list[float], list[tuple[int, int]]]:
    """log p(answer | prompt) under `model` for (messages, answer) items, and (prompt, answer) token counts."""
    encoded = [encode_answer(tokenizer, messages, answer) for messages, answer in items]
    logps = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(encoded), SCORING_ROWS):
        chunk = encoded[start : start + SCORING_ROWS]
        tokens, mask = pad_batch([ids for ids, _ in chunk], [s for _, s in chunk], pad_id)
        values = answer_logprobs(model, tokens, mask)  # (rows,)
        mx.eval(values)
        logps += values.tolist()
    return logps, [(start, len(ids) - start) for ids, start in encoded]


class PairsFile:
    """The append-only pairs JSONL: what is written, and a flushed append per pair."""

    def __init__(self, path: Path):
        self.path = path
        self.written: dict[str, dict] = {}
        if path.exists():
            raw = path.read_bytes()
            complete = raw[: raw.rfind(b"\n") + 1]
            if len(complete) != len(raw):
                # A kill mid-write leaves a partial last line; drop only that.
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            # Split on b"\n" only: str.splitlines would also split inside a string at U+2028 or U+0085.
            for number, line in enumerate(complete.split(b"\n")[:-1], start=1):
                try:
                    pair = json.loads(line)
                    self.written[pair["mipo"]["id"]] = pair
                except (ValueError, TypeError, KeyError):
                    raise UserError(f"{path}:{number}: not a pair written by mipo-mlx; move the file away to sample again") from None
        self._file = open(path, "a", encoding="utf-8")

    def known_answers(self) -> dict[str, Answer]:
        """Answers recovered from written pairs, by request id."""
        answers = {}
        for pair in self.written.values():
            meta = pair["mipo"]
            for side in ("chosen", "rejected"):
                answers[meta["requests"][side]] = Answer(
                    pair[side][0]["content"], [], meta["finish"][side]
                )
        return answers

    def append(self, pair: dict) -> None:
        line = json.dumps(pair, ensure_ascii=False)
        # JSON leaves these raw in strings, but readers that split on them (str.splitlines) would tear the line.
        for separator in LINE_SEPARATORS:
            line = line.replace(separator, f"\\u{ord(separator):04x}")
        self._file.write(line + "\n")
        self._file.flush()
        self.written[pair["mipo"]["id"]] = pair

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()


def keep_pair(pair: dict, sampling) -> str | None:
    """Why a pair is dropped by the optional filters, or None to keep it."""
    chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
    if sampling.drop_identical and chosen.strip() == rejected.strip():
        return "identical"
    if sampling.drop_empty and (not chosen.strip() or not rejected.strip()):
        return "empty"
    if sampling.drop_truncated and "length" in pair["mipo"]["finish"].values():
        return "truncated"
    return None


def run_stage(run) -> dict:
    recipe = run.recipe
    sampling = recipe.sampling
    records = read_prompts(recipe.data.train, recipe.data.format, recipe.data.on_bad_line)
    if recipe.data.max_prompts:
        records = records[: recipe.data.max_prompts]
    requests, plans = plan_pairs(records, sampling.negative, sampling.negatives_per_prompt, recipe.seed)
    chunk_of = {r.id: i // sampling.batch_size for i, r in enumerate(requests)}
    # A pair is due once the later of its two requests' chunks is done.
    due = {p.id: max(chunk_of[p.chosen.id], chunk_of[p.rejected.id]) for p in plans}
    pairs_file = PairsFile(run.path(PAIRS_FILE))
    answers = pairs_file.known_answers()
    settings = SamplerSettings(sampling.temperature, sampling.top_p, sampling.max_tokens)
    loaded = run.loaded_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    dropped = {}
    chunks = -(-len(requests) // sampling.batch_size)
    run.events.emit("stage_started", stage="sample", total=len(plans), unit="pairs")
    started, generated_tokens, written_now = time.time(), 0, 0
    last_written_due = max((due[i] for i in pairs_file.written if i in due), default=-1)
    pending = [p for p in plans if p.id not in pairs_file.written and due[p.id] >= last_written_due]
    generated_chunks: set[int] = set()

    def ensure(request: Request) -> None:
        nonlocal generated_tokens
        if request.id in answers:
            return
        index = chunk_of[request.id]
        members = requests[index * sampling.batch_size : (index + 1) * sampling.batch_size]
        prompts = [encode_prompt(tokenizer, r.messages) for r in members]
        for member, answer in zip(members, generate_chunk(model, tokenizer, prompts, settings, recipe.seed, index)):
            answers.setdefault(member.id, answer)
            generated_tokens += len(answer.token_ids)
        generated_chunks.add(index)

    for chunk in range(max(last_written_due, 0), chunks):
        ready = [p for p in pending if due[p.id] == chunk]
        for plan in ready:
            ensure(plan.chosen)
            ensure(plan.rejected)
        items = [(p.record.messages(), answers[side.id].text) for p in ready for side in (p.chosen, p.rejected)]
        logps, counts = reference_logps(model, tokenizer, items) if items else ([], [])
        for n, plan in enumerate(ready):
            chosen, rejected = answers[plan.chosen.id], answers[plan.rejected.id]
            pair = {
                "prompt": plan.record.messages(),
                "chosen": [{"role": "assistant", "content": chosen.text}],
                "rejected": [{"role": "assistant", "content": rejected.text}],
                "mipo": {
                    "id": plan.id,
                    "prompt_id": plan.record.id,
                    "strategy": sampling.negative,
                    "negative_source": plan.negative_source,
                    "negative_prompt": plan.rejected.messages,
                    "ref_logps": {"chosen": logps[2 * n], "rejected": logps[2 * n + 1]},
                    "pmi": logps[2 * n] - logps[2 * n + 1],
                    "tokens": {"prompt": counts[2 * n][0], "chosen": counts[2 * n][1], "rejected": counts[2 * n + 1][1]},
                    "finish": {"chosen": _finish(chosen), "rejected": _finish(rejected)},
                    "requests": {"chosen": plan.chosen.id, "rejected": plan.rejected.id},
                    "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens},
                    "model": loaded.source,
                    "seed": recipe.seed,
                },
            }
            reason = keep_pair(pair, sampling)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                pairs_file.append(pair)
                written_now += 1
        elapsed = max(time.time() - started, 1e-9)
        done = sum(1 for p in plans if due[p.id] <= chunk)
        remaining_chunks = chunks - chunk - 1
        run.events.emit(
            "progress", stage="sample", done=done, total=len(plans), unit="pairs",
            rate=written_now / elapsed,
            tokens_per_second=generated_tokens / elapsed,
            eta_seconds=elapsed / (chunk - max(last_written_due, 0) + 1) * remaining_chunks,
        )
    pairs_file.close()
    summary = {"pairs": len(pairs_file.written), "planned": len(plans), "dropped": dropped,
               "generated_chunks": len(generated_chunks), "tokens": generated_tokens}
    run.events.emit("stage_finished", stage="sample", seconds=time.time() - started, **summary)
    return summary
