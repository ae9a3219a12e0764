"""Verifiable answers: the paper's prompt formats for math and multiple choice, and exact match.

    task_of(record)                                  # "math", "mc" or None (no gold answer)
    formatted(record, math_shots=8)                  # the record as the model is asked it
    parse_number("... so the answer is 42.")         # 42.0
    parse_choice("The answer is (B).")               # "B"
    is_correct(record, answer_text)                  # exact match with record.extras["gold"]

Prompt formats (MIPO.md, "How the paper evaluates"):
- math (GSM8K, SVAMP): 8-shot chain of thought. The exemplars are the eight GSM8K
  problems of Wei et al. (2022), each worked out and ending "The answer is N.", given as
  earlier user/assistant chat turns before the question (`eval.math_shots` picks how
  many; with 0 the question gets one instruction line asking for "The answer is N.").
- multiple choice (ARC): zero-shot; the data reader already lists the choices as "A. ..."
  lines and asks for 'The answer is: X' (mipo_mlx.data.ARC_INSTRUCTION).

Parsing: the number after "####" or "the answer is", else the last number of the answer
("1,234" is 1234, "-3.50" is -3.5); the letter after "answer is" / "answer:", else a
letter the answer opens with ("B. carbon dioxide"). An answer with nothing to parse is
wrong, never skipped.
"""

import re

from mipo_mlx.data import PromptRecord

# Chain-of-thought exemplars for GSM8K (Wei et al., 2022), as the paper's 8-shot setting uses.
MATH_EXEMPLARS = [
    (
        (
            "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
            "done, there will be 21 trees. How many trees did the grove workers plant today?"
        ),
        (
            "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
            "have been 21 - 15 = 6. The answer is 6."
        ),
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        (
            "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
            "total?"
        ),
        (
            "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
            "eating 35, they had 74 - 35 = 39. The answer is 39."
        ),
    ),
    (
        (
            "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
            "did Jason give to Denny?"
        ),
        (
            "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 "
            "= 8. The answer is 8."
        ),
    ),
    (
        (
            "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
            "have now?"
        ),
        (
            "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + "
            "4 = 9. The answer is 9."
        ),
    ),
    (
        (
            "There were nine computers in the server room. Five more computers were installed each day, from "
            "monday to thursday. How many computers are now in the server room?"
        ),
        (
            "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
            "computers were added. 9 + 20 is 29. The answer is 29."
        ),
    ),
    (
        (
            "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
            "golf balls did he have at the end of wednesday?"
        ),
        (
            "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
            "more, he had 35 - 2 = 33 golf balls. The answer is 33."
        ),
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        (
            "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
            "dollars left. 23 - 15 is 8. The answer is 8."
        ),
    ),
]
MATH_INSTRUCTION = 'Solve it step by step and end with "The answer is N." where N is the number.'

# Thousands groups only when they are exact ("1,234"), so "3, 4" stays two numbers.
NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
FINAL_NUMBER = re.compile(rf"(?:####|answer is|answer:)\s*:?\s*({NUMBER})", re.IGNORECASE)
ANY_NUMBER = re.compile(rf"(?<![\w.]){NUMBER}")
# "The answer is: B", "answer is (b)", "Answer: c"; the letter stands alone.
STATED_CHOICE = re.compile(r"answer(?:\s+is)?\s*[:：]?\s*(?:option\s+|choice\s+)?(\()?\b([A-Za-z0-9])\b", re.IGNORECASE)
OPENING_CHOICE = re.compile(r"^\s*(?:\(([A-Z0-9])\)|([A-Z0-9])(?:[.):]|\s*$))")
CHOICE_LINE = re.compile(r"^\s*([A-Z0-9])[.)]\s", re.MULTILINE)


def _number(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def parse_number(answer: str) -> float | None:
    """The final number of a math answer, or None when it has none."""
    stated = FINAL_NUMBER.findall(answer)
    if stated:
        return _number(stated[-1])
    numbers = ANY_NUMBER.findall(answer)
    return _number(numbers[-1]) if numbers else None


def parse_choice(answer: str, labels: str = "ABCDE") -> str | None:
    """The answer letter (upper case) among `labels`, or None when the answer names none."""
    found = None
    for match in STATED_CHOICE.finditer(answer):
        letter = match.group(2)
        if letter.upper() not in labels:
            continue
        # A bare lower-case letter followed by more words is an article or a word ("the answer is a cat").
        if letter.islower() and not match.group(1) and re.match(r"\s+[A-Za-z]", answer[match.end():]):
            continue
        found = letter.upper()
    if found:
        return found
    opening = OPENING_CHOICE.match(answer)
    letter = opening and (opening.group(1) or opening.group(2))
    return letter if letter and letter in labels else None


def choice_labels(record: PromptRecord) -> str:
    """The labels of the choices listed in the question ("ABCD"), or A to E when none are listed."""
    return "".join(CHOICE_LINE.findall(record.question)) or "ABCDE"


def task_of(record: PromptRecord) -> str | None:
    """"math" for a numeric gold answer, "mc" for a choice label, None without a gold answer."""
    gold = record.extras.get("gold")
    if gold is None:
        return None
    gold = str(gold).strip()
    if "solution" not in record.extras and len(gold) == 1 and gold.upper() in choice_labels(record):
        return "mc"
    return "math" if re.fullmatch(NUMBER, gold) else None


def formatted(record: PromptRecord, math_shots: int) -> PromptRecord:
    """The record in the paper's prompt format for its task (math: few-shot turns); others unchanged."""
    if task_of(record) != "math":
        return record
    shots = []
    for question, worked in MATH_EXEMPLARS[:math_shots]:
        shots += [{"role": "user", "content": question}, {"role": "assistant", "content": worked}]
    question = record.question if math_shots else f"{record.question}\n{MATH_INSTRUCTION}"
    return PromptRecord(record.id, question, record.context, shots + record.history, record.extras)


def is_correct(record: PromptRecord, answer: str) -> bool:
    """Exact match of the parsed answer with the record's gold answer (no answer found: wrong)."""
    gold = str(record.extras["gold"]).strip()
    if task_of(record) == "mc":
        return parse_choice(answer, choice_labels(record)) == gold.upper()
    predicted = parse_number(answer)
    return predicted is not None and abs(predicted - _number(gold)) < 1e-9
