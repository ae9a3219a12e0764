"""The MIPO sampling stage: chosen and rejected answers with stored reference log-probs.

    mipo-mlx sample recipes/quickstart.yaml        # or as the first stage of `mipo-mlx train`

For each prompt x the chosen answer is the model's answer to x; the rejected answer is
the model's answer to a different prompt x' (recipe `sampling.negative`):
- random_prompt: another prompt of the set, by a seeded derangement (never x itself);
- drop_context: the same question with the user's context left out;
- swap_context: the same question with another user's context (never an identical one).
With sampling.echo_pairs each prompt with a context also gets a pair whose rejected
answer is that context itself (strategy "echo"), in the rounds from sampling.echo_from_round
on: the answer that PMI with the context favours most, which a model trained on PMI alone
learns to give.
Both are stored as answers to the full prompt x, with log p_base(answer | x) summed over
answer tokens (scoring.score_pairs: chat.encode_answer and scoring.pair_token_logprobs,
exactly what the trainer uses), so DPO needs no reference model. The pairs go to
RUN_DIR/pairs.jsonl as rundir.Pair records, through rundir.PairsWriter.

Answers come from generation.answer_stream: every request's sampling noise is a function of
(seed, request id, token position), so an answer does not depend on the batch size or on
which requests were generated with it. Pairs are scored and written in fixed groups of
SCORING_PAIRS in the plan's order (the reference pass of a group is the same whatever
generated it), one flushed line per pair. A rerun recovers answers from the pairs already
written, generates only the answers it still needs (identically), and appends the missing
pairs in the same order: a killed run ends with exactly the pairs of an uninterrupted one.

Iterative MIPO (training.rounds): from round 2 on, the model that samples and scores is the
base with the previous round's adapter on (lora.use_adapter, as compare and eval put an
adapter on), so the stored reference log-probs are that model's, the reference its round
trains against; and the seed is the round's own (round_seed), so its answers draw new noise.

On several ranks (mlx.launch; distributed.py) rank r makes groups r, r + N, ... of each
round of N groups; rank 0 writes each round's pairs in the plan's order. The answers and
the groups being what one process makes, the pairs file is the one-process file; in a later
round every rank samples with rank 0's adapter of the round before (use_adapter) and the
round's seed.
"""

import random
import time
from dataclasses import dataclass

from mipo_mlx import distributed
from mipo_mlx.chat import encode_prompt
from mipo_mlx.data import PromptRecord, check_negatives, context_of, echoes_in, read_prompts, round_prompts
from mipo_mlx.generation import Answer, BatchDecoder, SamplerSettings, auto_batch_size
from mipo_mlx.lora import use_adapter
from mipo_mlx.metrics import echoed_words, repetition_loop, self_bleu
from mipo_mlx.rundir import PAIRS_FILE, MipoRecord, Pair, PairsWriter
from mipo_mlx.scoring import SCORING_ROWS, score_pairs
from mipo_mlx.seeds import derived_seed


@dataclass
class Request:
    """One answer to a prompt's messages: generated, or given (`text`, an echo pair's rejected answer)."""

    id: str
    messages: list[dict]
    text: str | None = None


@dataclass
class PairPlan:
    id: str
    record: PromptRecord
    chosen: Request
    rejected: Request
    negative_source: str
    strategy: str


def derangement(n: int, rng: random.Random) -> list[int]:
    """A random permutation with no fixed point (n >= 2)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def plan_pairs(records: list[PromptRecord], strategy: str, k: int, seed: int,
               echo_pairs: bool = False) -> list[PairPlan]:
    """Every pair to make, in one canonical order: each prompt's k pairs, then its echo pair."""
    check_negatives(records, strategy, echo_pairs)
    contexts = sorted({r.context for r in records if r.context})
    positives = {r.id: Request(f"{r.id}/chosen", r.messages()) for r in records}
    pairs = []
    rng = random.Random(derived_seed(seed, "negatives"))
    derangements = [derangement(len(records), rng) for _ in range(k)] if strategy == "random_prompt" else []
    for index, record in enumerate(records):
        for j in range(k):
            if strategy == "random_prompt":
                other = records[derangements[j][index]]
                negative, source = positives[other.id], other.id
            elif strategy == "drop_context":
                negative = Request(f"{record.id}/no-context/{j}", record.messages(context=None))
                source = f"{record.id} without context"
            else:
                others = [c for c in contexts if c != record.context]
                context = others[rng.randrange(len(others))]
                owner = next(r.id for r in records if r.context == context)
                negative = Request(f"{record.id}/context-of/{owner}/{j}", record.messages(context=context))
                source = f"context of {owner}"
            pairs.append(PairPlan(f"{record.id}#{j}", record, positives[record.id], negative, source, strategy))
        if echo_pairs and record.context:
            echo = Request(f"{record.id}/echo", record.messages(), text=record.context)
            pairs.append(PairPlan(f"{record.id}#echo", record, positives[record.id], echo, "its own context", "echo"))
    return pairs


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


