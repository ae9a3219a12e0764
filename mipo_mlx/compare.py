"""Before and after: held-out answers of the base and the adapted model, and their metrics.

    mipo-mlx compare runs/quickstart              # also the last stage of `mipo-mlx train`

One loaded model answers each held-out prompt twice, adapter off and on, with the same
sampler and seed. Written to RUN_DIR/compare/: answers.jsonl (side by side, with the
per-prompt preference checks), metrics.json and report.md. Every metric has its sample
size, a bootstrap 95% interval, and a paired permutation test of after vs before:
- mutual information on the held-out pairs (those the trainer set aside): the PMI
  estimate log p(y | x) - log p(y | x'), with y the chosen answer, x its prompt and x'
  the prompt the negative came from, under the base and under the adapted model; and the
  DPO reward margin and accuracy of the adapted model (zero before, by definition);
- preference adherence (prompts whose stated preferences a program can check), overall
  and per preference kind;
- answer length in tokens (DPO tends to lengthen answers) and Self-BLEU of the answers
  (lower is more diverse).
"""

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mipo_mlx.chat import encode_prompt
from mipo_mlx.data import read_prompts
from mipo_mlx.errors import UserError
from mipo_mlx.generation import SamplerSettings, generate_answers
from mipo_mlx.lora import adapter_disabled, load_adapter, lora_layers
from mipo_mlx.metrics import summarize
from mipo_mlx.preferences import check_all
from mipo_mlx.sampling import PAIRS_FILE, reference_logps
from mipo_mlx.trainer import ADAPTERS_DIR, is_held_out, read_pairs

COMPARE_DIR = "compare"


def answer_both(model, tokenizer, records, settings: SamplerSettings, seed: int, batch_size: int):
    """Base (adapter off) and adapted answers to the same prompts, same sampler and seed."""
    prompts = [encode_prompt(tokenizer, r.messages()) for r in records]
    with adapter_disabled(model):
        base = generate_answers(model, tokenizer, prompts, settings, seed, batch_size)
    adapted = generate_answers(model, tokenizer, prompts, settings, seed, batch_size)
    return base, adapted


