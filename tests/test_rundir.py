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
from mipo_mlx.events import EventLog, read_events
from mipo_mlx.files import atomic_folder, encode_line, read_lines, replace_file
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


def test_a_resume_may_change_only_what_shapes_the_rest_of_the_run_and_records_it(tmp_path):
    text = f"output_dir: {tmp_path}\nrun_name: r\n"
    open_run(parse_recipe(text, "r.yaml"), resume=False).events.close()
    saved = (tmp_path / "r" / "recipe.yaml").read_bytes()
    for refused in ("training.beta=0.2", "lora.rank=4", "sampling.temperature=0.5", "seed=1", "eval.max_tokens=64"):
        with pytest.raises(UserError, match=rf"recipe.yaml: {refused.split('=')[0]} is .* but the run was started "
                                            "with .*, and a resume cannot change it"):
            open_run(parse_recipe(text, "r.yaml", [refused]), resume=True)
    assert (tmp_path / "r" / "recipe.yaml").read_bytes() == saved

    changed = open_run(parse_recipe(text, "r.yaml", ["training.learning_rate=1e-6", "training.max_steps=50"]),
                       resume=True)
    changed.events.close()
    assert changed.changed == {"training.learning_rate": (2e-05, 1e-06), "training.max_steps": (None, 50)}
    events, _ = read_events(changed.path("events.jsonl"))
    assert events[-1]["event"] == "recipe_changed"
    assert events[-1]["changes"] == {"training.learning_rate": [2e-05, 1e-06], "training.max_steps": [None, 50]}
    # The saved recipe is the new one: resuming again with it changes nothing, and the old one is a change again.
    again = open_run(parse_recipe(text, "r.yaml", ["training.learning_rate=1e-6", "training.max_steps=50"]), resume=True)
    again.events.close()
    assert again.changed == {}
    assert set(rundir.RESUMABLE_CHANGES) <= set(rundir._flatten(rundir.recipe_to_dict(changed.recipe)))


def test_opening_a_run_removes_what_killed_writes_left_and_puts_a_swapped_out_folder_back(tmp_path):
    text = f"output_dir: {tmp_path}\nrun_name: r\n"
    run = open_run(parse_recipe(text, "r.yaml"), resume=False)
    run.events.close()
    checkpoint = checkpoint_dir(run.dir, 4)
    with atomic_folder(checkpoint) as staging:
        (staging / "state.json").write_text("{}")
    left = [checkpoint.parent / ".step-000006.partial-k1ll3d00", run.dir / ".compare.partial-0123abcd"]
    for folder in left:
        folder.mkdir(parents=True)
        (folder / "half.safetensors").write_bytes(b"half")
    (run.dir / ".recipe.yaml.partial-123").write_text("half")
    # Killed between the two renames of atomic_folder(replace=True): the old adapters/ is only retired.
    (run.dir / ".adapters.retired").mkdir()
    (run.dir / ".adapters.retired" / ADAPTER_WEIGHTS).write_bytes(b"whole")
    mine = run.dir / ".my-notes"
    mine.mkdir()

    reopened = open_run(parse_recipe(text, "r.yaml"), resume=True)
    reopened.events.close()
    assert sorted(p.name for p in run.dir.iterdir()) == [".my-notes", ADAPTERS_DIR, "checkpoints", "events.jsonl",
                                                        "recipe.yaml"]
    assert (run.dir / ADAPTERS_DIR / ADAPTER_WEIGHTS).read_bytes() == b"whole"
    assert [p.name for p in checkpoint.parent.iterdir()] == ["step-000004"]
    events, _ = read_events(run.dir / "events.jsonl")
    assert len([e for e in events if e["event"] == "note" and "left by a write that was killed" in e["text"]]) == 4


