"""One run on two ranks (`mlx.launch -n 2`, ring backend over 127.0.0.1) is the one-process run, on the tiny model.

    .venv/bin/python -m pytest tests/test_distributed.py -q

The pairs file is byte for byte the one-process file; with training.batch_size 4 each rank
takes 2 pairs of each step, and the per-step losses and the adapter equal one process's at
batch 4 within 1e-5 (on 3 ranks too, which take 2, 1 and 1 pairs and say so in one line).
A rank killed with SIGKILL mid-training ends the other within 30 s with one line, and
`--resume` on one process continues the trajectory from rank 0's last checkpoint. Two
rounds (training.rounds) on two ranks are the one-process rounds: both rounds' pairs files
byte for byte, both adapters within 1e-5, and the compare answers; so is round 2 of that
run resumed on two ranks after round 1.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from test_sampling import PROFILES

from mipo_mlx import cli
from mipo_mlx.console import progress_line
from mipo_mlx.events import read_events
from mipo_mlx.rundir import (
    ADAPTER_WEIGHTS, ADAPTERS_DIR, ANSWERS_FILE, CHECKPOINTS_DIR, COMPARE_DIR, EVENTS_FILE, PAIRS_FILE, checkpoint_dir,
    round_dir,
)

LAUNCH = Path(sys.executable).parent / "mlx.launch"
# Runs the CLI; with MIPO_TEST_MARKER set, rank 1 writes its pid there before its third step, once the folder
# MIPO_TEST_MARKER_AFTER names exists (rank 0's checkpoint of step 2: on a loaded machine rank 0 may still be writing it),
# and waits to be killed;
# with MIPO_TEST_UNREADABLE set, the ranks but rank 0 may not read anything below that folder, as when another
# machine has a folder of another user at that path (the tests run as root, who reads any folder: no chmod).
CHILD = """
import builtins, io, os, sys, time
from pathlib import Path
unreadable = os.environ.get("MIPO_TEST_UNREADABLE")
if unreadable and os.environ["MLX_RANK"] != "0":
    def refused(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(unreadable):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return call
    os.stat, os.scandir, os.listdir = refused(os.stat), refused(os.scandir), refused(os.listdir)
    builtins.open = io.open = refused(io.open)
from mipo_mlx import cli, distributed, trainer
marker = os.environ.get("MIPO_TEST_MARKER")
if marker:
    real = trainer.Trainer.train_step
    def train_step(self):
        if self.step == 2 and distributed.rank() == 1:
            while not Path(os.environ["MIPO_TEST_MARKER_AFTER"]).exists():
                time.sleep(0.05)
            Path(marker).write_text(str(os.getpid()))
            time.sleep(600)
        return real(self)
    trainer.Trainer.train_step = train_step
sys.exit(cli.main(sys.argv[1:]))
"""


def free_port(ranks: int) -> int:
    """A port base for the ring with room for every rank: other runs on this machine may hold the default one."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            for offset in range(1, ranks):
                with socket.socket() as other:
                    other.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue


def launch(folder: Path, *args: str, ranks: int = 2, env: dict | None = None) -> subprocess.Popen:
    """`mlx.launch -n RANKS -- python CHILD ARGS` in `folder`, output to folder/launch.log."""
    log = open(folder / "launch.log", "wb")
    command = [str(LAUNCH), "-n", str(ranks), "--starting-port", str(free_port(ranks)), "--", sys.executable, "-c",
               CHILD, *args]
    return subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model_dirs):
    """A recipe on the tiny Llama (random_prompt: a rank needs answers of the other's prompts) and its one-process run."""
    folder = tmp_path_factory.mktemp("distributed")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{q} ({i})", "context": c}) + "\n"
                               for i, (c, q) in enumerate(PROFILES * 3)))
    (folder / "recipe.yaml").write_text(
        f"model: {{path: {tiny_model_dirs[('llama', False)]}}}\ndata: {{train: {prompts}, test: {prompts}}}\n"
        "output_dir: runs\nsampling: {negative: random_prompt, max_tokens: 12, temperature: 0.8}\n"
        "training: {batch_size: 4, eval_fraction: 0.2, save_every: 2, probe_prompts: 2, learning_rate: 1.0e-3}\n"
        "eval: {max_prompts: 6, max_tokens: 12}\n")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert cli.main(["train", "recipe.yaml", "--set", "run_name=one"]) == 0
    finally:
        os.chdir(cwd)
    return folder


