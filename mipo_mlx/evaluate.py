"""`mipo-mlx eval`: any model, with or without an adapter, outside a run; the report of `compare`.

    mipo-mlx eval smollm2-135m --data bundled:math/test
    mipo-mlx eval smollm2-135m --adapter runs/quickstart/adapters --data bundled:personalization/test
    mipo-mlx eval mlx-community/Qwen2.5-1.5B-Instruct-4bit --adapter runs/p --data my.jsonl \\
        --judge-model mlx-community/Qwen2.5-7B-Instruct-4bit --out evals/p

One loaded model answers each prompt with the adapter off (before) and, given --adapter,
on (after), with the same sampler and seed: no second copy of the model. Without
--adapter the report has one column. The metrics are compare's (mipo_mlx/compare.py),
the files report.py's: answers.jsonl, metrics.json and report.md in --out (default
evals/MODEL or evals/MODEL+ADAPTER). Mutual information needs a run's held-out pairs,
so it is only in `mipo-mlx compare`.

The flags after --data are the recipe's `eval` keys (--max-prompts, --temperature,
--top-p, --max-tokens, --bootstrap-samples, --math-shots, --judge-model) and
`data.on_bad_line` (--on-bad-line error|skip: a malformed line of --data stops the command
or is skipped and counted), with the same defaults and checks; a bad value is one line
naming the flag, exit status 2.
"""

import argparse
import dataclasses
import logging
import typing
from pathlib import Path

from mipo_mlx import distributed
from mipo_mlx.compare import answer_and_score, report_header
from mipo_mlx.data import READERS, read_prompts
from mipo_mlx.errors import UserError, rekeyed
from mipo_mlx.judge import load_judge, load_named
from mipo_mlx.lora import load_adapter
from mipo_mlx.preflight import check_adapter, check_model, check_output_folder
from mipo_mlx.recipe import BUNDLED_PREFIX, DataConfig, EvalConfig, field_value
from mipo_mlx.report import report_summary, write_outputs
from mipo_mlx.rundir import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTERS_DIR, ANSWERS_FILE, METRICS_FILE, REPORT_FILE, final_adapter_dir,
)

logger = logging.getLogger("mipo_mlx")
EVALS_DIR = Path("evals")


def recipe_option(cls, name: str):
    """argparse type for the recipe key `name` of section `cls`: read and checked as in a recipe."""

    def convert(text: str):
        try:
            return field_value(cls, name, text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_arguments(parser) -> None:
    from mipo_mlx.loading import COMPUTE_CHOICES

    parser.add_argument("model", metavar="MODEL", help="'smollm2-135m', a Hub id, an mlx-lm model directory or a .gguf file.")
    parser.add_argument("--adapter", metavar="PATH",
                        help=f"An adapter directory ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}) or a run directory.")
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="Prompts: a JSONL file or a bundled set such as bundled:math/test.")
    parser.add_argument("--format", default="auto", choices=["auto", *READERS], help="Record layout of the JSONL file.")
    parser.add_argument("--out", metavar="DIR", help="Where the report goes (default: evals/MODEL[+ADAPTER]).")
    parser.add_argument("--seed", type=int, default=0, help="Sampler seed.")
    parser.add_argument("--compute", default="auto", choices=COMPUTE_CHOICES, help="Weights in compute, as model.compute.")
    on_bad_line = next(f for f in dataclasses.fields(DataConfig) if f.name == "on_bad_line")
    choices = typing.get_args(typing.get_type_hints(DataConfig)["on_bad_line"])
    parser.add_argument("--on-bad-line", default=on_bad_line.default, metavar="{" + ",".join(choices) + "}",
                        type=recipe_option(DataConfig, "on_bad_line"),
                        help=f"{on_bad_line.metadata['help']} (default: {on_bad_line.default})")
    for field in dataclasses.fields(EvalConfig):
        parser.add_argument(flag(field.name), dest=field.name, default=argparse.SUPPRESS, metavar="VALUE",
                            type=recipe_option(EvalConfig, field.name),
                            help=f"{field.metadata['help']} (default: {field.default})".replace("%", "%%"))


def adapter_directory(path: str) -> Path:
    """The adapter directory named by --adapter: itself, or a run directory's final adapter (its last round's)."""
    for candidate in (Path(path), final_adapter_dir(Path(path))):
        if (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise UserError(f"no adapter in {path}; give a directory with {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} "
                    f"(such as runs/quickstart/{ADAPTERS_DIR}) or a run directory", key="--adapter")


def default_out(model: str, adapter: Path | None) -> Path:
    name = Path(model).name.removesuffix(".gguf")
    if adapter is not None:
        name += "+" + (adapter.parent.name if adapter.name == ADAPTERS_DIR else adapter.name)
    return EVALS_DIR / name


def prepare(args):
    """The flags checked, the prompts read, the model (and adapter, judge) loaded: what run answers with."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    try:
        eval_config = EvalConfig(**options)
    except UserError as error:
        raise rekeyed(error, flag(error.key.split(".")[-1])) from None
    if args.seed < 0:
        raise UserError(f"expected a seed of 0 or more, got {args.seed}", key="--seed")
    if not args.data.startswith(BUNDLED_PREFIX) and not Path(args.data).is_file():
        raise UserError(f"file not found: {args.data}; give a JSONL file or a bundled set such as bundled:math/test",
                        key="--data")
    adapter = adapter_directory(args.adapter) if args.adapter else None
    if adapter is not None:
        check_adapter(adapter, "--adapter", "the adapter is truncated or damaged; give one that mipo-mlx train or mlx-lm wrote")
    try:
        records = read_prompts(args.data, args.format, args.on_bad_line, key="--data",
                               skip_with="pass --on-bad-line skip")[: eval_config.max_prompts]
    except UserError as error:
        raise rekeyed(error, "--data") from None
    check_model(args.model, key="MODEL")
    if eval_config.judge_model and eval_config.judge_model != args.model:
        check_model(eval_config.judge_model, key="--judge-model")
    named = Path(args.adapter) if args.adapter else None  # the folder given, not the round's adapters/ inside it
    out = Path(args.out) if args.out else default_out(args.model, named)
    check_output_folder(out, "--out")
    loaded = load_named(args.model, "MODEL", compute=args.compute)
    if adapter is not None:
        try:
            load_adapter(loaded.model, adapter)
        except UserError as error:
            raise rekeyed(error, "--adapter") from None
    judge = eval_config.judge_model and load_judge(eval_config.judge_model, loaded, args.seed, key="--judge-model")
    return out, records, eval_config, adapter, loaded, judge


def run(args) -> int:
    # Every rank checks its own files and loads its own model; rank 0 writes the report.
    out, records, eval_config, adapter, loaded, judge = distributed.agree(lambda: prepare(args))
    logger.info(f"answering {len(records)} prompts{' with the adapter off and on' if adapter else ''}")
    rows, metrics = answer_and_score(loaded.model, loaded.tokenizer, records, eval_config, args.seed,
                                     adapted=adapter is not None, judge=judge)
    if distributed.is_main():
        header = report_header(loaded.source, str(adapter) if adapter else "none", args.data, records, eval_config,
                               args.seed)
        write_outputs(out, rows, metrics, header)
        print(report_summary(out))
        print(f"wrote {out}/{ANSWERS_FILE}, {METRICS_FILE} and {REPORT_FILE}")
    return 0
