"""Before and after: held-out answers of the base and the adapted model, and their metrics.

    mipo-mlx compare runs/quickstart              # also the last stage of `mipo-mlx train`

One loaded model answers each held-out prompt twice, adapter off and on, with the same
sampler and seed. Written to RUN_DIR/compare/: answers.jsonl (side by side, with the
per-prompt preference checks), metrics.json and report.md. Every metric has its sample
size, a bootstrap 95% interval, and a paired permutation test of after vs before (a
metric with nothing to measure, such as Self-BLEU of one answer, is null in metrics.json
and n/a in the report):
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
  language and still pass the language check) and Self-BLEU of the answers (lower is more
  diverse).

`mipo-mlx eval` (mipo_mlx/evaluate.py) runs the same evaluate(), report_header() and
write_outputs() on any model, with or without an adapter; with one side only, each metric
is its mean with an interval.
"""

import json
import math
import time
from pathlib import Path

import numpy as np

from mipo_mlx.answers import formatted, is_correct, task_of
from mipo_mlx.chat import encode_prompt
from mipo_mlx.data import read_prompts
from mipo_mlx.errors import UserError
from mipo_mlx.generation import SamplerSettings, generate_answers
from mipo_mlx.judge import JUDGE_SETTINGS, judge_metrics, judge_rows, load_judge
from mipo_mlx.lora import adapter_disabled, load_adapter, lora_layers
from mipo_mlx.metrics import json_ready, per_side, repetition_loop, self_bleu, summarize, whole_set
from mipo_mlx.preferences import check_all
from mipo_mlx.sampling import PAIRS_FILE, reference_logps
from mipo_mlx.trainer import ADAPTERS_DIR, is_held_out, read_pairs

COMPARE_DIR = "compare"
PROMPT_FORMATS = {
    "math": "{shots}-shot chain of thought (the GSM8K exemplars of Wei et al. 2022), exact match of the final number",
    "mc": "zero-shot, choices listed as 'A. ...', exact match of the letter after 'The answer is: X'",
}


def answer_sides(model, tokenizer, records, settings: SamplerSettings, seed: int, batch_size: int,
                 adapted: bool = True) -> dict:
    """{"base": answers with the adapter off, "adapted": with it on}, same sampler and seed; base only without."""
    prompts = [encode_prompt(tokenizer, r.messages()) for r in records]
    with adapter_disabled(model):
        answers = {"base": generate_answers(model, tokenizer, prompts, settings, seed, batch_size)}
    if adapted:
        answers["adapted"] = generate_answers(model, tokenizer, prompts, settings, seed, batch_size)
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
        if task_of(record):
            row["task"], row["gold"] = task_of(record), str(record.extras["gold"])
            row["correct"] = {side: is_correct(record, texts[side]) for side in sides}
        rows.append(row)
    column = lambda subset, get: {side: [get(r, side) for r in subset] for side in sides}
    metrics = {"answer_tokens": per_side(column(rows, lambda r, side: r["tokens"][side]), samples, seed),
               "repetition_loop": per_side(column(rows, lambda r, side: r["loop"][side]), samples, seed)}
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


def mutual_information(model, tokenizer, pairs: list[dict], beta: float, samples: int, seed: int) -> dict:
    """PMI of the chosen answers under base and adapted model, and the adapted model's DPO rewards."""
    items = [(p["prompt"], p["chosen"][0]["content"]) for p in pairs]
    items += [(p["mipo"]["negative_prompt"], p["chosen"][0]["content"]) for p in pairs]
    items += [(p["prompt"], p["rejected"][0]["content"]) for p in pairs]
    with adapter_disabled(model):
        base, _ = reference_logps(model, tokenizer, items)
    adapted, _ = reference_logps(model, tokenizer, items)
    n = len(pairs)
    pmi = lambda lp: [lp[i] - lp[n + i] for i in range(n)]
    margins = [beta * ((adapted[i] - base[i]) - (adapted[2 * n + i] - base[2 * n + i])) for i in range(n)]
    return {
        "mutual_information/pmi": summarize(pmi(base), pmi(adapted), samples, seed),
        "rewards/margins": summarize([0.0] * n, margins, samples, seed),
        "rewards/accuracies": summarize([0.0] * n, [float(m > 0) for m in margins], samples, seed),
    }


def defined(*values) -> bool:
    """Whether every value is a number: an undefined one is NaN in memory and None read back from metrics.json."""
    return all(v is not None and math.isfinite(v) for v in values)


def cell(value, interval=None, spec: str = ".3g") -> str:
    """A number for the report, with its 95% interval when that is defined; "n/a" for an undefined number."""
    if not defined(value):
        return "n/a"
    shown_interval = f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval is not None and defined(*interval) else ""
    return format(value, spec) + shown_interval


def change(m: dict):
    return m["after"] - m["before"] if defined(m["before"], m["after"]) else None


