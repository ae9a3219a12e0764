"""Recipes: the typed YAML that drives every stage of a run.

A recipe is checked against the dataclasses below before anything runs. Each mistake is
one line naming the file (or the `--set` flag), the key and what is expected:

    recipes/my.yaml: training.bta: unknown key; did you mean 'beta'?
    recipes/my.yaml: training: given twice, on lines 2 and 14; YAML would keep only the last ...
    --set lora.rank=100000: expected a value at most 4096, got 100000

    from mipo_mlx.recipe import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["training.beta=0.2"])

YAML is read strictly (RecipeLoader): a key given twice in one mapping, a value YAML's
constructors cannot build (an integer of thousands of digits, a date like 2024-13-45) and
a file nested thousands deep are errors, not a silently dropped section or a traceback.
Every number is finite and every integer key has an upper bound a real run could use
(its help says why). Relative paths in a recipe are taken from the directory `mipo-mlx` runs in.
"""

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mipo_mlx.errors import UserError, read_user_text

BUNDLED_PREFIX = "bundled:"
PATH_PREFIXES = (".", "/", "~")  # how a path to a model is written, as opposed to a name or a Hub id
# Upper bounds of integer keys, each a size no real run reaches (see the keys' help).
LONGEST_CONTEXT = 131_072  # tokens: Llama 3.1's context, the longest of the supported models
MOST_ITEMS = 1_000_000  # prompts or steps: local runs use thousands; the bound catches a mistyped count
LARGEST_BATCH = 4096  # sequences in one forward pass
MOST_LAYERS = 1024  # transformer layers: 0.1-8B models have 16 to 40
# Integers with more digits than this are refused before they are built: every bound above has fewer.
MOST_INTEGER_DIGITS = 100
RECIPE_FIX = "give a YAML file such as recipes/quickstart.yaml"
DEFAULT_LORA_KEYS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def is_hub_id(name: str) -> bool:
    """Whether `name` is written as a Hub repository id, OWNER/NAME, rather than as a path."""
    return name.count("/") == 1 and not name.startswith(PATH_PREFIXES)


def missing_model_file(spec: str) -> bool:
    """Whether a model spec is written as a path (./x, /x, ~/x, x.gguf) to nothing that exists."""
    return (spec.endswith(".gguf") or spec.startswith(PATH_PREFIXES)) and not Path(spec).expanduser().exists()


