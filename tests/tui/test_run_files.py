"""Reading what a run writes: the event fold, chart downsampling and the pairs index.

    .venv/bin/python -m pytest tests/tui/test_run_files.py -q
"""

import json

from tui_helpers import RECORDED_RUN, recorded_lines

from mipo_mlx.events import EventLog, read_events
from mipo_mlx.rundir import pair_at
from mipo_mlx_tui.pairs_index import PairReader, matching
from mipo_mlx_tui.runstate import RunTail, downsample


def test_recorded_run_folds_into_its_summary():
    tail = RunTail(RECORDED_RUN)
    assert tail.poll() and not tail.poll()
    state = tail.state
    assert (state.status, state.model, state.step, state.total_steps) == ("completed", "smollm2-135m", 24, 24)
    assert state.progress["sample"]["done"] == 12 and state.last_eval["step"] == 24
    assert [c["step"] for c in state.checkpoints] == [12, 24]
    assert len(state.series["rewards/margins"]) == 24


def test_a_diverged_loss_is_kept_out_of_the_curve_and_a_dead_run_reads_interrupted(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("run_started", run_dir=str(tmp_path), recipe={}, model="m", stages=["train"], resumed=False, pid=4000002)
    log.emit("metrics", stage="train", split="train", step=1, loss=float("nan"), learning_rate=1e-5)
    log.emit("metrics", stage="train", split="train", step=2, loss=0.5, learning_rate=1e-5)
    log.close()
    tail = RunTail(tmp_path)
    tail.poll()
    assert tail.state.series["loss"] == [0.5] and tail.state.step == 2
    assert tail.state.shown_status() == "interrupted"  # no process 4000002: it died without a word


def test_downsample_keeps_the_level_of_each_slice():
    assert downsample([1.0, 2.0, 3.0], 10) == [1.0, 2.0, 3.0]
    assert downsample([0.0, 2.0, 4.0, 6.0], 2) == [1.0, 5.0]
    points = downsample([float(i % 2) for i in range(10_000)], 80)
    assert len(points) == 80 and all(abs(p - 0.5) < 0.01 for p in points)


def test_pair_reader_reads_in_batches_waits_for_whole_lines_and_skips_bad_ones(tmp_path):
    lines = recorded_lines("pairs.jsonl")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(lines[:5]) + "{not json\n" + lines[5][:30], encoding="utf-8")
    reader = PairReader(tmp_path)
    first = reader.read_more(3)
    assert [row.pair_id for row in first] == ["p1-q1#0", "p1-q2#0", "p2-q1#0"]
    assert len(reader.read_more(100)) == 2 and reader.unreadable == 1
    with open(path, "a", encoding="utf-8") as file:
        file.write(lines[5][30:])
    [row] = reader.read_more(100)
    assert row.index == 5 and row.pmi == json.loads(lines[5])["mipo"]["pmi"]
    assert pair_at(path, row.offset).chosen_text.startswith("Try 'Hoy Hablamos'")


def test_plain_trl_pairs_are_listed_and_searchable(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Name a colour", "chosen": "Teal", "rejected": "Seven"}) + "\n", encoding="utf-8")
    [row] = PairReader(tmp_path).read_more(10)
    assert (row.pair_id, row.pmi, row.prompt, row.chosen) == ("1", None, "Name a colour", "Teal")
    assert matching([row], "SEVEN colour") == [row] and matching([row], "blue") == []


def test_a_run_killed_mid_event_resumes_its_log_without_a_merged_line(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.emit("progress", stage="sample", done=1, total=4, unit="pairs")
    path.write_bytes(path.read_bytes() + b'{"time": 1.0, "event": "progr')  # the kill landed mid-write
    with EventLog(path) as log:
        log.emit("progress", stage="sample", done=2, total=4, unit="pairs")
    events, _ = read_events(path)
    assert [e["done"] for e in events if e["event"] == "progress"] == [1, 2]
    [note] = [e for e in events if e["event"] == "note"]
    assert note["level"] == "warning" and "a progr" not in note["text"] and "a line of 29 bytes" in note["text"]


def test_a_resume_that_changed_the_recipe_shows_as_a_note(tmp_path):
    with EventLog(tmp_path / "events.jsonl") as log:
        log.emit("recipe_changed", changes={"training.learning_rate": [2e-05, 1e-05]})
    tail = RunTail(tmp_path)
    tail.poll()
    assert list(tail.state.notes) == ["resumed with training.learning_rate 2e-05 -> 1e-05"]
