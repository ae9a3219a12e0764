"""The before/after report: the files of compare/ (and of `mipo-mlx eval --out`) and their Markdown.

    write_outputs(out_dir, rows, metrics, header)    # answers.jsonl, metrics.json, report.md
    print(report_summary(out_dir))                   # report.md up to its examples, as the commands print it
    metrics, rows = read_outputs(out_dir)            # what write_outputs wrote (the model card's section)

format_report lays out the metrics table (before/after with intervals and the paired
test, or one side's means), the judge's win rates and a few example answers.
"""

import json
import math
from pathlib import Path

from mipo_mlx.files import encode_line, read_jsonl
from mipo_mlx.metrics import json_ready
from mipo_mlx.rundir import ANSWERS_FILE, METRICS_FILE, REPORT_FILE

EXAMPLES_HEADING = "## Examples"


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
    lines += ["", EXAMPLES_HEADING, ""]
    for row in rows[:3]:
        question = row["prompt"][-1]["content"]
        context = row["prompt"][0]["content"] if row["prompt"][0]["role"] == "system" else ""
        lines += [f"**Context:** {context}", "", f"**Prompt:** {question}", ""]
        if "adapted" in row:
            lines += [f"- before: {row['base'].strip()}", f"- after: {row['adapted'].strip()}", ""]
        else:
            lines += [f"- answer: {row['base'].strip()}", ""]
    return "\n".join(lines)


def write_outputs(out_dir: Path, rows: list[dict], metrics: dict, header: dict) -> None:
    """answers.jsonl, metrics.json and report.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ANSWERS_FILE).write_text("".join(encode_line(r) for r in rows), encoding="utf-8")
    (out_dir / METRICS_FILE).write_text(json.dumps(json_ready(metrics), indent=2, allow_nan=False))
    (out_dir / REPORT_FILE).write_text(format_report(metrics, rows, header), encoding="utf-8")


def read_outputs(out_dir: Path) -> tuple[dict | None, list[dict]]:
    """The metrics (None when there are none) and the answer rows that write_outputs wrote to `out_dir`."""
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.is_file():
        return None, []
    rows, _ = read_jsonl(out_dir / ANSWERS_FILE, growing=False)
    return json.loads(metrics_path.read_text(encoding="utf-8")), rows


def report_summary(out_dir: Path) -> str:
    """report.md without its examples: the header and the tables."""
    return (out_dir / REPORT_FILE).read_text(encoding="utf-8").split(EXAMPLES_HEADING)[0]
