"""The model card of an exported adapter: README.md with Hub front matter, and its training curve.

    write_card(out_dir, CardInputs(run_dir=run.dir, recipe=run.recipe, formats=["mlx", "peft"],
                                   base_model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter_config=config))

The card holds the front matter the Hub reads (base_model, library_name, tags, license,
pipeline_tag), how to load each exported format, the training curve (an SVG drawn here
from events.jsonl plus a table of the same numbers), the before/after table and examples
from compare/ when the run has them, and the recipe.

A run of several rounds (training.rounds) logs each round's steps from 1: the curve counts
them on across the rounds, each round a line of its own colour, and the table has a round
column.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCardData

from mipo_mlx.events import in_rounds, read_events
from mipo_mlx.recipe import Recipe, is_hub_id
from mipo_mlx.report import format_report, read_outputs
from mipo_mlx.rundir import COMPARE_DIR, EVENTS_FILE, RECIPE_FILE

CARD_FILE = "README.md"
CURVE_FILE = "training_curve.svg"
TAGS = ["mlx", "mipo", "dpo", "lora"]
# (metric in the event log, label in the card)
CURVE_METRICS = (("loss", "DPO loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy"))
TABLE_ROWS = 10
EXAMPLES = 3
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 300, 150, 36
ROUND_COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")  # rounds 1 to 5; round 6 is as round 1
LEGEND_HEIGHT = 18


@dataclass
class CardInputs:
    run_dir: Path
    recipe: Recipe
    formats: list[str]
    base_model: str  # the transformers id PEFT loads
    adapter_config: dict  # mlx-lm's adapter_config.json
    drift: dict = field(default_factory=dict)  # format -> max sequence log-prob drift, nats
    license: Optional[str] = None
    repo_id: Optional[str] = None


def metric_rows(events_path: Path, split: str = "train") -> list[dict]:
    """Metrics events of one split with their `round`, one per round and step, in order (a resumed run's repeated
    steps keep the last)."""
    events, _ = read_events(events_path)
    by_step = {(number, e["step"]): {**e, "round": number} for number, e in in_rounds(events)
               if e["event"] == "metrics" and e.get("split") == split}
    return [by_step[key] for key in sorted(by_step)]


def run_steps(rows: list[dict]) -> list[int]:
    """Each row's step counted across the rounds: a round's steps go on from the last step of the round before."""
    last = {}
    for row in rows:
        last[row["round"]] = max(last.get(row["round"], 0), row["step"])
    offsets, done = {}, 0
    for number in sorted(last):
        offsets[number], done = done, done + last[number]
    return [offsets[row["round"]] + row["step"] for row in rows]


def _number(value) -> Optional[float]:
    # A diverged value is logged as a string ("nan"); it is left out of curves.
    return float(value) if isinstance(value, (int, float)) else None


def round_colour(number: int) -> str:
    return ROUND_COLOURS[(number - 1) % len(ROUND_COLOURS)]


def training_curve_svg(rows: list[dict]) -> str:
    """One small line chart per metric, side by side, as a standalone SVG (no plotting library); with several rounds,
    a line per round over the steps of all rounds (run_steps), and a legend."""
    panels, rounds = [], sorted({row["round"] for row in rows})
    for index, (key, label) in enumerate(CURVE_METRICS):
        points = [(r["round"], s, _number(r.get(key))) for r, s in zip(rows, run_steps(rows))
                  if _number(r.get(key)) is not None]
        if not points:
            continue
        x0 = index * PANEL_WIDTH
        steps, values = [p[1] for p in points], [p[2] for p in points]
        low, high = min(values), max(values)
        span_x, span_y = max(steps[-1] - steps[0], 1), (high - low) or 1.0
        inner_w, inner_h = PANEL_WIDTH - 2 * MARGIN, PANEL_HEIGHT - 2 * MARGIN
        lines = []
        for number in rounds:
            line = " ".join(
                f"{x0 + MARGIN + (s - steps[0]) / span_x * inner_w:.1f},{MARGIN + (high - v) / span_y * inner_h:.1f}"
                for r, s, v in points if r == number
            )
            if line:
                colour = round_colour(number)
                lines.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        panels.append(
            f'<text x="{x0 + PANEL_WIDTH / 2}" y="20" text-anchor="middle" font-weight="bold">{label}</text>'
            f'<rect x="{x0 + MARGIN}" y="{MARGIN}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#bbb"/>'
            + "".join(lines) +
            f'<text x="{x0 + MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end">{high:.3g}</text>'
            f'<text x="{x0 + MARGIN - 4}" y="{MARGIN + inner_h}" text-anchor="end">{low:.3g}</text>'
            f'<text x="{x0 + MARGIN}" y="{PANEL_HEIGHT - 12}">step {steps[0]}</text>'
            f'<text x="{x0 + PANEL_WIDTH - MARGIN}" y="{PANEL_HEIGHT - 12}" text-anchor="end">{steps[-1]}</text>'
        )
    if not panels:
        return ""
    width, height = PANEL_WIDTH * len(CURVE_METRICS), PANEL_HEIGHT
    if len(rounds) > 1:
        legend = "   ".join(f'<tspan fill="{round_colour(number)}">━ round {number}</tspan>' for number in rounds)
        panels.append(f'<text x="{MARGIN}" y="{height + LEGEND_HEIGHT / 2}">{legend}   '
                      '(steps counted on across the rounds)</text>')
        height += LEGEND_HEIGHT
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
        + "".join(panels)
        + "</svg>\n"
    )


def curve_table(rows: list[dict]) -> str:
    """The training curve as a markdown table: about TABLE_ROWS evenly spaced steps and each round's last, with the
    round when there are several."""
    stride = max(1, len(rows) // TABLE_ROWS)
    last = {row["round"]: index for index, row in enumerate(rows)}
    picked = [rows[index] for index in sorted({*range(0, len(rows), stride), *last.values()})]
    columns = ["round", "step"] if len(last) > 1 else ["step"]
    lines = ["| " + " | ".join(columns + [label for _, label in CURVE_METRICS]) + " |",
             "|" + " --- |" * (len(columns) + len(CURVE_METRICS))]
    for row in picked:
        cells = [f"{v:.4g}" if (v := _number(row.get(key))) is not None else "n/a" for key, _ in CURVE_METRICS]
        lines.append("| " + " | ".join([str(row[name]) for name in columns] + cells) + " |")
    return "\n".join(lines)


def front_matter(inputs: CardInputs) -> str:
    adapter = bool({"mlx", "peft"} & set(inputs.formats))
    data = ModelCardData(
        base_model=inputs.base_model if is_hub_id(inputs.base_model) else None,
        base_model_relation="adapter" if adapter else "merge",
        library_name="peft" if "peft" in inputs.formats else "mlx",
        license=inputs.license,
        pipeline_tag="text-generation",
        tags=TAGS,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def usage(inputs: CardInputs) -> str:
    """How to load each exported format, with this repository's id when known."""
    repo = inputs.repo_id or "REPO_ID"
    base = inputs.base_model
    trained_on = inputs.recipe.model.path
    # mlx-lm loads Hub ids and model folders, not mipo-mlx's embedded name nor a GGUF file.
    mlx_base = trained_on if is_hub_id(trained_on) else base
    parts = []
    if "mlx" in inputs.formats:
        parts += ["### mlx-lm (adapter)", "", "```bash", f'hf download {repo} --include "mlx/*" --local-dir mipo-adapter',
                  f"mlx_lm.generate --model {mlx_base} --adapter-path mipo-adapter/mlx --prompt \"Hello\"", "```", "",
                  "```python", "from mlx_lm import load, generate",
                  f'model, tokenizer = load("{mlx_base}", adapter_path="mipo-adapter/mlx")', "```", ""]
        if mlx_base != trained_on:
            embedded = " (the SmolLM2-135M-Instruct Q4_1 GGUF that mipo-mlx embeds)" if trained_on == "smollm2-135m" else ""
            exact = "; the `fused/` folder reproduces the adapted model exactly" if "fused" in inputs.formats else ""
            parts += [f"The adapter was trained on `{trained_on}`{embedded}. `{mlx_base}` is the checkpoint it was "
                      f"quantized from, so its outputs differ slightly{exact}.", ""]
    if "peft" in inputs.formats:
        parts += ["### PEFT (transformers)", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{repo}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", "",
                  "`lora_alpha` is mlx-lm's scale times the rank, so PEFT applies the same update. The adapter was "
                  "trained on the base model's weights as mipo-mlx loaded them "
                  f"({inputs.recipe.model.path}); on a base with other weights (another quantization) the outputs "
                  "differ by that weight difference.", ""]
    if "fused" in inputs.formats:
        parts += ["### Fused model (mlx-lm)", "", "```bash", f'hf download {repo} --include "fused/*" --local-dir mipo-fused',
                  'mlx_lm.generate --model mipo-fused/fused --prompt "Hello"', "```", ""]
    if "gguf" in inputs.formats:
        parts += ["### GGUF (llama.cpp)", "", "```bash", f"hf download {repo} gguf/model.gguf --local-dir mipo-gguf",
                  "llama-cli -m mipo-gguf/gguf/model.gguf -cnv", "```", ""]
    if inputs.drift:
        parts += ["Largest change of a sequence log-prob against the adapted model, on the run's own answers: "
                  + ", ".join(f"{name} {value:.2g} nats" for name, value in inputs.drift.items()) + ".", ""]
    return "\n".join(parts)


