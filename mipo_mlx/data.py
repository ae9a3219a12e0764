"""Prompt files: JSONL in the layouts people have, read into one record type.

    records = read_prompts("my_prompts.jsonl")             # or "bundled:personalization/train"
    records[0].messages()                                  # full prompt: context + question
    records[0].messages(context=None)                      # the same question, context left out
    check_negatives(records, "drop_context")               # the records can give that negative (a UserError if not)

Layouts (detected per line when the recipe says `format: auto`):

| layout          | fields read                                                              |
| --------------- | ------------------------------------------------------------------------ |
| messages        | `messages`: a system message is the user's context; the last user message is the question; earlier turns are kept |
| prompt          | `prompt` (the question) and optional `context` (the user's preferences or profile) |
| gsm8k           | `question`, `answer` (gold = the number after `####`)                    |
| arc             | `question.stem`, `question.choices[].label/text`, `answerKey` (gold letter) |
| prism           | `conversation_id`, the first `conversation_history` turn with role `user`, and `system_string` as context |

Every record keeps an id: the line's `id` (or `conversation_id`) when it has one, else a
hash of its content, so ids stay stable when lines move. Other fields (preferences,
profile ids, gold answers) are kept in `extras` for evaluation. A malformed line is an
error naming file:line and what a record looks like, or, with `on_bad_line: skip`, is
skipped, counted and reported. A file that is not JSON lines at all (CSV, YAML, plain
text, one JSON array) is named for what it seems to be; bytes that are not UTF-8 are named
by file:line:column; two records with the same id are named by both lines.
"""

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from mipo_mlx.errors import UserError, not_utf8, unreadable
from mipo_mlx.files import read_lines
from mipo_mlx.recipe import BUNDLED_PREFIX

logger = logging.getLogger("mipo_mlx")
BUNDLED_DIR = Path(__file__).parent / "bundled"
KEEP = object()  # messages(): keep the record's own context
ARC_INSTRUCTION = 'Answer with the letter of the correct choice, ending with "The answer is: X".'


@dataclass
class PromptRecord:
    id: str
    question: str
    context: str | None = None
    history: list[dict] = field(default_factory=list)  # earlier chat turns, without the system message
    extras: dict = field(default_factory=dict)  # preferences, profile_id, gold answer, ...
    where: str | None = field(default=None, compare=False)  # "FILE:LINE" it was read from, for messages

    def messages(self, context=KEEP) -> list[dict]:
        """The chat prompt; pass `context=None` to leave the context out or a string to swap it."""
        context = self.context if context is KEEP else context
        system = [{"role": "system", "content": context}] if context else []
        return system + self.history + [{"role": "user", "content": self.question}]


def context_of(messages: list[dict]) -> str:
    """The user's context in a chat prompt (PromptRecord.messages puts it in the system message); "" without one."""
    return "\n".join(m["content"] for m in messages if m["role"] == "system")


def bundled_path(name: str, key: str) -> Path:
    """File of a bundled set, e.g. 'personalization/train'; `key` is what named it, for the error."""
    path = BUNDLED_DIR / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(str(p.relative_to(BUNDLED_DIR).with_suffix("")) for p in BUNDLED_DIR.glob("*/*.jsonl"))
        raise UserError(f"no bundled set {name!r}; bundled sets: {', '.join(available)}", key=key)
    return path


def resolve_data_path(spec: str, key: str) -> Path:
    return bundled_path(spec[len(BUNDLED_PREFIX):], key) if spec.startswith(BUNDLED_PREFIX) else Path(spec)


