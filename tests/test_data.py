"""Prompt files: what the reader accepts, and how it names what it does not.

Whole-command checks of broken data files are cases of tests/broken_inputs (tests/test_broken_inputs.py).
"""

import json

import pytest

from mipo_mlx.data import EXAMPLES, read_prompt_file, read_prompts
from mipo_mlx.errors import UserError


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "Hi?"}\r\n{"prompt": "Tea?", "context": "Be brief."}\r\n')
    assert [r.question for r in read_prompts(str(path))] == ["Hi?", "Tea?"]


@pytest.mark.parametrize("text, kind", [
    ('prompt\tcontext\nHi?\tBe brief.\nTea?\tIn French.\n', "tab-separated values"),
    ('prompt,context\n"Hi, you?","Be brief, please"\n"Tea?",French\n', "CSV"),
    ('prompts:\n  - Hi?\n  - Tea?\n', "YAML"),
    ('{\n  "prompt": "Hi?"\n}\n', "JSON objects spread over several lines"),
])
def test_a_file_that_is_not_json_lines_is_named_for_what_it_seems(tmp_path, text, kind):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=f"p.jsonl:1: this looks like {kind}, not JSON lines: one JSON object per line"):
        read_prompts(str(path), on_bad_line="skip")  # a whole-file mistake is not a line to skip


def test_a_bad_line_says_what_a_record_of_the_chosen_layout_looks_like(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"question": "2 + 3?", "answer": "5"}) + "\n")
    with pytest.raises(UserError) as error:
        read_prompts(str(path), layout="gsm8k", key="--data", skip_with="pass --on-bad-line skip")
    assert str(error.value) == (f"--data: {path}:1: 'answer' must end with '#### <number>' (GSM8K layout); a record "
                                f"looks like {EXAMPLES['gsm8k']}; fix the line or pass --on-bad-line skip")


def test_a_bad_json_line_after_good_ones_is_a_json_mistake_not_a_file_kind(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hi?"}\nprompt, context\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: not valid JSON at column 1 \(Expecting value\)"):
        read_prompts(str(path))


def test_skipped_lines_are_returned_not_logged_and_duplicates_name_both_lines(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "Hi?"}\n{"id": "a", "prompt": "Tea?"}\n{"prompt": 3}\n')
    records, skipped = read_prompt_file(str(path), on_bad_line="skip")
    assert [r.question for r in records] == ["Hi?"]
    assert skipped == ["line 2: repeats the id 'a' of line 1; give every record its own id",
                       "line 3: 'prompt' must be a non-empty string"]
    assert caplog.text == ""