def before_after(run_dir: Path) -> str:
    """The compare stage's table and a few side-by-side answers, or a line saying there are none."""
    metrics, rows = read_outputs(run_dir / COMPARE_DIR)
    if metrics is None:
        return "This run has no before/after comparison (`mipo-mlx compare RUN_DIR` adds one).\n"
    report = format_report(metrics, rows[:EXAMPLES], header={})
    # The report is a document of its own: drop its title, nest its sections under the card's.
    body = report.split("\n", 1)[1].replace("\n## ", "\n### ")
    intro = ("Held-out prompts answered by the base model (before) and the adapted model (after), "
             "sampled as the recipe's `eval` section says.\n")
    return intro + body


def card_text(inputs: CardInputs, rows: list[dict], has_curve: bool) -> str:
    """The README.md text; `rows` are the training metrics, `has_curve` whether the SVG exists."""
    recipe, lora = inputs.recipe, inputs.adapter_config["lora_parameters"]
    lines = [
        front_matter(inputs),
        f"# {recipe.run_name}: {recipe.model.path} + MIPO LoRA",
        "",
        f"A LoRA adapter (rank {lora['rank']}, scale {lora['scale']}, {inputs.adapter_config['num_layers']} layers, "
        f"modules {', '.join(lora['keys'])}) trained with mipo-mlx by DPO on MIPO pairs: "
        "for each prompt the model's own answer is the chosen one and an answer to a different or "
        f"context-stripped prompt (`{recipe.sampling.negative}`) is the rejected one. Base model: "
        f"`{recipe.model.path}`; PEFT base: `{inputs.base_model}`.",
        "",
        "## How to load",
        "",
        usage(inputs),
        "## Training curve",
        "",
    ]
    rounds = len({row["round"] for row in rows})
    if rounds > 1:
        lines += [f"Iterative MIPO, {rounds} rounds: each round after the first trained on pairs sampled by the model "
                  "the round before made, going on from its adapter with a fresh schedule. Each round's steps count "
                  "from 1 in the table; the curve counts them on across the rounds.", ""]
    if has_curve:
        lines += [f"![training curve]({CURVE_FILE})", ""]
    if rows:
        lines += [curve_table(rows), ""]
    else:
        lines += ["The run's event log has no training metrics.", ""]
    lines += ["## Before and after", "", before_after(inputs.run_dir), "", "## Recipe", "", "```yaml",
              (inputs.run_dir / RECIPE_FILE).read_text(encoding="utf-8").strip(), "```", ""]
    return "\n".join(lines)


def write_card(directory: Path, inputs: CardInputs) -> None:
    """README.md and training_curve.svg into `directory`."""
    rows = metric_rows(inputs.run_dir / EVENTS_FILE)
    curve = training_curve_svg(rows)
    if curve:
        (directory / CURVE_FILE).write_text(curve, encoding="utf-8")
    (directory / CARD_FILE).write_text(card_text(inputs, rows, bool(curve)), encoding="utf-8")
