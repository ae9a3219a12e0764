"""Prompt files: JSONL in the layouts people have, read into one record type.

    records = read_prompts("my_prompts.jsonl")             # or "bundled:personalization/train"
    records[0].messages()                                  # full prompt: context + question
    records[0].messages(context=None)                      # the same question, context left out

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
error naming file:line, or, with `on_bad_line: skip`, is skipped, counted and reported.
"""

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mipo_mlx.errors import UserError
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

    def messages(self, context=KEEP) -> list[dict]:
        """The chat prompt; pass `context=None` to leave the context out or a string to swap it."""
        context = self.context if context is KEEP else context
        system = [{"role": "system", "content": context}] if context else []
        return system + self.history + [{"role": "user", "content": self.question}]


def bundled_path(name: str) -> Path:
    """File of a bundled set, e.g. 'personalization/train'."""
    path = BUNDLED_DIR / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(str(p.relative_to(BUNDLED_DIR).with_suffix("")) for p in BUNDLED_DIR.glob("*/*.jsonl"))
        raise UserError(f"no bundled set {name!r}; bundled sets: {', '.join(available)}", key="data")
    return path


def resolve_data_path(spec: str) -> Path:
    return bundled_path(spec[len(BUNDLED_PREFIX):]) if spec.startswith(BUNDLED_PREFIX) else Path(spec)


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


def read_prompts(spec: str, layout: str = "auto", on_bad_line: str = "error", key: str = "data.train",
                 skip_with: str = "set data.on_bad_line: skip") -> list[PromptRecord]:
    """Records of a JSONL prompt file or bundled set; see the module docstring.

    A bad line's error ends with "fix the line or {skip_with}": the way to skip it where the reader was called.
    """
    path = resolve_data_path(spec)
    try:
        lines, _ = read_lines(path, growing=False)
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.__class__.__name__})", key=key) from None
    records, skipped, seen = [], [], set()
    for line in lines:
        try:
            row = line.json()
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            reader = READERS[detect_layout(row) if layout == "auto" else layout]
            record = reader(row)
            if record.id in seen:
                raise ValueError(f"duplicate id {record.id!r}")
        except UnicodeDecodeError as error:
            raise UserError(f"cannot read {path} ({error.__class__.__name__})", key=key) from None
        except (ValueError, KeyError, TypeError) as error:
            reason = f"missing field {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
            if on_bad_line == "skip":
                skipped.append(f"line {line.number}: {reason}")
                continue
            raise UserError(
                f"{path}:{line.number}: {reason}; fix the line or {skip_with}", key=key
            ) from None
        record.extras.update({k: v for k, v in row.items() if k not in KNOWN_EXTRAS})
        seen.add(record.id)
        records.append(record)
    if skipped:
        logger.warning(f"{path}: skipped {len(skipped)} malformed line(s) (first: {skipped[0]})")
    if not records:
        raise UserError(f"{path} holds no prompts", key=key)
    return records