def _content_id(*parts) -> str:
    return "p-" + hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:12]


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _from_messages(row: dict) -> PromptRecord:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a list of {role, content} objects")
    system = [m for m in messages if m.get("role") == "system"]
    turns = [{"role": m.get("role"), "content": m.get("content")} for m in messages if m.get("role") != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    for turn in turns:
        _text(turn["content"], f"a {turn['role']} message's content")
    context = "\n".join(_text(m.get("content"), "the system message") for m in system) or None
    question = turns[-1]["content"]
    return PromptRecord(str(row.get("id") or _content_id(context, turns)), question, context, turns[:-1])


def _from_prompt(row: dict) -> PromptRecord:
    question = _text(row["prompt"], "'prompt'")
    context = row.get("context")
    if context is not None:
        context = _text(context, "'context'")
    return PromptRecord(str(row.get("id") or _content_id(context, question)), question, context)


def _from_gsm8k(row: dict) -> PromptRecord:
    question = _text(row["question"], "'question'")
    answer = _text(row["answer"], "'answer'")
    gold = answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else None
    if gold is None:
        raise ValueError("'answer' must end with '#### <number>' (GSM8K layout)")
    return PromptRecord(str(row.get("id") or _content_id(question)), question, extras={"gold": gold, "solution": answer})


def _from_arc(row: dict) -> PromptRecord:
    question = row["question"]
    if not isinstance(question, dict) or "stem" not in question or not isinstance(question.get("choices"), list):
        raise ValueError("'question' must hold 'stem' and 'choices' (ARC layout)")
    choices = "\n".join(f"{c['label']}. {c['text']}" for c in question["choices"])
    text = f"{_text(question['stem'], 'question.stem')}\n{choices}\n{ARC_INSTRUCTION}"
    gold = _text(row["answerKey"], "'answerKey'")
    return PromptRecord(str(row.get("id") or _content_id(text)), text, extras={"gold": gold})


def _from_prism(row: dict) -> PromptRecord:
    turns = row["conversation_history"]
    first_user = next((t for t in turns if isinstance(t, dict) and t.get("role") == "user"), None)
    if first_user is None:
        raise ValueError("'conversation_history' has no user turn")
    context = row.get("system_string") or None
    return PromptRecord(str(row.get("conversation_id") or _content_id(first_user["content"])),
                        _text(first_user["content"], "the user turn"), context)


READERS = {"messages": _from_messages, "prompt": _from_prompt, "gsm8k": _from_gsm8k, "arc": _from_arc, "prism": _from_prism}
KNOWN_EXTRAS = {"id", "messages", "prompt", "context", "question", "answer", "answerKey", "conversation_history", "system_string"}
# One line of each layout, for messages that say what a record should look like.
EXAMPLES = {
    "prompt": '{"prompt": "...", "context": "..."}',
    "messages": '{"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}',
    "gsm8k": '{"question": "...", "answer": "... #### 42"}',
    "arc": '{"question": {"stem": "...", "choices": [{"label": "A", "text": "..."}]}, "answerKey": "A"}',
    "prism": '{"conversation_id": "...", "conversation_history": [{"role": "user", "content": "..."}], '
             '"system_string": "..."}',
}
YAML_LINE = re.compile(r"""\s*(- +)?["']?[\w -]+["']?:(\s|$)|\s*- |---""")


class DuplicateRecord(ValueError):
    """A line whose record has the id of an earlier one."""


def detect_layout(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversation_history" in row:
        return "prism"
    if "prompt" in row:
        return "prompt"
    if isinstance(row.get("question"), dict):
        return "arc"
    if "question" in row and "answer" in row:
        return "gsm8k"
    raise ValueError("expected 'messages', 'prompt', a GSM8K 'question'/'answer' or an ARC 'question' object")


def record_example(layout: str) -> str:
    """What one line of `layout` looks like ('auto': the prompt and messages layouts)."""
    return EXAMPLES[layout] if layout in EXAMPLES else f"{EXAMPLES['prompt']} or {EXAMPLES['messages']}"


def _file_kind(lines: list[bytes]) -> str | None:
    """What a file whose first lines are these and not JSON seems to be, or None when it is JSON lines gone wrong."""
    sample = [line.decode("utf-8", errors="replace").rstrip("\r\n") for line in lines]
    first = sample[0].strip()
    if first.startswith("["):
        return "one JSON array"
    if first == "{":
        return "JSON objects spread over several lines"
    if first.startswith(("{", '"')):
        return None
    for delimiter, name in ((",", "CSV"), ("\t", "tab-separated values"), (";", "CSV")):
        widths = {len(row) for row in csv.reader(sample, delimiter=delimiter)}
        if len(sample) > 1 and len(widths) == 1 and widths.pop() > 1:
            return name
    if sum(bool(YAML_LINE.match(line)) for line in sample) * 2 >= len(sample):
        return "YAML"
    return "plain text"


def read_prompt_file(spec: str, layout: str = "auto", on_bad_line: str = "error", key: str = "data.train",
                     skip_with: str = "set data.on_bad_line: skip") -> tuple[list[PromptRecord], list[str]]:
    """Records of a JSONL prompt file or bundled set, and the lines skipped (`on_bad_line: skip`), unlogged.

    Any mistake is a UserError naming file:line and what a record looks like; a bad line's
    error ends with "fix the line or {skip_with}": the way to skip it where the reader was called.
    """
    path = resolve_data_path(spec, key)
    example = record_example(layout)
    try:
        lines, _ = read_lines(path, growing=False)
    except OSError as error:
        raise unreadable(path, error, what="JSONL file", key=key,
                         fix="give a JSONL file or a bundled set such as bundled:personalization/train") from None
    records, skipped, seen = [], [], {}
    for line in lines:
        try:
            try:
                text = line.data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise not_utf8(str(path), line.data, error, line=line.number, offset=line.offset, key=key) from None
            try:
                row = json.loads(text.removeprefix("\ufeff") if line.offset == 0 else text)
            except json.JSONDecodeError as error:
                kind = None if records or skipped else _file_kind([first.data for first in lines[:5]])
                if kind:
                    raise UserError(f"{path}:{line.number}: this looks like {kind}, not JSON lines: one JSON object "
                                    f"per line such as {example}", key=key) from None
                raise ValueError(f"not valid JSON at column {error.colno} ({error.msg})") from None
            except RecursionError:
                raise ValueError("nested too deeply to be a prompt") from None
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            reader = READERS[detect_layout(row) if layout == "auto" else layout]
            record = reader(row)
            if record.id in seen:
                given = row.get("id") or row.get("conversation_id")
                raise DuplicateRecord(
                    f"repeats the id {record.id!r} of line {seen[record.id]}; give every record its own id" if given
                    else f"repeats the prompt of line {seen[record.id]} (same question and context); remove one"
                )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            reason = f"missing field {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
            if on_bad_line == "skip":
                skipped.append(f"line {line.number}: {reason}")
                continue
            looks = "" if isinstance(error, DuplicateRecord) else f"; a record looks like {example}"
            raise UserError(f"{path}:{line.number}: {reason}{looks}; fix the line or {skip_with}", key=key) from None
        record.extras.update({k: v for k, v in row.items() if k not in KNOWN_EXTRAS})
        record.where = f"{path}:{line.number}"
        seen[record.id] = line.number
        records.append(record)
    if not records and skipped:
        raise UserError(f"{path}: no prompts: all {len(skipped)} line(s) are malformed (first: {skipped[0]}); a record "
                        f"looks like {example}", key=key)
    if not records:
        raise UserError(f"{path}: the file is empty; write one JSON object per line such as {example}", key=key)
    return records, skipped


def read_prompts(spec: str, layout: str = "auto", on_bad_line: str = "error", key: str = "data.train",
                 skip_with: str = "set data.on_bad_line: skip") -> list[PromptRecord]:
    """Records of a JSONL prompt file or bundled set (see read_prompt_file), with skipped lines logged."""
    records, skipped = read_prompt_file(spec, layout, on_bad_line, key, skip_with)
    if skipped:
        logger.warning(f"{resolve_data_path(spec, key)}: skipped {len(skipped)} malformed line(s) (first: {skipped[0]})")
    return records


def round_prompts(records: list[PromptRecord], number: int, rounds: int, mode: str) -> list[PromptRecord]:
    """The prompts round `number` of `rounds` samples pairs for (sampling.round_prompts): all, or its part of the split.

    The parts interleave (every `rounds`-th prompt) so that each round gets prompts from the
    whole file, whose records are often grouped by user or topic.
    """
    return records[number - 1 :: rounds] if mode == "split" else records


def echoes_in(sampling, number: int) -> bool:
    """Whether round `number`'s pairs include echo pairs (sampling.echo_pairs, from sampling.echo_from_round on)."""
    return sampling.echo_pairs and number >= sampling.echo_from_round


def check_negatives(records: list[PromptRecord], strategy: str, echo_pairs: bool = False) -> None:
    """Whether `records` can give the negatives of `strategy` (sampling.negative) and, if asked, echo pairs; a
    UserError says why not.

    drop_context and swap_context need a context on every prompt, random_prompt and
    swap_context at least 2 prompts, swap_context at least 2 different contexts, echo pairs
    a context on some prompt.
    """
    if strategy in ("drop_context", "swap_context") and not all(r.context for r in records):
        missing = next(r for r in records if not r.context)
        raise UserError(
            f"the {strategy} negative needs a context on every prompt, and {missing.id!r}"
            f"{f' ({missing.where})' if missing.where else ''} has none; use prompts with 'context' or a system "
            "message, or sampling.negative: random_prompt",
            key="sampling.negative",
        )
    if len(records) < 2 and strategy != "drop_context":
        raise UserError(f"the {strategy} negative needs at least 2 prompts", key="data.train")
    if strategy == "swap_context" and len({r.context for r in records if r.context}) < 2:
        raise UserError("swap_context needs at least 2 different contexts in the data", key="sampling.negative")
    if echo_pairs and not any(r.context for r in records):
        raise UserError(f"echo pairs need prompts with a context (a system message), and none of the {len(records)} "
                        "prompts has one; set sampling.echo_pairs: false", key="sampling.echo_pairs")
