"""The MIPO sampling stage: chosen and rejected answers with stored reference log-probs.

    mipo-mlx sample recipes/quickstart.yaml        # or as the first stage of `mipo-mlx train`

For each prompt x the chosen answer is the model's answer to x; the rejected answer is
the model's answer to a different prompt x' (recipe `sampling.negative`):
- random_prompt: another prompt of the set, by a seeded derangement (never x itself);
- drop_context: the same question with the user's context left out;
- swap_context: the same question with another user's context (never an identical one).
Both are stored as answers to the full prompt x, with log p_base(answer | x) summed over
answer tokens (scoring.score_answers: chat.encode_answer and scoring.answer_logprobs,
exactly what the trainer uses), so DPO needs no reference model. The pairs go to
RUN_DIR/pairs.jsonl as rundir.Pair records, through rundir.PairsWriter.

Resumable by construction: requests are generated in fixed chunks, each seeded by its
index alone; a pair is written (one flushed line) right after the chunk that completes
it. A rerun recovers answers from the pairs already written, regenerates the chunks it
still needs (identically), and appends the missing pairs in the same order.
"""

import random
import time
from dataclasses import dataclass

from mipo_mlx.chat import encode_prompt
from mipo_mlx.data import PromptRecord, check_negatives, read_prompts
from mipo_mlx.generation import Answer, SamplerSettings, generate_chunk
from mipo_mlx.metrics import repetition_loop, self_bleu
from mipo_mlx.rundir import PAIRS_FILE, MipoRecord, Pair, PairsWriter
from mipo_mlx.scoring import score_answers
from mipo_mlx.seeds import derived_seed


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
    check_negatives(records, strategy)
    contexts = sorted({r.context for r in records if r.context})
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


def known_answers(pairs: dict[str, Pair]) -> dict[str, Answer]:
    """Answers recovered from written pairs, by request id."""
    answers = {}
    for pair in pairs.values():
        requests, finish = pair.mipo.requests, pair.mipo.finish
        answers[requests["chosen"]] = Answer(pair.chosen_text, [], finish["chosen"])
        answers[requests["rejected"]] = Answer(pair.rejected_text, [], finish["rejected"])
    return answers


