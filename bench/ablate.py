"""Sweeps for choosing defaults: variants of a recipe, each over several seeds and held-out yardsticks, in one table.

    python bench/ablate.py recipes/quickstart.yaml --grid training.learning_rate=2e-5,1e-4 --seeds 0 1 2
    python bench/ablate.py recipes/quickstart.yaml --point base: --point "nll:training.nll_weight=0.2" \\
        --yardsticks personalization personalization2 reasoning --out /tmp/ablate

Every (yardstick, variant, seed) is one `mipo-mlx train` run (sample, DPO, compare) in
OUT/runs/, driven through the command line as a user runs it. A yardstick is a held-out
evaluation with its own training prompts (YARDSTICKS): the bundled personalization set,
a second one with other profiles, preference kinds and topics, and math with the
random_prompt negative. Runs whose sampling keys are equal (model, training data,
sampling settings, seed) share their pairs: the first one samples, the others start
from a copy of its pairs.jsonl, so the sampling stage finds nothing left to do. A run
that finished is read again, not rerun: a killed sweep continues where it stopped.

The table (printed, and written to OUT/table.md with the numbers in OUT/results.json):
per yardstick and variant, the metric before and after and the change, the mean over
seeds with a 95% bootstrap interval and a paired permutation p over prompts (each
prompt's change averaged over the seeds), the spread of the per-seed changes, the
change against the first variant (same pairing), answers in a repetition loop and answers
that copy their context (compare's context_echo) before and after (over all seeds), the
change of the metric when an answer that loops or copies its context counts as 0 ("sound
change": such answers pass a language or "mention" check, and a user sees them as broken),
the held-out PMI change, and minutes per run.
"""

import argparse
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mipo_mlx.data import context_of  # noqa: E402
from mipo_mlx.metrics import bootstrap_interval, copies_context, paired_permutation_p  # noqa: E402
from mipo_mlx.recipe import load_recipe, recipe_to_dict  # noqa: E402
from mipo_mlx.report import read_outputs  # noqa: E402
from mipo_mlx.rundir import COMPARE_DIR, METRICS_FILE, PAIRS_FILE, RECIPE_FILE  # noqa: E402

# name -> (recipe overrides, metric of compare/metrics.json, per-row value in compare/answers.jsonl)
YARDSTICKS = {
    "personalization": ({"data.train": "bundled:personalization/train", "data.test": "bundled:personalization/test",
                         "eval.max_prompts": 48}, "adherence/overall"),
    "personalization2": ({"data.train": "bundled:personalization2/train",
                          "data.test": "bundled:personalization2/test", "eval.max_prompts": 84}, "adherence/overall"),
    # Math prompts have no context: no echo pairs (which reject a prompt's context) and another prompt's answer as
    # the negative.
    "reasoning": ({"data.train": "bundled:math/train", "data.test": "bundled:math/test", "eval.max_prompts": 60,
                   "sampling.negative": "random_prompt", "sampling.echo_pairs": "false", "sampling.max_tokens": 128,
                   "eval.max_tokens": 128},
                  "accuracy/math"),
}
SAMPLING_SECTIONS = ("model", "sampling")
SAMPLING_KEYS = ("data.train", "data.format", "data.max_prompts", "data.on_bad_line", "seed")
SAMPLES = 2000


def parse_points(grid: list[str], points: list[str]) -> list[tuple[str, dict]]:
    """Named variants: the Cartesian product of --grid, then each --point NAME:KEY=VALUE;KEY=VALUE."""
    result = []
    if grid:
        axes = [(key, values.split(",")) for key, _, values in (g.partition("=") for g in grid)]
        for combo in itertools.product(*[[(key, v) for v in values] for key, values in axes]):
            result.append((" ".join(f"{k.split('.')[-1]}={v}" for k, v in combo), dict(combo)))
    for point in points:
        name, _, assignments = point.partition(":")
        result.append((name or "recipe", dict(a.split("=", 1) for a in assignments.split(";") if a)))
    return result or [("recipe", {})]