def format_report(metrics: dict, rows: list[dict], header: dict) -> str:
    """The Markdown report: header, the metrics table (before/after, or one side), a few examples."""
    paired = any("after" in m for m in metrics.values())
    lines = ["# Before and after" if paired else "# Evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    if paired:
        lines += ["", "| metric | n | before [95% CI] | after [95% CI] | after - before [95% CI] | p (paired) |",
                  "| --- | --- | --- | --- | --- | --- |"]
    else:
        lines += ["", "| metric | n | mean [95% CI] |", "| --- | --- | --- |"]
    for name, m in metrics.items():
        if "p_value" in m:
            lines.append(f"| {name} | {m['n']} | {cell(m['before'], m['before_ci'])} | {cell(m['after'], m['after_ci'])} "
                         f"| {cell(change(m), m['difference_ci'], '+.3g')} | {cell(m['p_value'])} |")
        elif "after" in m:  # a statistic of the whole set (Self-BLEU): no interval
            lines.append(f"| {name} | {m['n']} | {cell(m['before'])} | {cell(m['after'])} | {cell(change(m), spec='+.3g')} | |")
        elif "mean" in m:
            lines.append(f"| {name} | {m['n']} | {cell(m['mean'], m.get('ci'))} |")
    wins = {name: m for name, m in metrics.items() if "wins" in m}
    if wins:
        lines += ["", "## Win rates (judge)", "", "| comparison | n | win rate, ties as wins [95% CI] | wins | ties | losses |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name.removeprefix('judge/win_rate/')} | {m['n']} | {cell(m['value'], m['ci'])} "
                  f"| {cell(m['wins'])} | {cell(m['ties'])} | {cell(m['losses'])} |" for name, m in wins.items()]
    lines += ["", "## Examples", ""]
    for row in rows[:3]:
        question = row["prompt"][-1]["content"]
        context = row["prompt"][0]["content"] if row["prompt"][0]["role"] == "system" else ""
        lines += [f"**Context:** {context}", "", f"**Prompt:** {question}", ""]
        if "adapted" in row:
            lines += [f"- before: {row['base'].strip()}", f"- after: {row['adapted'].strip()}", ""]
        else:
            lines += [f"- answer: {row['base'].strip()}", ""]
    return "\n".join(lines)


def evaluate(model, tokenizer, records, eval_config, seed: int, adapted: bool = True, events=None, judge=None):
    """Answers with the adapter off (and on) to `records` in the paper's prompt formats, scored: (rows, metrics)."""
    records = [formatted(r, eval_config.math_shots) for r in records]
    settings = SamplerSettings(eval_config.temperature, eval_config.top_p, eval_config.max_tokens)
    if events:
        events.emit("stage_started", stage="compare", total=len(records) * (2 if adapted else 1), unit="answers")
    answers = answer_sides(model, tokenizer, records, settings, seed, batch_size=16, adapted=adapted)
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


def write_outputs(out_dir: Path, rows: list[dict], metrics: dict, header: dict) -> None:
    """answers.jsonl, metrics.json and report.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(json_ready(metrics), indent=2, allow_nan=False))
    (out_dir / "report.md").write_text(format_report(metrics, rows, header), encoding="utf-8")


def compare(loaded, adapter_dir: Path, data: str, out_dir: Path, eval_config, seed: int, events=None, data_format="auto",
            on_bad_line="error", held_out_pairs: list[dict] = (), beta: float = 0.1) -> dict:
    """Answer, check and report; returns the metrics."""
    records = read_prompts(data, data_format, on_bad_line, key="data.test")[: eval_config.max_prompts]
    model, tokenizer = loaded.model, loaded.tokenizer
    if not lora_layers(model):
        load_adapter(model, adapter_dir)
    model.eval()
    judge = eval_config.judge_model and load_judge(eval_config.judge_model, loaded, seed, key="eval.judge_model")
    rows, metrics = evaluate(model, tokenizer, records, eval_config, seed, events=events, judge=judge)
    if held_out_pairs:
        metrics.update(mutual_information(model, tokenizer, held_out_pairs, beta, eval_config.bootstrap_samples, seed))
    write_outputs(out_dir, rows, metrics, report_header(loaded.source, str(adapter_dir), data, records, eval_config, seed))
    return metrics


def run_stage(run) -> dict:
    recipe = run.recipe
    if not recipe.data.test:
        raise UserError("no held-out prompts to compare on; set data.test", key="data.test")
    started = time.time()
    held_out = [p for p in read_pairs(run.path(PAIRS_FILE)) if "negative_prompt" in p.get("mipo", {})
                and is_held_out(p["mipo"]["prompt_id"], recipe.training.eval_fraction, recipe.seed)]
    metrics = compare(run.loaded_model(), run.path(ADAPTERS_DIR), recipe.data.test, run.path(COMPARE_DIR),
                      recipe.eval, recipe.seed, run.events, recipe.data.format, recipe.data.on_bad_line, held_out,
                      recipe.training.beta)
    table = {name: {k: m[k] for k in ("n", "before", "after", "p_value", "value") if k in m} for name, m in metrics.items()}
    run.events.emit("stage_finished", stage="compare", seconds=time.time() - started, metrics=table)
    print((run.path(COMPARE_DIR) / "report.md").read_text(encoding="utf-8").split("## Examples")[0])
    return table


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A run directory with a trained adapter, e.g. runs/quickstart.")


def run(args) -> int:
    from mipo_mlx.pipeline import reopen_run, run_stages

    run_stages(reopen_run(Path(args.run_dir)), ["compare"])
    return 0
