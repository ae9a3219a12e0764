"""The run directory's one owner: the pairs record, the layout, and no name of it written anywhere else.

    .venv/bin/python -m pytest tests/test_rundir.py -q

tests/fixtures/pairs-main-f82299b/ holds pairs files that the sample stage of main at
f82299b wrote (the embedded model; one file per negative strategy, and one more pair with
the line breaks JSON keeps raw, through that version's writer): the record must read
every field of them and write them back byte for byte.
"""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from mipo_mlx import rundir
from mipo_mlx.errors import UserError
from mipo_mlx.files import encode_line, read_lines
from mipo_mlx.recipe import parse_recipe
from mipo_mlx.rundir import (
    ADAPTER_WEIGHTS, ADAPTERS_DIR, CHECKPOINT_PREFIX, MipoRecord, Pair, PairsWriter, checkpoint_dir, latest_adapter,
    latest_checkpoint, open_run, read_pairs, reopen_run, tail_pairs,
)

ROOT = Path(__file__).resolve().parent.parent
MAIN_PAIRS = sorted((Path(__file__).parent / "fixtures" / "pairs-main-f82299b").glob("*.jsonl"))


@pytest.mark.parametrize("path", MAIN_PAIRS, ids=[p.stem for p in MAIN_PAIRS])
def test_pairs_written_by_main_read_every_field_and_write_back_byte_for_byte(path, tmp_path):
    pairs = read_pairs(path)
    lines = path.read_bytes().split(b"\n")[:-1]
    assert len(pairs) == len(lines) >= 4
    for pair, line in zip(pairs, lines):
        record = json.loads(line)
        assert set(record["mipo"]) == {f.name for f in dataclasses.fields(MipoRecord)}  # every field, and no other
        assert all(getattr(pair.mipo, name) == value for name, value in record["mipo"].items())
        assert (pair.prompt, pair.chosen, pair.rejected) == (record["prompt"], record["chosen"], record["rejected"])
        assert encode_line(pair.to_json()).encode() == line + b"\n"
    assert {p.mipo.strategy for p in pairs} == {path.stem}
    # The one writer, given the pairs the one reader read, writes the same file.
    writer = PairsWriter(tmp_path / "pairs.jsonl")
    for pair in pairs:
        writer.append(pair)
    writer.close()
    assert (tmp_path / "pairs.jsonl").read_bytes() == path.read_bytes()


def test_a_pair_with_raw_line_breaks_in_an_answer_reads_as_written():
    [pair] = [p for p in read_pairs(ROOT / "tests/fixtures/pairs-main-f82299b/drop_context.jsonl") if "\u2028" in p.chosen_text]
    assert pair.chosen_text == "Une soupe\u2028à l'oignon.\x85 Fin\u2029"


def test_pairs_from_elsewhere_read_as_trl_has_them(tmp_path):
    path = tmp_path / "trl.jsonl"
    conversational = {"prompt": [{"role": "user", "content": "Name a colour"}], "chosen": [{"role": "assistant", "content": "Teal"}],
                      "rejected": [{"role": "assistant", "content": "Seven"}], "score_chosen": 9.0}
    standard = {"prompt": "Name a fruit", "chosen": "Pear", "rejected": "Stone"}
    path.write_text(json.dumps(conversational) + "\n\n" + json.dumps(standard), encoding="utf-8")  # no last newline
    first, second = read_pairs(path)
    assert first.mipo is None and first.ref_logps is None and first.chosen_text == "Teal"
    assert second.prompt_messages() == [{"role": "user", "content": "Name a fruit"}]
    assert (second.chosen_text, second.rejected_text) == ("Pear", "Stone")
    assert second.to_json() == standard  # nothing invented on the way back


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "q", "chosen": "a"}', "'rejected' is missing"),
    ('{"prompt": "q", "chosen": [], "rejected": "b"}', "'chosen' is missing or is neither"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "mipo": {"ref_logps": {"chosen": 1}}}', "needs numbers"),
    ('[1, 2]', "not a JSON object"),
    ('{"prompt": ', "Expecting value"),
])
def test_a_line_that_is_not_a_pair_is_one_line_naming_it(tmp_path, line, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}:2: expected a JSON object with prompt, chosen and rejected .*{problem}"):
        read_pairs(path)


def test_the_tui_tail_of_a_growing_pairs_file_waits_for_whole_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    line = encode_line({"prompt": "q", "chosen": "a\u2028b", "rejected": "c"})
    path.write_text(line + "{broken\n" + line[:10], encoding="utf-8")
    found, offset = tail_pairs(path)
    assert [pair is None for _, pair in found] == [False, True] and found[0][1].chosen_text == "a\u2028b"
    with open(path, "a", encoding="utf-8") as file:
        file.write(line[10:])
    [(start, pair)], _ = tail_pairs(path, offset)
    assert start == offset and rundir.pair_at(path, start) == pair