def _field(default, help: str, **checks):
    """A recipe field with its help text and value checks (min, max, greater_than, less_than)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class ModelConfig:
    path: str = _field(
        "smollm2-135m",
        "The model: the embedded short name 'smollm2-135m', a Hub id "
        "(mlx-community/Qwen2.5-1.5B-Instruct-4bit), an mlx-lm model directory or a .gguf file.",
    )
    revision: Optional[str] = _field(None, "Hub revision (branch, tag or commit) for a Hub id.")
    compute: Literal["auto", "quantized", "float32", "float16", "bfloat16"] = _field(
        "auto",
        "Weights in compute: 'auto' keeps quantized weights on Metal and CUDA and "
        "dequantizes to float32 on the CPU backend (much faster there).",
    )


@dataclass
class DataConfig:
    train: str = _field(
        "bundled:personalization/train",
        "Prompts to sample pairs for: a JSONL file or a bundled set 'bundled:NAME'.",
    )
    test: Optional[str] = _field(
        "bundled:personalization/test",
        "Held-out prompts for before/after comparison: a JSONL file, a bundled set or null.",
    )
    format: Literal["auto", "messages", "prompt", "prism", "gsm8k", "arc"] = _field(
        "auto", "Record layout of the JSONL files; 'auto' detects chat messages or prompt/context."
    )
    on_bad_line: Literal["error", "skip"] = _field(
        "error", "A malformed JSONL line stops the run ('error') or is skipped and counted ('skip')."
    )
    max_prompts: Optional[int] = _field(
        None, "Use at most this many training prompts (at most 1000000; local runs use thousands).",
        min=1, max=MOST_ITEMS,
    )


@dataclass
class SamplingConfig:
    negative: Literal["random_prompt", "drop_context", "swap_context"] = _field(
        "drop_context",
        "Where the rejected answer comes from: another prompt of the set, the same prompt "
        "without the user's context, or the same prompt with another user's context.",
    )
    negatives_per_prompt: int = _field(
        1, "Negatives (and so pairs) per prompt (the paper uses 1; at most 64, each one samples the whole set again).",
        min=1, max=64,
    )
    round_prompts: Literal["all", "split"] = _field(
        "all",
        "Prompts each round of training.rounds samples pairs for: 'all' of them in every round, or 'split': round r "
        "of R every R-th prompt from the r-th on (each prompt in one round: R rounds sample and train as much as one).",
    )
    temperature: float = _field(0.1, "Sampling temperature (0 is greedy).", min=0.0)
    top_p: float = _field(0.9, "Nucleus sampling mass.", greater_than=0.0, max=1.0)
    max_tokens: int = _field(
        512, "Longest answer, in tokens (at most 131072, the longest context of the supported models).",
        min=1, max=LONGEST_CONTEXT,
    )
    batch_size: Optional[int] = _field(
        None, "Answers generated together (at most 4096 sequences in one forward pass); null chooses up to 64 from "
        "the model's size, the answer length and the memory (the same answers at any batch size).",
        min=1, max=LARGEST_BATCH,
    )
    echo_pairs: bool = _field(
        False, "Also make, for each prompt with a context, a pair whose rejected answer is that context itself and "
        "whose chosen answer is the prompt's own (strategy 'echo', nothing to generate), from round "
        "echo_from_round on: maximizing PMI alone rewards answers that copy the context, and this pair counters it.")
    echo_from_round: int = _field(
        1, "With echo_pairs, the first round (training.rounds, at most 100) that makes them: copying the context "
        "starts in round 2, and echo pairs in round 1 take most of what the run learns (README, Choosing the "
        "defaults).",
        min=1, max=100)
    drop_identical: bool = _field(False, "Drop pairs whose chosen and rejected answers are equal.")
    drop_empty: bool = _field(False, "Drop pairs with an empty answer.")
    drop_truncated: bool = _field(False, "Drop pairs with an answer cut by max_tokens.")
    drop_looping: bool = _field(
        False, "Drop pairs whose chosen answer is in a repetition loop (metrics.repetition_loop, as compare counts).")
    drop_echo: Optional[int] = _field(
        None, "Drop pairs whose chosen answer repeats this many consecutive words of its prompt's context or more "
        "(metrics.echoed_words; compare's context_echo counts 5; at most 131072, the longest context of the supported "
        "models); null keeps them.", min=1, max=LONGEST_CONTEXT)
    drop_similar: Optional[float] = _field(
        None, "Drop pairs whose two answers are this similar or more (Self-BLEU of the pair, 0 to 1); null keeps "
        "them.", greater_than=0.0, max=1.0)


@dataclass
class LoraConfig:
    rank: int = _field(8, "LoRA rank r (at most 4096, the widest hidden size of a 0.1-8B model: a rank beyond a "
                          "layer's width adds nothing).", min=1, max=4096)
    scale: float = _field(
        20.0,
        "mlx-lm's LoRA scale: it multiplies the update directly (PEFT's lora_alpha = scale x rank).",
        greater_than=0.0,
    )
    dropout: float = _field(0.0, "Dropout on the LoRA input.", min=0.0, less_than=1.0)
    num_layers: int = _field(
        -1, "How many of the last layers get LoRA; -1 means all (at most 1024: 0.1-8B models have 16 to 40 layers, "
        "and a count above the model's means all of them).", min=-1, max=MOST_LAYERS,
    )
    keys: list[str] = _field(DEFAULT_LORA_KEYS, "Module paths inside each layer that get LoRA.")

    def __post_init__(self):
        if self.num_layers == 0:
            raise UserError("must be -1 (all layers) or a positive count, not 0", key="lora.num_layers")
        if not self.keys:
            raise UserError("expected at least one module path, such as [self_attn.q_proj, self_attn.v_proj]",
                            key="lora.keys")


@dataclass
class TrainingConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "infonce"] = _field(
        "sigmoid", "DPO loss: sigmoid (the paper's), ipo, hinge or robust (conservative smoothing), each per pair; or "
        "infonce, each prompt's chosen answer against all its negatives at once (sampling.negatives_per_prompt, and "
        "its echo pair's context): -log softmax of the implicit rewards at the chosen answer."
    )
    beta: float = _field(0.1, "DPO beta: strength of the pull towards the reference.", greater_than=0.0)
    label_smoothing: float = _field(
        0.0, "Label smoothing for the robust and sigmoid losses.", min=0.0, less_than=0.5
    )
    nll_weight: float = _field(
        0.0, "Weight of an NLL term on the chosen answers (TRL's 'sft' loss: the mean over the batch's chosen "
        "tokens); 0 turns it off.", min=0.0)
    ld_alpha: Optional[float] = _field(
        None, "Length desensitization (TRL's ld_alpha, LD-DPO): answer tokens past the shorter answer of a pair "
        "count with this weight, in the policy's log-probs and (where TRL leaves them whole) the reference's, so "
        "that the loss starts at ln 2; null turns it off.", min=0.0, max=1.0)
    dpop_lambda: float = _field(
        0.0, "DPO-Positive (Smaug): the margin loses this much per nat the chosen answer's log-prob falls below "
        "the reference's; 0 turns it off.", min=0.0)
    learning_rate: float = _field(2e-5, "Peak learning rate of AdamW.", greater_than=0.0)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = _field(
        "cosine", "Learning rate after the warm-up: cosine or linear decay to 0, or constant (names as in "
        "transformers).")
    warmup_ratio: float = _field(0.03, "Share of steps spent warming up.", min=0.0, less_than=1.0)
    epochs: int = _field(1, "Passes over the training pairs (at most 1000: DPO overfits its pairs in a few).",
                         min=1, max=1000)
    max_steps: Optional[int] = _field(
        None, "Stop after this many optimizer steps (at most 1000000; local runs take thousands).",
        min=1, max=MOST_ITEMS,
    )
    batch_size: int = _field(4, "Pairs per micro-batch, a prompt's pairs in one batch where they fit (with infonce "
                             "a prompt with more is a batch of its own); at most 4096 pairs in one forward pass.",
                             min=1, max=LARGEST_BATCH)
    grad_accumulation: int = _field(1, "Micro-batches per optimizer step (at most 4096, as batch_size).",
                                    min=1, max=LARGEST_BATCH)
    max_grad_norm: float = _field(1.0, "Gradient clipping norm.", greater_than=0.0)
    adam_betas: list[float] = _field([0.9, 0.95], "AdamW betas.")
    weight_decay: float = _field(0.0, "AdamW weight decay.", min=0.0)
    grad_checkpoint: bool = _field(False, "Recompute activations in the backward pass to save memory.")
    max_seq_length: int = _field(
        1024, "Longest prompt plus answer, in tokens (at most 131072, the longest context of the supported models).",
        min=8, max=LONGEST_CONTEXT,
    )
    eval_fraction: float = _field(0.1, "Share of pairs held out for evaluation.", min=0.0, less_than=1.0)
    report_every: int = _field(1, "Steps between metric reports (at most 1000000, as max_steps).",
                               min=1, max=MOST_ITEMS)
    eval_every: int = _field(10, "Steps between held-out evaluations, and one at the last step (at most 1000000, "
                             "as max_steps).",
                             min=1, max=MOST_ITEMS)
    save_every: int = _field(20, "Steps between checkpoints (at most 1000000, as max_steps).",
                             min=1, max=MOST_ITEMS)
    select_checkpoint: Literal["last", "eval_loss", "eval_reward_accuracy"] = _field(
        "last", "Which step's adapter is the final one: the last, or the held-out evaluation with the lowest DPO "
        "loss or the highest reward accuracy (needs training.eval_fraction > 0).")
    early_stopping_patience: Optional[int] = _field(
        None, "Stop when select_checkpoint's held-out metric has not improved for this many evaluations (at most "
        "1000, as epochs); null trains every step.", min=1, max=1000)
    probe_prompts: int = _field(
        8, "Held-out prompts answered greedily at each held-out evaluation, to report repetition loops, copies of "
        "the context (as compare's context_echo) and answer length while training (0 turns it off; at most 256: each "
        "evaluation answers them all).", min=0, max=256)
    rounds: int = _field(
        1, "Rounds of iterative MIPO: each round after the first samples new pairs from the model the round before "
        "made (the base with its adapter), which is then the reference, and trains that adapter on (at most 100: "
        "each round samples every prompt again, or its part of them with sampling.round_prompts: split).",
        min=1, max=100)

    def __post_init__(self):
        if self.loss == "infonce":
            # Each is defined on one pair's margin; InfoNCE has one chosen reward against k negatives.
            for key, off in (("label_smoothing", 0.0), ("dpop_lambda", 0.0), ("ld_alpha", None)):
                if getattr(self, key) != off:
                    raise UserError("applies to the pairwise losses, not to training.loss: infonce; remove it or "
                                    "set training.loss: sigmoid", key=f"training.{key}")
        if self.select_checkpoint != "last" and not self.eval_fraction:
            raise UserError(f"{self.select_checkpoint} needs held-out pairs; set training.eval_fraction above 0 "
                            "or training.select_checkpoint: last", key="training.select_checkpoint")
        if self.early_stopping_patience and self.select_checkpoint == "last":
            raise UserError("early stopping watches the metric of training.select_checkpoint; set it to eval_loss "
                            "or eval_reward_accuracy", key="training.early_stopping_patience")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise UserError(
                f"expected two numbers in [0, 1), such as [0.9, 0.95], got {self.adam_betas}",
                key="training.adam_betas",
            )


@dataclass
class EvalConfig:
    max_prompts: int = _field(
        40, "Held-out prompts to answer before and after training (at most 1000000, as data.max_prompts).",
        min=1, max=MOST_ITEMS,
    )
    temperature: float = _field(0.1, "Sampling temperature for before/after answers.", min=0.0)
    top_p: float = _field(0.9, "Nucleus sampling mass for before/after answers.", greater_than=0.0, max=1.0)
    max_tokens: int = _field(
        256, "Longest before/after answer, in tokens (at most 131072, the longest context of the supported models).",
        min=1, max=LONGEST_CONTEXT,
    )
    bootstrap_samples: int = _field(
        1000, "Bootstrap resamples for the 95% intervals (100 to 1000000: fewer give unsteady intervals, more only take longer).",
        min=100, max=MOST_ITEMS,
    )
    math_shots: int = _field(
        8,
        "Worked examples before each math question (records with a numeric gold answer): the paper's GSM8K "
        "prompt is 8-shot chain of thought; 0 asks for 'The answer is N.' instead.",
        min=0,
        max=8,
    )
    judge_model: Optional[str] = _field(
        None,
        "Judge that scores each answer 1 to 5 per stated preference (the paper's rubric): any model "
        "model.path accepts; the run's own model is reused with the adapter off; null: no judge.",
    )

    def __post_init__(self):
        model = self.judge_model
        if model and missing_model_file(model):
            raise UserError(f"not found: {model}; give an existing model directory or .gguf file, a Hub id, "
                            "'smollm2-135m', or null for no judge", key="eval.judge_model")


@dataclass
class ExportConfig:
    formats: list[Literal["mlx", "peft", "fused", "gguf"]] = _field(
        ["mlx", "peft"], "Formats to export: mlx, peft, fused, gguf."
    )
    repo_id: Optional[str] = _field(None, "Hub repository to push to (user/name); null keeps it local.")
    private: bool = _field(True, "Create the Hub repository as private.")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "What to load."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompts in and held out."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "MIPO pair sampling."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "The LoRA adapter."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "The DPO step."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Before/after comparison."})
    export: ExportConfig = field(
        default_factory=ExportConfig, metadata={"help": "Where the adapter goes (read by mipo-mlx export)."}
    )
    output_dir: str = _field("runs", "Folder that holds run directories.")
    run_name: Optional[str] = _field(None, "Run directory name inside output_dir; null uses the recipe file's name.")
    seed: int = _field(0, "Seed for sampling, data order and LoRA initialization (a 32-bit seed: 0 to 4294967295).",
                       min=0, max=2**32 - 1)

    def __post_init__(self):
        sampling, rounds = self.sampling, self.training.rounds
        if sampling.echo_pairs and sampling.echo_from_round > rounds:
            raise UserError(f"echo pairs from round {sampling.echo_from_round} need that many rounds, and "
                            f"training.rounds is {rounds}; set sampling.echo_from_round to at most {rounds} or more "
                            "training.rounds", key="sampling.echo_from_round")
        name = self.run_name
        if name is not None and (Path(name).name != name or name in (".", "..")):
            raise UserError(f"expected the name of one folder inside output_dir, such as quickstart, got {name!r}",
                            key="run_name")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, strict where YAML is lenient or fails with a traceback.

    A key given twice in one mapping (YAML keeps the last, silently dropping the first) and
    an integer of more than MOST_INTEGER_DIGITS digits are errors naming the key; a value
    a constructor cannot build (a date like 2024-13-45) is an error naming its line.
    """

    def construct_document(self, node):
        _check_nodes(node, "", set())
        return super().construct_document(node)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as error:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({' '.join(str(error).split())}); quote it to keep it as text",
                node.start_mark,
            ) from None


