"""`mipo-mlx train` killed with SIGKILL anywhere, then resumed, ends as the run that was never killed, byte for byte.

    .venv/bin/python -m pytest tests/test_kill_and_resume.py -q

One run is killed four times in a row, each time in another stage (mid-sampling, mid-training,
inside a checkpoint write, during compare), and resumed with `--resume` after each kill; its
pairs, adapter, every loss and the comparison's files must equal those of a run that was never
killed, and nothing a killed write left behind (a checkpoint's staging folder) may remain.
Kills during sampling and training come when the run's files show it got there; a kill inside a
checkpoint write or during compare needs the process to be there when it comes, so the child
waits at that point (an environment variable names it) until it is killed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sampling import PROFILES

from mipo_mlx.events import read_events

# Runs the CLI; MIPO_TEST_WAIT=checkpoint|compare makes it wait, forever, inside the first checkpoint
# write (its files in the staging folder, before the rename) or during compare (its answers made, none written).
CHILD = """
import os, sys, time
from pathlib import Path
from mipo_mlx import cli
wait, marker = os.environ.get("MIPO_TEST_WAIT"), os.environ.get("MIPO_TEST_MARKER")

def waiting(real):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        Path(marker).write_text("here")
        time.sleep(600)
        return result
    return wrapper

if wait == "checkpoint":
    from mipo_mlx import trainer
    trainer.write_checkpoint_state = waiting(trainer.write_checkpoint_state)
elif wait == "compare":
    from mipo_mlx import compare
    compare.mutual_information = waiting(compare.mutual_information)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def train(tmp_path):
    """Starts `mipo-mlx train RECIPE [ARGS]` as a person runs it, in its own process group; none outlives the test."""
    children = []

    def start(*args, wait=None):
        log = tmp_path / f"child-{len(children)}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIPO_TEST_MARKER": str(tmp_path / "marker")}
        if wait:
            env["MIPO_TEST_WAIT"] = wait
        with open(log, "wb") as out:
            child = subprocess.Popen([sys.executable, "-c", CHILD, "train", str(tmp_path / "recipe.yaml"), *args],
                                     cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        child.log = log
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def kill_when(child, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the child's process group as soon as `ready()` holds; it must still be running then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert child.poll() is None, f"the run ended (status {child.returncode}) before {what}: {child.log.read_text()}"
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.005)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def trained_to(run_dir: Path, step: int) -> bool:
    events, _ = read_events(run_dir / "events.jsonl")
    return any(e["event"] == "metrics" and e["split"] == "train" and e["step"] >= step for e in events)


def losses(run_dir: Path) -> dict:
    """The last loss reported for each (split, step): a resumed run reports again the steps it redoes."""
    events, _ = read_events(run_dir / "events.jsonl")
    return {(e["split"], e["step"]): e["loss"] for e in events if e["event"] == "metrics"}


def finished(child) -> str:
    assert child.wait(timeout=600) == 0, child.log.read_text()
    return child.log.read_text()


def test_train_killed_in_each_stage_resumes_to_the_bytes_of_a_run_never_killed(tmp_path, tiny_model_dirs, train):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{q} ({i})", "context": c}) + "\n"
                               for i, (c, q) in enumerate(PROFILES * 6)))
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps({"id": f"t{i}", "prompt": q, "context": c}) + "\n"
                                for i, (c, q) in enumerate(PROFILES[:4])))
    (tmp_path / "recipe.yaml").write_text(
        f"model: {{path: {tiny_model_dirs[('llama', False)]}}}\ndata: {{train: {prompts}, test: {held_out}}}\n"
        f"output_dir: {tmp_path / 'runs'}\n"
        "sampling: {negative: drop_context, batch_size: 2, max_tokens: 8, temperature: 0.8}\n"
        "lora: {rank: 4, dropout: 0.1}\n"
        "training: {batch_size: 2, epochs: 2, learning_rate: 1.0e-3, warmup_ratio: 0.1, eval_fraction: 0.25,\n"
        "           eval_every: 5, save_every: 3, probe_prompts: 2}\n"
        "eval: {max_prompts: 4, max_tokens: 8, bootstrap_samples: 100}\n")
    clean, killed = tmp_path / "runs" / "clean", tmp_path / "runs" / "killed"
    finished(train("--set", "run_name=clean"))
    pairs = lines(clean / "pairs.jsonl")
    assert pairs == len(PROFILES) * 6

    name = ("--set", "run_name=killed")
    kill_when(train(*name), lambda: lines(killed / "pairs.jsonl") >= 2, "two pairs were sampled")
    assert lines(killed / "pairs.jsonl") < pairs
    kill_when(train(*name, "--resume"), lambda: trained_to(killed, 3), "step 3 was trained")
    marker = tmp_path / "marker"
    kill_when(train(*name, "--resume", wait="checkpoint"), marker.exists, "a checkpoint was being written")
    staging = list((killed / "checkpoints").glob(".step-*.partial-*"))
    assert len(staging) == 1 and (staging[0] / "state.json").is_file()
    marker.unlink()
    kill_when(train(*name, "--resume", wait="compare"), marker.exists, "compare was under way")
    assert not (killed / "compare").exists()

    output = finished(train(*name, "--resume"))
    assert f"resuming {killed}: {pairs} pairs already sampled; training continues from " in output
    assert list(killed.rglob("*.partial-*")) == []  # the killed checkpoint write left nothing
    for name in ("pairs.jsonl", "adapters/adapters.safetensors", "adapters/adapter_config.json",
                 "compare/answers.jsonl", "compare/metrics.json"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    report = (killed / "compare" / "report.md").read_text(encoding="utf-8")
    assert report.replace(str(killed), str(clean)) == (clean / "compare" / "report.md").read_text(encoding="utf-8")
    assert losses(killed) == losses(clean)
    assert {"train", "eval"} == {split for split, _ in losses(clean)}