# Pairs whose answers are scored in one reference pass (score_pairs runs SCORING_ROWS answers at a time).
SCORING_PAIRS = SCORING_ROWS // 2


class StreamedAnswers:
    """Answers by request id: recovered from written pairs, else taken from one generation job over all still needed."""

    def __init__(self, loaded, requests: list[Request], settings: SamplerSettings, seed: int, batch_size: int | None,
                 known: dict[str, Answer]):
        self.loaded = loaded
        self.answers = {**known, **{r.id: Answer(r.text, [], "stop") for r in requests if r.text is not None}}
        self.todo = list({r.id: r for r in requests if r.id not in self.answers}.values())  # canonical order, no repeats
        self.generated_answers = 0
        model, tokenizer = loaded.model, loaded.tokenizer
        prompts = [encode_prompt(tokenizer, r.messages) for r in self.todo]
        if batch_size is None:
            batch_size = auto_batch_size(model, max((len(p) for p in prompts), default=1), settings.max_tokens)
        self.decoder = BatchDecoder(model, tokenizer, prompts, settings, seed, [r.id for r in self.todo], batch_size)
        self.stream = self.decoder.answers()

    def get(self, request: Request) -> Answer:
        while request.id not in self.answers:
            index, answer = next(self.stream)
            self.answers[self.todo[index].id] = answer
            self.generated_answers += 1
        return self.answers[request.id]