def losses(run: Path) -> dict:
    events, _ = read_events(run / EVENTS_FILE)
    return {(e["split"], e["step"]): e["loss"] for e in events if e["event"] == "metrics"}


def assert_same_trajectory(run: Path, one: Path) -> None:
    expected, found = losses(one), losses(run)
    assert found.keys() == expected.keys()
    assert all(abs(found[key] - expected[key]) < 1e-5 for key in expected), (found, expected)
    a, b = (mx.load(str(path / ADAPTERS_DIR / ADAPTER_WEIGHTS)) for path in (one, run))
    assert a.keys() == b.keys() and max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5


def test_two_ranks_sample_the_same_pairs_and_train_the_same_trajectory(folder):
    child = launch(folder, "train", "recipe.yaml", "--set", "run_name=two")
    assert child.wait(timeout=300) == 0
    log = (folder / "launch.log").read_text()
    assert "Traceback" not in log and "mipo-mlx: error" not in log, log
    one, two = folder / "runs" / "one", folder / "runs" / "two"
    assert (two / PAIRS_FILE).read_bytes() == (one / PAIRS_FILE).read_bytes()
    assert_same_trajectory(two, one)
    assert (two / COMPARE_DIR / ANSWERS_FILE).read_bytes() == (one / COMPARE_DIR / ANSWERS_FILE).read_bytes()
    # The event log and the progress lines name the ranks and each one's throughput.
    events, _ = read_events(two / EVENTS_FILE)
    assert next(e for e in events if e["event"] == "run_started")["ranks"] == 2
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert progress and all(len(e["rank_tokens_per_second"]) == 2 for e in progress)
    assert "2 ranks " in progress_line(progress[-1])


def test_ranks_that_cannot_read_the_run_directory_train_as_one_process(folder):
    # Rank 0 alone reads the run directory, also to know whether a step is saved: rank 1 may not read runs/ at all.
    # select_checkpoint makes the held-out evaluation save the step it selects; it evaluates once (eval_every 10 > 4
    # steps), at the last step, so the final adapter is the one-process run's.
    child = launch(folder, "train", "recipe.yaml", "--set", "run_name=unreadable", "--set",
                   "training.select_checkpoint=eval_loss", env={"MIPO_TEST_UNREADABLE": str(folder / "runs")})
    assert child.wait(timeout=300) == 0, (folder / "launch.log").read_text()
    log = (folder / "launch.log").read_text()
    assert "Traceback" not in log and "mipo-mlx: error" not in log, log
    one, run = folder / "runs" / "one", folder / "runs" / "unreadable"
    assert (run / PAIRS_FILE).read_bytes() == (one / PAIRS_FILE).read_bytes()
    assert_same_trajectory(run, one)
    assert sorted(os.listdir(run / CHECKPOINTS_DIR)) == sorted(os.listdir(one / CHECKPOINTS_DIR))
    assert (run / COMPARE_DIR / ANSWERS_FILE).read_bytes() == (one / COMPARE_DIR / ANSWERS_FILE).read_bytes()