def test_an_event_log_cut_mid_line_says_what_it_dropped(tmp_path):
    path = tmp_path / "events.jsonl"
    whole = '{"time": 1.0, "event": "run_started"}\n'
    path.write_text(whole + '{"time": 2.0, "event": "metrics", "stage": "train", "step": 7, "lo', encoding="utf-8")
    with EventLog(path) as log:
        log.emit("progress", stage="train", done=1, total=2, unit="steps")
    events, _ = read_events(path)
    assert path.read_text(encoding="utf-8").startswith(whole)
    assert [e["event"] for e in events] == ["run_started", "note", "progress"]
    assert events[1]["level"] == "warning" and events[1]["text"] == (
        f'{path} ended in a metrics event of 66 bytes starting "{{\\"time\\": 2.0, \\"event\\": \\"metrics\\", '
        '\\"stage\\": \\"train\\", \\"step\\": 7, \\"lo" that a kill cut short; it was dropped')


def test_a_run_reopened_to_read_writes_nothing_into_it(tmp_path):
    run = open_run(parse_recipe(f"output_dir: {tmp_path}\nrun_name: r\n", "r.yaml"), resume=False)
    run.events.close()
    with open(run.dir / "events.jsonl", "a") as file:
        file.write('{"time": 3.0, "ev')  # a run killed mid-line: a reader must not cut it off
    before = {p.name: p.read_bytes() for p in run.dir.iterdir()}
    seen = []
    reader = reopen_run(run.dir, observers=[seen.append])
    reader.events.emit("stage_started", stage="export", total=1, unit="formats")
    reader.events.close()
    assert reader.read_only and [e["event"] for e in seen] == ["stage_started"]
    assert {p.name: p.read_bytes() for p in run.dir.iterdir()} == before


RUN_DIR_NAMES = {value for name, value in vars(rundir).items() if name.isupper() and isinstance(value, str)}
FILE_NAMES = {name for name in RUN_DIR_NAMES if "." in name}
FOLDER_NAMES = {name for name in RUN_DIR_NAMES if "." not in name}  # and CHECKPOINT_PREFIX
# PEFT names its adapter's config as mlx-lm does: another format's file, not the run directory's.
NOT_THE_RUN_DIRECTORY = {("peft_format.py", "adapter_config.json"),
                         ("dpo.py", "adapters.safetensors"),  # mlx-lm-lora's adapter file in a temporary folder
                         ("dpo.py", "pairs.jsonl")}  # --pairs's help


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
    sources = [*sorted((ROOT / "tui").glob("*.py")), *sorted((ROOT / "mipo_mlx").glob("*.py")),
               *sorted((ROOT / "bench").glob("*.py"))]
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


def test_what_is_renamed_into_place_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync of every file and of the staging folder, then the rename, then fsync of the folder that holds it."""
    import os

    calls, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b))[1])
    with atomic_folder(tmp_path / "checkpoint") as staging:
        (staging / "a.safetensors").write_bytes(b"a")
        (staging / "state.json").write_text("{}")
    inode = lambda path: path.stat().st_ino  # noqa: E731  (a rename keeps it)
    folder = tmp_path / "checkpoint"
    assert calls[-2:] == [("replace", str(folder)), ("fsync", inode(tmp_path))]
    assert sorted(calls[:-2]) == sorted(("fsync", inode(p)) for p in (folder / "a.safetensors", folder / "state.json",
                                                                      folder))
    calls.clear()
    replace_file(tmp_path / "recipe.yaml", "seed: 0\n")
    assert calls == [("fsync", inode(tmp_path / "recipe.yaml")), ("replace", str(tmp_path / "recipe.yaml")),
                     ("fsync", inode(tmp_path))]


def test_a_run_started_before_a_key_existed_resumes_with_its_default_and_not_with_another_value(tmp_path):
    text = f"output_dir: {tmp_path}\nrun_name: r\n"
    open_run(parse_recipe(text, "r.yaml"), resume=False).events.close()
    saved = tmp_path / "r" / "recipe.yaml"
    older = "".join(line for line in saved.read_text().splitlines(keepends=True) if "round_prompts" not in line)
    assert older != saved.read_text()
    saved.write_text(older)
    resumed = open_run(parse_recipe(text, "r.yaml"), resume=True)
    resumed.events.close()
    assert resumed.changed == {}
    with pytest.raises(UserError, match="sampling.round_prompts is 'split' but the run was started with 'all'"):
        open_run(parse_recipe(text, "r.yaml", ["sampling.round_prompts=split"]), resume=True)