def slug(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def sampling_key(recipe_path: str, overrides: dict) -> str:
    """What decides the pairs: runs with equal keys sample the same pairs."""
    resolved = recipe_to_dict(load_recipe(recipe_path, [f"{k}={v}" for k, v in overrides.items()]))
    kept = {section: resolved[section] for section in SAMPLING_SECTIONS}
    for dotted in SAMPLING_KEYS:
        section, _, key = dotted.rpartition(".")
        kept[dotted] = resolved[section][key] if section else resolved[key]
    return json.dumps(kept, sort_keys=True)


def run_once(mipo: str, recipe: str, overrides: dict, run_dir: Path, pairs_from: Path | None, log: Path) -> float:
    """One `mipo-mlx train` run (resumed when it was cut short); its wall-clock seconds."""
    metrics = run_dir / COMPARE_DIR / METRICS_FILE
    if metrics.is_file():
        return json.loads((run_dir / "sweep_seconds").read_text()) if (run_dir / "sweep_seconds").is_file() else 0.0
    started_before = (run_dir / RECIPE_FILE).is_file()
    if not started_before and pairs_from is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(pairs_from, run_dir / PAIRS_FILE)
    command = [mipo, "train", recipe, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")],
               "--set", f"output_dir={run_dir.parent}", "--set", f"run_name={run_dir.name}"]
    if started_before:
        command.append("--resume")
    started = time.time()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=out).returncode
    if code != 0:
        raise SystemExit(f"ablate: the run in {run_dir} failed (exit {code}); see {log}")
    seconds = time.time() - started
    (run_dir / "sweep_seconds").write_text(json.dumps(seconds))
    return seconds


def row_value(row: dict, metric: str, side: str) -> float:
    if metric.startswith("accuracy/"):
        return float(row["correct"][side])
    return float(np.mean(list(row["checks"][side].values())))


def read_run(run_dir: Path, metric: str) -> dict:
    metrics, rows = read_outputs(run_dir / COMPARE_DIR)
    rows = [r for r in rows if (metric.startswith("accuracy/") and "correct" in r) or
            (metric.startswith("adherence/") and r["checks"]["base"])]
    pmi = metrics.get("mutual_information/pmi", {})
    # Copies of the context are counted here rather than read from the rows: runs compared before context_echo
    # existed have none.
    contexts = [context_of(r["prompt"]) for r in rows]
    copied = [{side: copies_context(r[side], c) for side in ("base", "adapted")} for r, c in zip(rows, contexts)]
    # The metric with an answer that loops or copies its context counted as getting nothing right: such an answer
    # passes a language or "mention" check, and a user sees it as broken.
    sound = lambda side: np.array([row_value(r, metric, side) * (not r["loop"][side] and not c[side])
                                   for r, c in zip(rows, copied)])
    return {
        "ids": [r["id"] for r in rows],
        "before": np.array([row_value(r, metric, "base") for r in rows]),
        "after": np.array([row_value(r, metric, "adapted") for r in rows]),
        "sound_before": sound("base"),
        "sound_after": sound("adapted"),
        "loops": (sum(r["loop"]["base"] for r in rows), sum(r["loop"]["adapted"] for r in rows), len(rows)),
        "echoes": [(c["base"], c["adapted"]) for c, context in zip(copied, contexts) if context],
        "pmi": (pmi.get("after") or 0.0) - (pmi.get("before") or 0.0) if pmi else None,
    }


def summarize_point(runs: list[dict], baseline: list[dict] | None) -> dict:
    """Means over seeds per prompt, then over prompts: the change, its interval and p, the spread, loops, PMI."""
    before = np.mean([r["before"] for r in runs], axis=0)  # (prompts,), averaged over seeds
    after = np.mean([r["after"] for r in runs], axis=0)
    change = after - before
    sound_change = np.mean([r["sound_after"] - r["sound_before"] for r in runs], axis=0)
    per_seed = [float((r["after"] - r["before"]).mean()) for r in runs]
    summary = {
        "seeds": len(runs), "n": len(change), "before": float(before.mean()), "after": float(after.mean()),
        "change": float(change.mean()), "change_ci": bootstrap_interval(change, SAMPLES, 0),
        "p": paired_permutation_p(before, after, SAMPLES, 0), "per_seed_change": per_seed,
        "sound_change": float(sound_change.mean()), "sound_change_ci": bootstrap_interval(sound_change, SAMPLES, 0),
        "loops_before": sum(r["loops"][0] for r in runs), "loops_after": sum(r["loops"][1] for r in runs),
        "answers": sum(r["loops"][2] for r in runs),
        "echoes_before": sum(b for r in runs for b, _ in r["echoes"]),
        "echoes_after": sum(a for r in runs for _, a in r["echoes"]), "with_context": sum(len(r["echoes"]) for r in runs),
        "pmi_change": float(np.mean([r["pmi"] for r in runs])) if all(r["pmi"] is not None for r in runs) else None,
    }
    if baseline is not None:
        other = np.mean([r["after"] for r in baseline], axis=0)
        summary["vs_first"] = float((after - other).mean())
        summary["vs_first_ci"] = bootstrap_interval(after - other, SAMPLES, 0)
        summary["vs_first_p"] = paired_permutation_p(other, after, SAMPLES, 0)
    return summary


