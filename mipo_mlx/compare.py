"""Before and after: held-out answers of the base and the adapted model, and their metrics.

    mipo-mlx compare runs/quickstart              # also the last stage of `mipo-mlx train`

One loaded model answers each held-out prompt twice, adapter off and on, with the same
sampler and seed; the adapter is the run's final one (its last round's, training.rounds;
on several ranks rank 0's, and each rank answers its share of the prompts: distributed.py).
Written to RUN_DIR/compare/: answers.jsonl (side by side, with the per-prompt preference
checks), metrics.json and report.md. Every metric has its sample size, a bootstrap 95%
interval, and a paired permutation test of after vs before (a metric with nothing to
measure, such as Self-BLEU of one answer, is null in metrics.json and n/a in the report):
- mutual information on the held-out pairs (those the trainer set aside): the PMI
  estimate log p(y | x) - log p(y | x'), with y the chosen answer, x its prompt and x'
  the prompt the negative came from, under the base and under the adapted model; and the
  DPO reward margin and accuracy of the adapted model (zero before, by definition);
- preference adherence (prompts whose stated preferences a program can check), overall
  and per preference kind;
- accuracy on verifiable tasks (records with a gold answer): exact match of the final
  number (math) or of the answer letter (multiple choice), asked in the paper's prompt
  formats (mipo_mlx/answers.py: 8-shot chain of thought for math, zero-shot for choices);
- with `eval.judge_model`, the judge's 1-to-5 score per stated preference and win rates,
  as the paper evaluates personalization (mipo_mlx/judge.py);
- answer length in tokens (DPO tends to lengthen answers), the share of answers that fell
  into a repetition loop (metrics.repetition_loop: an adapted model can loop in the right
  language and still pass the language check), the share of answers with a context that
  copy it (context_echo: 5 or more consecutive words of it, metrics.echoed_words; copying
  the context is what MIPO's pairs reward most cheaply, and it passes a "mention" check) and
  Self-BLEU of the answers (lower is more diverse).

`mipo-mlx eval` (mipo_mlx/evaluate.py) runs the same answer_and_score() and report_header()
on any model, with or without an adapter; with one side only, each metric is its mean with
an interval. The files and their Markdown are report.py's.
"""

import time
from pathlib import Path

import numpy as np

from mipo_mlx import distributed
from mipo_mlx.answers import formatted, is_correct, task_of
from mipo_mlx.chat import encode_prompt
from mipo_mlx.console import ConsoleObserver
from mipo_mlx.data import read_prompts
from mipo_mlx.errors import UserError
from mipo_mlx.generation import Answer, SamplerSettings, generate_answers
from mipo_mlx.judge import JUDGE_SETTINGS, judge_metrics, judge_rows, load_judge
from mipo_mlx.lora import adapter_disabled, use_adapter
from mipo_mlx.metrics import copies_context, per_side, repetition_loop, self_bleu, summarize, whole_set
from mipo_mlx.preferences import check_all
from mipo_mlx.report import report_summary, write_outputs
from mipo_mlx.rundir import COMPARE_DIR, PAIRS_FILE, Pair, is_held_out, read_pairs, reopen_run
from mipo_mlx.scoring import SCORING_ROWS, score_answers

PROMPT_FORMATS = {
    "math": "{shots}-shot chain of thought (the GSM8K exemplars of Wei et al. 2022), exact match of the final number",
    "mc": "zero-shot, choices listed as 'A. ...', exact match of the letter after 'The answer is: X'",
}


def answer_sides(model, tokenizer, records, settings: SamplerSettings, seed: int, adapted: bool = True) -> dict:
    """{"base": answers with the adapter off, "adapted": with it on}, same sampler and noise; base only without."""
    prompts = [encode_prompt(tokenizer, r.messages()) for r in records]
    keys = [r.id for r in records]  # each prompt's sampling noise, the same for both sides, on any rank

    def answered(part: list[int]) -> list[list]:
        answers = generate_answers(model, tokenizer, [prompts[i] for i in part], settings, seed, [keys[i] for i in part])
        return [[a.text, a.token_ids, a.finish_reason] for a in answers]

    def side() -> list[Answer]:
        return [Answer(*answer) for answer in distributed.split_work(list(range(len(prompts))), answered)]

    with adapter_disabled(model):
        answers = {"base": side()}
    if adapted:
        answers["adapted"] = side()
    return answers