def score(records, base, adapted, samples: int, seed: int) -> tuple[list[dict], dict]:
    rows, per_kind = [], {}
    for record, b, a in zip(records, base, adapted):
        preferences = record.extras.get("preferences") or []
        checks = {"base": check_all(preferences, b.text), "adapted": check_all(preferences, a.text)}
        for kind in checks["base"]:
            per_kind.setdefault(kind, ([], []))
            per_kind[kind][0].append(checks["base"][kind])
            per_kind[kind][1].append(checks["adapted"][kind])
        rows.append({
            "id": record.id, "prompt": record.messages(), "base": b.text, "adapted": a.text,
            "reference": record.extras.get("reference"), "checks": checks,
            "tokens": {"base": len(b.token_ids), "adapted": len(a.token_ids)},
        })
    checked = [r for r in rows if r["checks"]["base"]]
    metrics = {
        "answer_tokens": summarize([r["tokens"]["base"] for r in rows], [r["tokens"]["adapted"] for r in rows], samples, seed),
    }
    bleu = {side: self_bleu([r[side] for r in rows]) for side in ("base", "adapted")}
    metrics["self_bleu"] = {"n": len(rows), "before": bleu["base"], "after": bleu["adapted"]}
    if checked:
        rate = lambda side: [np.mean(list(r["checks"][side].values())) for r in checked]
        metrics["adherence/overall"] = summarize(rate("base"), rate("adapted"), samples, seed)
        for kind, (before, after) in sorted(per_kind.items()):
            metrics[f"adherence/{kind}"] = summarize(before, after, samples, seed)
    return rows, metrics


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean BLEU of each answer against all the others as references (uniform n-gram weights)."""
    tokenized = [t.split() for t in texts if t.split()]
    if len(tokenized) < 2:
        return float("nan")
    scores = []
    for i, hypothesis in enumerate(tokenized):
        references = tokenized[:i] + tokenized[i + 1 :]
        log_precisions = []
        for n in range(1, max_n + 1):
            grams = Counter(tuple(hypothesis[k : k + n]) for k in range(len(hypothesis) - n + 1))
            best = Counter()
            for reference in references:
                best |= Counter(tuple(reference[k : k + n]) for k in range(len(reference) - n + 1))
            matched = sum(min(c, best[g]) for g, c in grams.items())
            # A small count for no match (Chen & Cherry's method 1) keeps the log finite.
            total = max(sum(grams.values()), 1)
            log_precisions.append(math.log((matched or 0.1) / total))
        closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
        brevity = min(1.0, math.exp(1 - closest / len(hypothesis)))
        scores.append(brevity * math.exp(sum(log_precisions) / max_n))
    return float(np.mean(scores))


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


def format_report(metrics: dict, rows: list[dict], header: dict) -> str:
    lines = ["# Before and after", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| metric | n | before [95% CI] | after [95% CI] | after - before [95% CI] | p (paired) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, m in metrics.items():
        ci = lambda pair: f"[{pair[0]:.3g}, {pair[1]:.3g}]"
        if "p_value" not in m:  # a statistic of the whole set (Self-BLEU): no interval
            lines.append(f"| {name} | {m['n']} | {m['before']:.3g} | {m['after']:.3g} | {m['after'] - m['before']:+.3g} | |")
            continue
        lines.append(f"| {name} | {m['n']} | {m['before']:.3g} {ci(m['before_ci'])} | {m['after']:.3g} {ci(m['after_ci'])} "
                     f"| {m['after'] - m['before']:+.3g} {ci(m['difference_ci'])} | {m['p_value']:.3g} |")
    lines += ["", "## Examples", ""]
    for row in rows[:3]:
        question = row["prompt"][-1]["content"]
        context = row["prompt"][0]["content"] if row["prompt"][0]["role"] == "system" else ""
        lines += [f"**Context:** {context}", "", f"**Prompt:** {question}", "",
                  f"- before: {row['base'].strip()}", f"- after: {row['adapted'].strip()}", ""]
    return "\n".join(lines)


def compare(loaded, adapter_dir: Path, data: str, out_dir: Path, eval_config, seed: int, events=None, data_format="auto",
            held_out_pairs: list[dict] = (), beta: float = 0.1) -> dict:
    """Answer, check and report; returns the metrics."""
    records = read_prompts(data, data_format, key="data.test")[: eval_config.max_prompts]
    model, tokenizer = loaded.model, loaded.tokenizer
    if not lora_layers(model):
        load_adapter(model, adapter_dir)
    model.eval()
    settings = SamplerSettings(eval_config.temperature, eval_config.top_p, eval_config.max_tokens)
    if events:
        events.emit("stage_started", stage="compare", total=2 * len(records), unit="answers")
    base, adapted = answer_both(model, tokenizer, records, settings, seed, batch_size=16)
    rows, metrics = score(records, base, adapted, eval_config.bootstrap_samples, seed)
    if held_out_pairs:
        metrics.update(mutual_information(model, tokenizer, held_out_pairs, beta, eval_config.bootstrap_samples, seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    header = {"model": loaded.source, "adapter": str(adapter_dir), "data": data, "prompts": len(records),
              "sampler": f"temperature {settings.temperature}, top_p {settings.top_p}, max_tokens {settings.max_tokens}",
              "seed": seed}
    (out_dir / "report.md").write_text(format_report(metrics, rows, header), encoding="utf-8")
    return metrics


def run_stage(run) -> dict:
    recipe = run.recipe
    if not recipe.data.test:
        raise UserError("no held-out prompts to compare on; set data.test", key="data.test")
    started = time.time()
    held_out = [p for p in read_pairs(run.path(PAIRS_FILE)) if "negative_prompt" in p.get("mipo", {})
                and is_held_out(p["mipo"]["prompt_id"], recipe.training.eval_fraction, recipe.seed)]
    metrics = compare(run.loaded_model(), run.path(ADAPTERS_DIR), recipe.data.test, run.path(COMPARE_DIR),
                      recipe.eval, recipe.seed, run.events, recipe.data.format, held_out, recipe.training.beta)
    table = {name: {k: m.get(k) for k in ("n", "before", "after", "p_value")} for name, m in metrics.items()}
    run.events.emit("stage_finished", stage="compare", seconds=time.time() - started, metrics=table)
    print((run.path(COMPARE_DIR) / "report.md").read_text(encoding="utf-8").split("## Examples")[0])
    return table


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A run directory with a trained adapter, e.g. runs/quickstart.")


def run(args) -> int:
    from mipo_mlx.pipeline import reopen_run, run_stages

    run_stages(reopen_run(Path(args.run_dir)), ["compare"])
    return 0