def test_checkpoints_and_adapters_are_found_by_their_layout(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_adapter(tmp_path) is None
    for step in (2, 10):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == f"{CHECKPOINT_PREFIX}000010" == latest_adapter(tmp_path).name
    (tmp_path / ADAPTERS_DIR).mkdir()
    (tmp_path / ADAPTERS_DIR / ADAPTER_WEIGHTS).write_bytes(b"")
    assert latest_adapter(tmp_path) == tmp_path / ADAPTERS_DIR


def test_a_run_is_opened_once_and_reopened_from_its_folder(tmp_path):
    recipe = parse_recipe(f"output_dir: {tmp_path}\nrun_name: r\n", "r.yaml")
    run = open_run(recipe, resume=False)
    run.events.close()
    with pytest.raises(UserError, match="already holds a run; add --resume"):
        open_run(recipe, resume=False)
    again = reopen_run(run.dir)
    again.events.close()
    assert again.recipe == recipe and again.resumed
    with pytest.raises(UserError, match=r"is not a run directory \(it has no recipe.yaml\)"):
        reopen_run(tmp_path)


RUN_DIR_NAMES = {value for name, value in vars(rundir).items() if name.isupper() and isinstance(value, str)}
FILE_NAMES = {name for name in RUN_DIR_NAMES if "." in name}
FOLDER_NAMES = {name for name in RUN_DIR_NAMES if "." not in name}  # and CHECKPOINT_PREFIX
# PEFT names its adapter's config as mlx-lm does: another format's file, not the run directory's.
NOT_THE_RUN_DIRECTORY = {("peft_format.py", "adapter_config.json")}


def path_strings(tree) -> set[int]:
    """ids of the string constants used as paths: `x / "a"`, Path("a"), .glob("a*"), or named as a folder."""
    found = set()
    for node in ast.walk(tree):
        operands = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Name) and node.func.id in ("Path", "PurePath"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr in ("glob", "rglob", "joinpath", "with_name"))):
            operands = node.args
        elif isinstance(node, ast.Assign):  # SOME_DIR = "adapters", or A_DIR, B_DIR = "adapters", "checkpoints"
            targets = [t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            if any(isinstance(t, ast.Name) and t.id.endswith(("_DIR", "_DIRS", "_PREFIX")) for t in targets):
                operands = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        for operand in operands:
            found |= {id(part) for part in (operand.values if isinstance(operand, ast.JoinedStr) else [operand])}
    return found


def names_written_in(path: Path) -> list[tuple[int, str]]:
    """(line, name) for each run directory name that a Python file writes as a string, docstrings aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    as_paths, found = path_strings(tree), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        segments = node.value.split("/")
        names = {name for name in FILE_NAMES if name in node.value}
        if id(node) in as_paths or len(segments) > 1:
            names |= {s for s in segments if s in FOLDER_NAMES or s.startswith(CHECKPOINT_PREFIX)}
        found += [(node.lineno, name) for name in names]
    return sorted(found)


def test_no_run_directory_name_is_written_outside_its_owner():
    sources = sorted((ROOT / "tui").glob("*.py")) + sorted((ROOT / "mipo_mlx").glob("*.py"))
    assert len(sources) > 30
    written = [f"{path.relative_to(ROOT)}:{line}: {name!r}" for path in sources if path.name != "rundir.py"
               for line, name in names_written_in(path) if (path.name, name) not in NOT_THE_RUN_DIRECTORY]
    assert written == [], "import these names from mipo_mlx.rundir:\n" + "\n".join(written)


def test_the_name_check_finds_the_copies_there_were(tmp_path):
    copy = tmp_path / "copy.py"
    copy.write_text(
        'ADAPTER_FILE = "adapters.safetensors"\n'
        'ADAPTERS_DIR, CHECKPOINTS_DIR = "adapters", "checkpoints"\n'
        'def latest(run_dir, step):\n'
        '    """Reads pairs.jsonl: a docstring may name the files."""\n'
        '    return sorted((run_dir / "checkpoints").glob(f"step-*/{ADAPTER_FILE}")), run_dir / f"step-{step}"\n'
        'HELP = "No pairs yet: they appear while sampling writes pairs.jsonl."\n'
        'STAGES = ("sample", "train", "compare")  # a stage, not the folder\n', encoding="utf-8")
    assert [name for _, name in names_written_in(copy)] == [
        "adapters.safetensors", "adapters", "checkpoints", "checkpoints", "step-", "step-*", "pairs.jsonl"]


def test_reading_lines_splits_on_newlines_only(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes('{"a": "one\u2028two\x85"}\r\n\n{"b": 1}\n{"c"'.encode())
    lines, offset = read_lines(path)
    assert [line.json() for line in lines] == [{"a": "one\u2028two\x85"}, {"b": 1}] and [l.number for l in lines] == [1, 3]
    assert offset == len(path.read_bytes()) - 4  # the unfinished last line waits
    assert len(read_lines(path, growing=False)[0]) == 3