def score(records, answers: dict, samples: int, seed: int) -> tuple[list[dict], dict]:
    """One row per prompt (answers, checks, tokens, correctness) and the metrics over the rows."""
    sides = list(answers)
    rows, per_kind = [], {}
    for i, record in enumerate(records):
        texts = {side: answers[side][i].text for side in sides}
        preferences = record.extras.get("preferences") or []
        checks = {side: check_all(preferences, texts[side]) for side in sides}
        for kind in checks["base"]:
            per_kind.setdefault(kind, {side: [] for side in sides})
            for side in sides:
                per_kind[kind][side].append(checks[side][kind])
        row = {"id": record.id, "prompt": record.messages(), **texts, "reference": record.extras.get("reference"),
               "checks": checks, "tokens": {side: len(answers[side][i].token_ids) for side in sides},
               "loop": {side: repetition_loop(texts[side]) for side in sides}}
        if record.context:
            row["echo"] = {side: copies_context(texts[side], record.context) for side in sides}
        if task_of(record):
            row["task"], row["gold"] = task_of(record), str(record.extras["gold"])
            row["correct"] = {side: is_correct(record, texts[side]) for side in sides}
        rows.append(row)
    column = lambda subset, get: {side: [get(r, side) for r in subset] for side in sides}
    metrics = {"answer_tokens": per_side(column(rows, lambda r, side: r["tokens"][side]), samples, seed),
               "repetition_loop": per_side(column(rows, lambda r, side: r["loop"][side]), samples, seed)}
    with_context = [r for r in rows if "echo" in r]
    if with_context:
        metrics["context_echo"] = per_side(column(with_context, lambda r, side: r["echo"][side]), samples, seed)
    for task in sorted({r["task"] for r in rows if "task" in r}):
        graded = [r for r in rows if r.get("task") == task]
        metrics[f"accuracy/{task}"] = per_side(column(graded, lambda r, side: r["correct"][side]), samples, seed)
    metrics["self_bleu"] = whole_set(len(rows), {side: self_bleu([r[side] for r in rows]) for side in sides})
    checked = [r for r in rows if r["checks"]["base"]]
    if checked:
        metrics["adherence/overall"] = per_side(
            column(checked, lambda r, side: np.mean(list(r["checks"][side].values()))), samples, seed)
        for kind, values in sorted(per_kind.items()):
            metrics[f"adherence/{kind}"] = per_side(values, samples, seed)
    return rows, metrics


def mutual_information(model, tokenizer, pairs: list[Pair], beta: float, samples: int, seed: int) -> dict:
    """PMI of the chosen answers under base and adapted model, and the adapted model's DPO rewards."""
    items = [(p.prompt_messages(), p.chosen_text) for p in pairs]
    items += [(p.mipo.negative_prompt, p.chosen_text) for p in pairs]
    items += [(p.prompt_messages(), p.rejected_text) for p in pairs]
    scored = lambda part: score_answers(model, tokenizer, part)[0]
    with adapter_disabled(model):
        base = distributed.split_work(items, scored, SCORING_ROWS)
    adapted = distributed.split_work(items, scored, SCORING_ROWS)
    n = len(pairs)
    pmi = lambda lp: [lp[i] - lp[n + i] for i in range(n)]
    margins = [beta * ((adapted[i] - base[i]) - (adapted[2 * n + i] - base[2 * n + i])) for i in range(n)]
    return {
        "mutual_information/pmi": summarize(pmi(base), pmi(adapted), samples, seed),
        "rewards/margins": summarize([0.0] * n, margins, samples, seed),
        "rewards/accuracies": summarize([0.0] * n, [float(m > 0) for m in margins], samples, seed),
    }