def make_pair(plan: PairPlan, chosen: Answer, rejected: Answer, logps: tuple[float, float],
              public: tuple[float, float] | None, tokens: dict, sampling, model: str, seed: int) -> Pair:
    """The pairs.jsonl record of a planned pair: its answers, their reference log-probs (chosen, rejected), the same
    over their public part (score_pairs) and counts."""
    return Pair(
        prompt=plan.record.messages(),
        chosen=[{"role": "assistant", "content": chosen.text}],
        rejected=[{"role": "assistant", "content": rejected.text}],
        mipo=MipoRecord(
            id=plan.id,
            prompt_id=plan.record.id,
            strategy=plan.strategy,
            negative_source=plan.negative_source,
            negative_prompt=plan.rejected.messages,
            ref_logps={"chosen": logps[0], "rejected": logps[1],
                       **({"chosen_public": public[0], "rejected_public": public[1]} if public else {})},
            pmi=logps[0] - logps[1],
            tokens=tokens,
            finish={"chosen": _finish(chosen), "rejected": _finish(rejected)},
            requests={"chosen": plan.chosen.id, "rejected": plan.rejected.id},
            sampling={"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens},
            model=model,
            seed=seed,
        ),
    )


def sample_pairs(plans: list[PairPlan], answers: StreamedAnswers, recipe, seed: int) -> list[Pair]:
    """The planned pairs with both answers (generated as needed) and their reference log-probs."""
    loaded = answers.loaded
    sides = [(answers.get(plan.chosen), answers.get(plan.rejected)) for plan in plans]
    # Both answers are scored as answers to the full prompt x.
    items = [(plan.record.messages(), chosen.text, rejected.text) for plan, (chosen, rejected) in zip(plans, sides)]
    logps, publics, counts = score_pairs(loaded.model, loaded.tokenizer, items)
    return [make_pair(plan, chosen, rejected, pair_logps, public, tokens, recipe.sampling, loaded.source, seed)
            for plan, (chosen, rejected), pair_logps, public, tokens in zip(plans, sides, logps, publics, counts)]


def drop_reason(pair: Pair, sampling) -> str | None:
    """Why the optional filters drop a pair ("identical", "empty", "truncated", "looping", "echo", "similar"), or None."""
    chosen, rejected = pair.chosen_text, pair.rejected_text
    if sampling.drop_identical and chosen.strip() == rejected.strip():
        return "identical"
    if sampling.drop_empty and (not chosen.strip() or not rejected.strip()):
        return "empty"
    if sampling.drop_truncated and "length" in pair.mipo.finish.values():
        return "truncated"
    if sampling.drop_looping and repetition_loop(chosen):
        return "looping"  # DPO would push the model towards the loop
    if sampling.drop_echo is not None and echoed_words(chosen, context_of(pair.prompt_messages())) >= sampling.drop_echo:
        return "echo"  # DPO would teach the model to copy its context: the cheapest answer only the context explains
    if sampling.drop_similar is not None and self_bleu([chosen, rejected]) >= sampling.drop_similar:
        return "similar"  # the pair says little about the prompt: nearly the same answer either way
    return None


def round_seed(seed: int, number: int) -> int:
    """The sampling seed of round `number`: the recipe's seed in round 1, one derived from it after."""
    return seed if number == 1 else derived_seed(seed, "round", number)


def sampling_model(run, load_model):
    """The model that samples and scores the run's round: the base, with the previous round's adapter from round 2."""
    loaded = load_model()
    if run.round > 1:
        use_adapter(loaded.model, run.adapter_of_round(run.round - 1))
    return loaded


def run_stage(run, load_model) -> dict:
    recipe, sampling = run.recipe, run.recipe.sampling
    seed = round_seed(recipe.seed, run.round)
    records = read_prompts(recipe.data.train, recipe.data.format, recipe.data.on_bad_line)[: recipe.data.max_prompts]
    records = round_prompts(records, run.round, recipe.training.rounds, sampling.round_prompts)
    plans = plan_pairs(records, sampling.negative, sampling.negatives_per_prompt, seed, echoes_in(sampling, run.round))
    pairs_file = PairsWriter(run.path(PAIRS_FILE)) if distributed.is_main() else None
    written = {pair.mipo.id: pair for pair in distributed.pairs_from_main(lambda: pairs_file.written.values())}
    groups = [plans[start : start + SCORING_PAIRS] for start in range(0, len(plans), SCORING_PAIRS)]
    # Groups before the last one with a written pair are done (their other pairs were dropped by the filters).
    first = max((g for g, group in enumerate(groups) if any(p.id in written for p in group)), default=0)
    todo = [p for group in groups[first:] for p in group if p.id not in written]
    # Rank r makes groups first + r, first + r + size, ...: one round of groups at a time, written in order by rank 0.
    ranks, rank = distributed.size(), distributed.rank()
    mine = [p for group in groups[first + rank :: ranks] for p in group if p.id not in written]
    run.events.emit("stage_started", stage="sample", total=len(plans), unit="pairs")
    started, dropped, answers, tokens = time.time(), {}, None, [0] * ranks
    if todo:  # a finished pairs file: nothing to load or generate
        settings = SamplerSettings(sampling.temperature, sampling.top_p, sampling.max_tokens)
        answers = StreamedAnswers(sampling_model(run, load_model), [r for p in mine for r in (p.chosen, p.rejected)],
                                  settings, seed, sampling.batch_size, known_answers(written))
        to_generate = int(sum(distributed.per_rank(len(answers.todo))))
        run.events.emit("note", level="info", text=f"sampling: {to_generate} answers to generate, "
                        f"{answers.decoder.batch_size} at a time" + (f" on each of {ranks} ranks" if ranks > 1 else ""))
    generated = 0
    for start in range(first, len(groups), ranks) if todo else []:
        g = start + rank
        made = [pair.to_json() for pair in sample_pairs(groups[g], answers, recipe, seed)] if g < len(groups) else []
        parts = distributed.exchange([made, answers.decoder.generated_tokens, answers.generated_answers])
        # The whole group is scored, written pairs too, so that its reference pass is the uninterrupted run's.
        for pair in (Pair.from_json(record) for made, _, _ in parts for record in made):
            if pair.mipo.id in written:
                continue
            reason = drop_reason(pair, sampling)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                written[pair.mipo.id] = pair
                if pairs_file:
                    pairs_file.append(pair)
        tokens, generated = [part[1] for part in parts], sum(part[2] for part in parts)
        done = min(start + ranks, len(groups))
        elapsed = max(time.time() - started, 1e-9)
        run.events.emit(
            "progress", stage="sample", done=min(done * SCORING_PAIRS, len(plans)), total=len(plans),
            unit="pairs", rate=(done - first) * SCORING_PAIRS / elapsed, tokens_per_second=sum(tokens) / elapsed,
            eta_seconds=elapsed / (done - first) * (len(groups) - done), **distributed.per_rank_rates(tokens, elapsed),
        )
    if pairs_file:
        pairs_file.close()
    summary = {"pairs": len(written), "planned": len(plans), "dropped": dropped, "generated_answers": generated,
               "tokens": sum(tokens)}
    run.events.emit("stage_finished", stage="sample", seconds=time.time() - started, **summary)
    return summary