class ChunkedAnswers:
    """Answers by request id: recovered from written pairs, else generated with the whole chunk that holds them.

    Requests are cut into chunks of `chunk_size` in their canonical order, and a chunk's
    sampler is seeded by its index alone, so an answer is the same whichever chunks ran before.
    """

    def __init__(self, loaded, requests: list[Request], chunk_size: int, settings: SamplerSettings, seed: int,
                 known: dict[str, Answer]):
        self.loaded, self.requests, self.chunk_size = loaded, requests, chunk_size
        self.settings, self.seed = settings, seed
        self.answers = dict(known)
        self.chunk_of = {r.id: i // chunk_size for i, r in enumerate(requests)}
        self.chunks = -(-len(requests) // chunk_size)
        self.generated_chunks: set[int] = set()
        self.generated_tokens = 0

    def get(self, request: Request) -> Answer:
        if request.id not in self.answers:
            self._generate(self.chunk_of[request.id])
        return self.answers[request.id]

    def _generate(self, index: int) -> None:
        members = self.requests[index * self.chunk_size : (index + 1) * self.chunk_size]
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        prompts = [encode_prompt(tokenizer, r.messages) for r in members]
        for member, answer in zip(members, generate_chunk(model, tokenizer, prompts, self.settings, self.seed, index)):
            self.answers.setdefault(member.id, answer)
            self.generated_tokens += len(answer.token_ids)
        self.generated_chunks.add(index)


def make_pair(plan: PairPlan, chosen: Answer, rejected: Answer, logps: list[float], counts: list[tuple[int, int]],
              sampling, model: str, seed: int) -> Pair:
    """The pairs.jsonl record of a planned pair: its answers, their reference log-probs (chosen, rejected) and counts."""
    return Pair(
        prompt=plan.record.messages(),
        chosen=[{"role": "assistant", "content": chosen.text}],
        rejected=[{"role": "assistant", "content": rejected.text}],
        mipo=MipoRecord(
            id=plan.id,
            prompt_id=plan.record.id,
            strategy=sampling.negative,
            negative_source=plan.negative_source,
            negative_prompt=plan.rejected.messages,
            ref_logps={"chosen": logps[0], "rejected": logps[1]},
            pmi=logps[0] - logps[1],
            tokens={"prompt": counts[0][0], "chosen": counts[0][1], "rejected": counts[1][1]},
            finish={"chosen": _finish(chosen), "rejected": _finish(rejected)},
            requests={"chosen": plan.chosen.id, "rejected": plan.rejected.id},
            sampling={"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens},
            model=model,
            seed=seed,
        ),
    )


def sample_pairs(plans: list[PairPlan], answers: ChunkedAnswers, recipe) -> list[Pair]:
    """The planned pairs with both answers (generated as needed) and their reference log-probs."""
    loaded = answers.loaded
    sides = [(answers.get(plan.chosen), answers.get(plan.rejected)) for plan in plans]
    # Both answers are scored as answers to the full prompt x.
    items = [(plan.record.messages(), answer.text) for plan, both in zip(plans, sides) for answer in both]
    logps, counts = score_answers(loaded.model, loaded.tokenizer, items) if items else ([], [])
    return [make_pair(plan, chosen, rejected, logps[2 * n : 2 * n + 2], counts[2 * n : 2 * n + 2],
                      recipe.sampling, loaded.source, recipe.seed)
            for n, (plan, (chosen, rejected)) in enumerate(zip(plans, sides))]


def drop_reason(pair: Pair, sampling) -> str | None:
    """Why the optional filters drop a pair ("identical", "empty", "truncated", "looping", "similar"), or None."""
    chosen, rejected = pair.chosen_text, pair.rejected_text
    if sampling.drop_identical and chosen.strip() == rejected.strip():
        return "identical"
    if sampling.drop_empty and (not chosen.strip() or not rejected.strip()):
        return "empty"
    if sampling.drop_truncated and "length" in pair.mipo.finish.values():
        return "truncated"
    if sampling.drop_looping and repetition_loop(chosen):
        return "looping"  # DPO would push the model towards the loop
    if sampling.drop_similar is not None and self_bleu([chosen, rejected]) >= sampling.drop_similar:
        return "similar"  # the pair says little about the prompt: nearly the same answer either way
    return None


def resume_point(plans: list[PairPlan], due: dict[str, int], written: dict[str, Pair]) -> tuple[int, list[PairPlan]]:
    """The chunk to start from and the pairs still to make: those not written, from the last written pair's chunk on."""
    last_written_due = max((due[i] for i in written if i in due), default=-1)
    return max(last_written_due, 0), [p for p in plans if p.id not in written and due[p.id] >= last_written_due]


def run_stage(run, load_model) -> dict:
    recipe, sampling = run.recipe, run.recipe.sampling
    records = read_prompts(recipe.data.train, recipe.data.format, recipe.data.on_bad_line)[: recipe.data.max_prompts]
    requests, plans = plan_pairs(records, sampling.negative, sampling.negatives_per_prompt, recipe.seed)
    pairs_file = PairsWriter(run.path(PAIRS_FILE))
    settings = SamplerSettings(sampling.temperature, sampling.top_p, sampling.max_tokens)
    answers = ChunkedAnswers(load_model(), requests, sampling.batch_size, settings, recipe.seed,
                             known_answers(pairs_file.written))
    # A pair is due once the later of its two requests' chunks is done.
    due = {p.id: max(answers.chunk_of[p.chosen.id], answers.chunk_of[p.rejected.id]) for p in plans}
    first_chunk, pending = resume_point(plans, due, pairs_file.written)
    run.events.emit("stage_started", stage="sample", total=len(plans), unit="pairs")
    started, written_now, dropped = time.time(), 0, {}
    for chunk in range(first_chunk, answers.chunks):
        for pair in sample_pairs([p for p in pending if due[p.id] == chunk], answers, recipe):
            reason = drop_reason(pair, sampling)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                pairs_file.append(pair)
                written_now += 1
        elapsed = max(time.time() - started, 1e-9)
        run.events.emit(
            "progress", stage="sample", done=sum(1 for p in plans if due[p.id] <= chunk), total=len(plans),
            unit="pairs", rate=written_now / elapsed, tokens_per_second=answers.generated_tokens / elapsed,
            eta_seconds=elapsed / (chunk - first_chunk + 1) * (answers.chunks - chunk - 1),
        )
    pairs_file.close()
    summary = {"pairs": len(pairs_file.written), "planned": len(plans), "dropped": dropped,
               "generated_chunks": len(answers.generated_chunks), "tokens": answers.generated_tokens}
    run.events.emit("stage_finished", stage="sample", seconds=time.time() - started, **summary)
    return summary