def answer_and_score(model, tokenizer, records, eval_config, seed: int, adapted: bool = True, judge=None):
    """Answers with the adapter off (and on) to `records` in the paper's prompt formats, scored: (rows, metrics)."""
    records = [formatted(r, eval_config.math_shots) for r in records]
    settings = SamplerSettings(eval_config.temperature, eval_config.top_p, eval_config.max_tokens)
    answers = answer_sides(model, tokenizer, records, settings, seed, adapted=adapted)
    rows, metrics = score(records, answers, eval_config.bootstrap_samples, seed)
    if judge:
        judge_rows(judge, records, rows)
        metrics.update(judge_metrics(rows, eval_config.bootstrap_samples, seed))
    return rows, metrics


def report_header(model: str, adapter: str, data: str, records, eval_config, seed: int) -> dict:
    """What the report states about how its answers were made."""
    header = {"model": model, "adapter": adapter, "data": data, "prompts": len(records),
              "sampler": f"temperature {eval_config.temperature}, top_p {eval_config.top_p}, "
                         f"max_tokens {eval_config.max_tokens}", "seed": seed}
    for task in sorted({task_of(r) for r in records} - {None}):
        header[f"{task} prompt"] = PROMPT_FORMATS[task].format(shots=eval_config.math_shots)
    if eval_config.judge_model:
        header["judge"] = (f"{eval_config.judge_model} (1 to 5 per stated preference; temperature "
                           f"{JUDGE_SETTINGS.temperature}, top_p {JUDGE_SETTINGS.top_p})")
    return header


def held_out_pairs(pairs: list[Pair], fraction: float, seed: int) -> list[Pair]:
    """The pairs the trainer held out (rundir.is_held_out) whose negative prompt was recorded."""
    return [p for p in pairs if p.mipo and p.mipo.negative_prompt is not None
            and is_held_out(p.mipo.prompt_id, fraction, seed)]


def run_stage(run, load_model) -> dict:
    recipe = run.recipe
    if not recipe.data.test:
        raise UserError("no held-out prompts to compare on; set data.test", key="data.test")
    started = time.time()
    pairs = distributed.pairs_from_main(lambda: read_pairs(run.path(PAIRS_FILE)))
    held_out = held_out_pairs(pairs, recipe.training.eval_fraction, recipe.seed)
    loaded = load_model()
    records = read_prompts(recipe.data.test, recipe.data.format, recipe.data.on_bad_line,
                           key="data.test")[: recipe.eval.max_prompts]
    model, tokenizer, adapter_dir = loaded.model, loaded.tokenizer, run.final_adapter
    use_adapter(model, adapter_dir)  # the saved one: training may have ended at a later step than it selected
    judge = recipe.eval.judge_model and load_judge(recipe.eval.judge_model, loaded, recipe.seed, key="eval.judge_model")
    run.events.emit("stage_started", stage="compare", total=2 * len(records), unit="answers")
    rows, metrics = answer_and_score(model, tokenizer, records, recipe.eval, recipe.seed, judge=judge)
    if held_out:
        metrics.update(mutual_information(model, tokenizer, held_out, recipe.training.beta,
                                          recipe.eval.bootstrap_samples, recipe.seed))
    header = report_header(loaded.source, str(adapter_dir), recipe.data.test, records, recipe.eval, recipe.seed)
    if distributed.is_main():
        write_outputs(run.path(COMPARE_DIR), rows, metrics, header)
    table = {name: {k: m[k] for k in ("n", "before", "after", "p_value", "value") if k in m} for name, m in metrics.items()}
    run.events.emit("stage_finished", stage="compare", seconds=time.time() - started, metrics=table)
    return table


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A run directory with a trained adapter, e.g. runs/quickstart.")


def run(args) -> int:
    from mipo_mlx.pipeline import run_stages

    # Every rank reads the run's recipe.yaml: on several machines each needs a copy (README). Its pairs and adapter
    # come from rank 0.
    finished = distributed.agree(lambda: reopen_run(Path(args.run_dir),
                                                    observers=[ConsoleObserver()] if distributed.is_main() else []))
    run_stages(finished, ["compare"])
    if distributed.is_main():
        print(report_summary(finished.path(COMPARE_DIR)))
    return 0
