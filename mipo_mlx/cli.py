"""The `mipo-mlx` command: one entry point, one subcommand per stage.

    mipo-mlx train recipes/quickstart.yaml          # sample, DPO, compare in one run dir
    mipo-mlx sample recipes/quickstart.yaml         # the pair sampling stage alone
    mipo-mlx export runs/quickstart --to out       # MLX/PEFT adapter, fused model, model card
    mipo-mlx eval smollm2-135m --adapter runs/quickstart --data bundled:math/test   # any model, outside a run
    mipo-mlx info smollm2-135m                      # what a model is and what it needs
    mipo-mlx convert smollm2-135m out/smollm2       # an mlx-lm model directory

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
only the module of the command being run is imported, so `--help` is instant.
A UserError or a usage mistake becomes one line on stderr, printed here and nowhere
else, and exit status 2.
"""

import argparse
import importlib
import logging
import sys

from mipo_mlx.errors import EXIT_USER_ERROR, UserError

COMMANDS = {
    "train": ("mipo_mlx.pipeline", "Run a recipe: sample pairs, train the LoRA adapter with DPO, compare before and after."),
    "sample": ("mipo_mlx.pipeline", "Run only the MIPO pair sampling stage of a recipe."),
    "compare": ("mipo_mlx.compare", "Answer held-out prompts before and after training and report the metrics."),
    "eval": ("mipo_mlx.evaluate", "Evaluate any model, with or without an adapter, on a prompt set: the report of compare."),
    "export": ("mipo_mlx.export", "Write a run's adapter as MLX, PEFT, fused or GGUF files with a model card; push to the Hub."),
    "convert": ("mipo_mlx.convert", "Write an mlx-lm model directory from a GGUF file, a Hub id or the embedded model."),
    "info": ("mipo_mlx.info", "Describe a model: architecture, size, quantization, chat template, memory needs."),
    "tui": ("mipo_mlx_tui.app", "Open the terminal UI on a run directory or a recipe."),
}


def report_error(message: str) -> None:
    """The one place an error reaches the terminal: one line on stderr."""
    sys.stderr.write(f"mipo-mlx: error: {' '.join(message.split())}\n")


def says(error: UserError) -> bool:
    """Whether this process prints the error: on several ranks of one run, rank 0 says what all meet (distributed.py)."""
    distributed = sys.modules.get("mipo_mlx.distributed")
    return distributed is None or distributed.says(error)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit status 2."""

    def error(self, message):
        report_error(f"{message} (see {self.prog} --help)")
        sys.exit(EXIT_USER_ERROR)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mipo-mlx", description="MIPO preference optimization for small models, in MLX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug messages.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    subparsers.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="mipo-mlx: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args) or 0
    except UserError as error:
        if says(error):
            report_error(str(error))
        return getattr(error, "exit_status", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("mipo-mlx: interrupted; what was written is kept, run the same command to resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