def pct(value: float) -> str:
    return f"{100 * value:+.1f}"


def format_table(results: list[dict]) -> str:
    lines = ["| yardstick | variant | seeds x n | before | after | change [95% CI] | p | per-seed changes "
             "| vs first [95% CI] | p | loops before -> after | echoes before -> after | sound change [95% CI] "
             "| PMI change | min/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["summary"]
        vs = (f"{pct(s['vs_first'])} [{pct(s['vs_first_ci'][0])}, {pct(s['vs_first_ci'][1])}] | {s['vs_first_p']:.3f}"
              if "vs_first" in s else "| ")
        pmi = f"{s['pmi_change']:+.2f}" if s["pmi_change"] is not None else "n/a"
        echo = f"{s['echoes_before']} -> {s['echoes_after']} of {s['with_context']}" if s["with_context"] else "n/a"
        lines.append(
            f"| {r['yardstick']} | {r['variant']} | {s['seeds']} x {s['n']} | {100 * s['before']:.1f} | "
            f"{100 * s['after']:.1f} | {pct(s['change'])} [{pct(s['change_ci'][0])}, {pct(s['change_ci'][1])}] | "
            f"{s['p']:.3f} | {', '.join(pct(c) for c in s['per_seed_change'])} | {vs} | "
            f"{s['loops_before']} -> {s['loops_after']} of {s['answers']} | {echo} | "
            f"{pct(s['sound_change'])} [{pct(s['sound_change_ci'][0])}, {pct(s['sound_change_ci'][1])}] | {pmi} | "
            f"{r['minutes']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="An axis of the grid.")
    parser.add_argument("--point", action="append", default=[], metavar="NAME:KEY=V;KEY=V", help="A named variant.")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="An override for every run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--yardsticks", nargs="+", choices=list(YARDSTICKS), default=list(YARDSTICKS))
    parser.add_argument("--out", type=Path, default=Path("ablate"))
    parser.add_argument("--mipo-mlx", default=str(Path(sys.executable).with_name("mipo-mlx")))
    args = parser.parse_args(argv)

    points = parse_points(args.grid, args.point)
    common = dict(c.split("=", 1) for c in args.common)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.log"
    sampled: dict[str, Path] = {}  # sampling key -> a run whose pairs are complete
    results = []
    for yardstick in args.yardsticks:
        yardstick_overrides, metric = YARDSTICKS[yardstick]
        first = None
        for name, point in points:
            runs, seconds = [], []
            for seed in args.seeds:
                overrides = {**yardstick_overrides, **common, **point, "seed": seed}
                key = sampling_key(args.recipe, overrides)
                run_dir = args.out / "runs" / f"{yardstick}-{slug(name)}-s{seed}"
                print(f"ablate: {yardstick} / {name} / seed {seed}: {run_dir}", flush=True)
                seconds.append(run_once(args.mipo_mlx, args.recipe, overrides, run_dir, sampled.get(key), log))
                sampled.setdefault(key, run_dir / PAIRS_FILE)
                runs.append(read_run(run_dir, metric))
            summary = summarize_point(runs, first)
            first = first or runs
            results.append({"yardstick": yardstick, "variant": name, "overrides": point, "metric": metric,
                            "summary": summary, "minutes": float(np.mean(seconds)) / 60})
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
            (args.out / "table.md").write_text(format_table(results) + "\n")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