def _check_nodes(node, path: str, visited: set) -> None:
    """Keys given twice and integers too long for any key, anywhere below `node` (at `path`)."""
    if id(node) in visited:  # an alias: already checked where it was defined
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` reuses keys by design
                _check_nodes(value_node, path, visited)
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            where = f"{path}.{name}" if path else name
            line = key_node.start_mark.line + 1
            if (key_node.tag, name) in lines:
                dropped = ("the first one's keys: merge the two into one section" if isinstance(value_node, yaml.MappingNode)
                           else "the first: remove one")
                raise UserError(f"given twice, on lines {lines[key_node.tag, name]} and {line}; YAML would keep only "
                                f"the last and drop {dropped}", key=where)
            lines[key_node.tag, name] = line
            _check_nodes(value_node, where, visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_nodes(item, f"{path}[{index}]", visited)
    elif node.tag == "tag:yaml.org,2002:int":
        digits = sum(c.isdigit() for c in node.value)
        if digits > MOST_INTEGER_DIGITS:
            raise UserError(f"an integer of {digits} digits, beyond the range of every recipe key", key=path or None)


def _load_yaml(text: str):
    """`text` read by RecipeLoader; raises yaml.YAMLError, RecursionError or UserError."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(text: str, file: str | None = None):
    """`text` read by RecipeLoader; any YAML mistake is a one-line UserError naming the line."""
    try:
        return _load_yaml(text)
    except yaml.constructor.ConstructorError as error:
        raise UserError(f"line {error.problem_mark.line + 1}: {error.problem}", file=file) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        problem = error.problem or error.context or "invalid YAML"
        raise UserError(f"{line}YAML syntax error ({problem}); check indentation and quoting", file=file) from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        raise UserError(f"line {line}: character U+{error.character:04X} is not allowed in YAML; remove it",
                        file=file) from None
    except RecursionError:
        raise UserError("nested too deeply to be a recipe; a recipe is sections of keys such as 'training: {beta: 0.1}'",
                        file=file) from None
    except UserError as error:
        raise UserError(error.message, file=file, key=error.key) from None


def _shown(value) -> str:
    """`value` as an error message quotes it: its repr, cut short (a YAML alias bomb stays a few words)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 50, 50
    return short.repr(value)


def _type_name(tp, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0], plural=True)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if plural:
        names = {int: "integers", float: "numbers", str: "strings"}
    return names.get(tp, str(tp))


def _coerce(value, tp, where: str, file: str):
    """Check one YAML value against a field type; return it in that type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], where, file)
    expected = f"expected {_type_name(tp)}, got {_shown(value)}"
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(expected + hint, file=file, key=where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(expected, file=file, key=where)
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML reads 2e-5 (no dot) as a string; accept numeric strings as numbers.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UserError(expected, file=file, key=where) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                number = math.inf
            if math.isfinite(number):
                return number
            raise UserError(f"expected a finite number, got {_shown(value)}", file=file, key=where)
    elif tp is str:
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, str):
            raise UserError("expected a non-empty string", file=file, key=where)
    raise UserError(expected, file=file, key=where)


BOUNDS = [
    ("min", lambda v, b: v >= b, "at least", "≥"),
    ("greater_than", lambda v, b: v > b, "greater than", ">"),
    ("max", lambda v, b: v <= b, "at most", "≤"),
    ("less_than", lambda v, b: v < b, "less than", "<"),
]


def _check_range(value, meta: dict, where: str, file: str):
    if value is None:
        return
    for name, ok, words, _ in BOUNDS:
        if name in meta and not ok(value, meta[name]):
            raise UserError(f"expected a value {words} {meta[name]}, got {_shown(value)}", file=file, key=where)


def _range_text(meta: dict) -> str:
    """The bounds of a key for the reference: "1 to 4096", "> 0.0", "≥ 0.0, < 1.0"."""
    if "min" in meta and "max" in meta:
        return f"{meta['min']} to {meta['max']}"
    return ", ".join(f"{sign} {meta[name]}" for name, _, _, sign in BOUNDS if name in meta)


def _checked(value, tp, meta: dict, where: str | None, file: str | None):
    """`value` in field type `tp` and within the bounds in `meta`; a one-line UserError otherwise."""
    value = _coerce(value, tp, where, file)
    _check_range(value, meta, where, file)
    return value


def _text_value(text: str):
    """A value typed on the command line, read as YAML; text that is not YAML stays text."""
    if not text.strip():
        return None
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise UserError("nested too deeply to be a recipe value") from None


def field_value(cls, name: str, text: str):
    """Key `name` of recipe section `cls` given as a command-line flag (`mipo-mlx eval --top-p 0.9`).

    The text is read as `--set` reads a value and checked as the recipe checks the key; a
    mistake is a UserError without a key, for the caller to name its flag.
    """
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    try:
        return _checked(_text_value(text), typing.get_type_hints(cls)[name], meta, None, None)
    except UserError as error:
        raise UserError(error.message) from None


def _unknown_key(key, fields) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
    return "unknown key; " + (f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(fields))


def _blamed(error: UserError, overrides: dict) -> UserError:
    """`error` under the `--set` flag that gave the key, when a flag gave it."""
    flag = overrides.get((error.key or "").split("[")[0])
    return UserError(error.message, key=flag) if flag else error


def _build(cls, raw, prefix: str, file: str, overrides: dict):
    """Build dataclass `cls` from the mapping `raw`, checking every key.

    `overrides` maps a dotted key to the `--set` flag that gave its value, which a mistake in it names.
    """
    if not isinstance(raw, dict):
        what = "the recipe" if not prefix else prefix
        raise UserError(f"expected a mapping of keys for {what}, got {_shown(raw)}", file=file, key=prefix or None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise UserError(_unknown_key(key, fields), file=file, key=where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, where, file, overrides)
        else:
            try:
                kwargs[key] = _checked(value, tp, fields[key].metadata, where, file)
            except UserError as error:
                raise _blamed(error, overrides) from None
    try:
        return cls(**kwargs)
    except UserError as error:
        raise _blamed(UserError(error.message, file=file, key=error.key), overrides) from None


def _apply_override(raw: dict, override: str, file: str) -> str:
    """Apply one `--set section.key=value` to the raw mapping (the value read as YAML); returns the dotted key."""
    if "=" not in override:
        raise UserError(f"expected KEY=VALUE such as training.beta=0.2, got {_shown(override)}", key="--set")
    flag = f"--set {override}"
    dotted, _, text = override.partition("=")
    parts = dotted.strip().split(".")
    if not all(part.strip() for part in parts):
        raise UserError("expected KEY=VALUE with a recipe key such as training.beta=0.2", key=flag)
    cls, node = Recipe, raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise UserError(f"{where}: {_unknown_key(part, fields)}", key=flag)
        tp = typing.get_type_hints(cls)[part]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(tp) and last:
            example = dataclasses.fields(tp)[0].name
            raise UserError(f"{where} is a section; set one of its keys, such as {where}.{example}=...", key=flag)
        if not dataclasses.is_dataclass(tp) and not last:
            raise UserError(f"{where} is a key, not a section", key=flag)
        if last:
            try:
                node[part] = _text_value(text)
            except UserError as error:
                raise UserError(error.message, key=flag) from None
            return where
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"expected a mapping of keys for {where}, got {_shown(child)}", file=file, key=where)
        cls, node = tp, child


def _check_paths(recipe: Recipe, file: str, overrides: dict) -> None:
    """Local files named by the recipe must exist; bundled names are checked by the data reader."""
    for key, value in (("data.train", recipe.data.train), ("data.test", recipe.data.test)):
        if value and not value.startswith(BUNDLED_PREFIX) and not Path(value).is_file():
            problem = f"{value} is a directory, not a JSONL file" if Path(value).is_dir() else f"file not found: {value}"
            error = UserError(
                f"{problem}; give a JSONL file or a bundled set such as 'bundled:personalization/train'",
                file=file,
                key=key,
            )
            raise _blamed(error, overrides)
    model = recipe.model.path
    if missing_model_file(model):
        error = UserError(
            f"not found: {model}; give an existing model directory or .gguf file, a Hub id, or 'smollm2-135m'",
            file=file,
            key="model.path",
        )
        raise _blamed(error, overrides)


def parse_recipe(text: str, file: str = "<recipe>", overrides: list[str] = (), check_paths: bool = True) -> Recipe:
    """Parse and check recipe YAML text, applying `section.key=value` overrides first.

    check_paths=False leaves out the check that local files exist: for a run's saved recipe
    read from a folder other than the one the run started in (the TUI).
    """
    raw = read_yaml(text, file)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping of sections such as 'model:' and 'training:', got {type(raw).__name__}", file=file)
    flags = {}
    for override in overrides:
        flags[_apply_override(raw, override, file)] = f"--set {override}"
    recipe = _build(Recipe, raw, "", file, flags)
    if check_paths:
        _check_paths(recipe, file, flags)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and check a recipe file; any mistake is a one-line UserError."""
    path = Path(path)
    recipe = parse_recipe(read_user_text(path, what="recipe", fix=RECIPE_FIX), str(path), overrides)
    if recipe.run_name is None:
        recipe.run_name = path.stem
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every key written out."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def recipe_reference() -> str:
    """Markdown reference of every recipe key: type, default and meaning (for the README)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = yaml.safe_dump(default, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            bounds = _range_text(f.metadata)
            kind = f"{_type_name(tp)}, {bounds}" if bounds else _type_name(tp)
            lines.append(f"| `{prefix}{f.name}` | {kind} | `{shown}` | {f.metadata['help']} |")

    walk(Recipe, "")
    return "\n".join(lines)