def test_three_ranks_split_a_batch_of_4_unevenly_in_one_line_and_take_the_same_steps(folder):
    child = launch(folder, "train", "recipe.yaml", "--set", "run_name=three", ranks=3)
    assert child.wait(timeout=300) == 0
    log = (folder / "launch.log").read_text()
    assert "mipo-mlx: error" not in log, log
    said = [line for line in log.splitlines() if "does not divide" in line]
    assert said == ["mipo-mlx: training.batch_size 4 does not divide among 3 ranks: each rank takes 2 or 1 of each "
                    "batch's pairs (the same steps; the ranks with more set the pace)"]
    assert (folder / "runs" / "three" / PAIRS_FILE).read_bytes() == (folder / "runs" / "one" / PAIRS_FILE).read_bytes()
    assert_same_trajectory(folder / "runs" / "three", folder / "runs" / "one")


def test_a_killed_rank_stops_the_other_in_one_line_and_the_run_resumes_on_one_process(folder):
    marker = folder / "rank-1.pid"
    run = folder / "runs" / "killed"
    child = launch(folder, "train", "recipe.yaml", "--set", "run_name=killed",
                   env={"MIPO_TEST_MARKER": str(marker), "MIPO_TEST_MARKER_AFTER": str(checkpoint_dir(run, 2))})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() or not marker.read_text():
            assert child.poll() is None, (folder / "launch.log").read_text()
            assert time.monotonic() < deadline, "rank 1 never reached its third step"
            time.sleep(0.05)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        killed = time.monotonic()
        child.wait(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    # mlx.launch's own warning about the killed rank may share the log line our error starts on.
    said = [line for line in (folder / "launch.log").read_text().splitlines() if "mipo-mlx: error: " in line]
    assert len(said) == 1 and "rank 0 of 2 stopped: another rank of this run ended" in said[0], said
    assert list((run / CHECKPOINTS_DIR).iterdir()) == [checkpoint_dir(run, 2)]

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert cli.main(["train", "recipe.yaml", "--resume", "--set", "run_name=killed"]) == 0
    finally:
        os.chdir(cwd)
    assert_same_trajectory(run, folder / "runs" / "one")


def test_two_rounds_on_two_ranks_are_the_one_process_rounds(folder, monkeypatch):
    # Round 2 samples with round 1's adapter, which rank 1 gets from rank 0, and the round's seed: rank 1 makes the
    # second group of 4 pairs. At batch 1 rank 0 takes each step's pair (rank 1 adds a zero gradient), so round 1's
    # adapter is one process's bit for bit and round 2's stored reference log-probs can be compared to the byte.
    settings = ("run_name=rounds-two", "training.rounds=2", "training.batch_size=1", "training.max_steps=2",
                "data.max_prompts=6", "eval.max_prompts=2")
    rounds = [part for key in settings for part in ("--set", key)]
    monkeypatch.chdir(folder)
    assert cli.main(["train", "recipe.yaml", *rounds, "--set", "run_name=rounds-one"]) == 0
    one, two = folder / "runs" / "rounds-one", folder / "runs" / "rounds-two"

    def assert_rounds_as_one_process(numbers: tuple[int, ...], *args: str) -> None:
        assert launch(folder, "train", "recipe.yaml", *rounds, *args).wait(timeout=300) == 0
        log = (folder / "launch.log").read_text()
        assert "Traceback" not in log and "mipo-mlx: error" not in log, log
        for number in numbers:
            pairs = [(round_dir(run, number) / PAIRS_FILE).read_bytes() for run in (one, two)]
            assert pairs[0] == pairs[1]
            a, b = (mx.load(str(round_dir(run, number) / ADAPTERS_DIR / ADAPTER_WEIGHTS)) for run in (one, two))
            assert a.keys() == b.keys() and max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5
        # Compare answered with the last round's adapter, rank 0's, on both ranks.
        assert (two / COMPARE_DIR / ANSWERS_FILE).read_bytes() == (one / COMPARE_DIR / ANSWERS_FILE).read_bytes()

    assert_rounds_as_one_process((1, 2))
    # Resumed after round 1, on new processes: rank 1's model has no LoRA layers, and round 1's adapter is rank 0's.
    shutil.rmtree(round_dir(two, 2))
    shutil.rmtree(two / COMPARE_DIR)
    assert_rounds_as_one_process((2,), "--resume")
