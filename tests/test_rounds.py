"""Iterative MIPO (`training.rounds`): each round samples from the model the round before made, and trains on from it.

    .venv/bin/python -m pytest tests/test_rounds.py -q

One recipe (a tiny Llama, LoRA dropout and length desensitization on, so that the reference
a round trains against matters) runs with one round and with two; a third run with two
rounds is killed in round 2's sampling and again in its training, and resumed each time.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from test_kill_and_resume import finished, kill_when, lines, train  # noqa: F401  (train: the fixture)
from test_sampling import PROFILES

from mipo_mlx import cli
from mipo_mlx.events import in_rounds, read_events
from mipo_mlx.export import export_run
from mipo_mlx.loading import load_model
from mipo_mlx.lora import adapter_disabled, use_adapter
from mipo_mlx.rundir import read_pairs, reopen_run
from mipo_mlx.sampling import round_seed
from mipo_mlx.scoring import score_pairs
from mipo_mlx_tui.runstate import RunState

RECIPE = """\
model: {{path: {model}}}
data: {{train: {prompts}, test: {held_out}}}
output_dir: {runs}
sampling: {{negative: drop_context, batch_size: 2, max_tokens: 8, temperature: 0.8}}
lora: {{rank: 4, dropout: 0.1}}
training: {{batch_size: 2, epochs: 1, learning_rate: 1.0e-3, warmup_ratio: 0.1, eval_fraction: 0.25, ld_alpha: 0.5,
           eval_every: 3, save_every: 3, probe_prompts: 2}}
eval: {{max_prompts: 4, max_tokens: 8, bootstrap_samples: 100}}
"""
# What a run of one round holds, as it did before there were rounds.
ONE_ROUND_FILES = {
    "recipe.yaml", "events.jsonl", "pairs.jsonl",
    *(f"checkpoints/step-00000{step}/{name}" for step in (3, 6, 8)
      for name in ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json")),
    "adapters/adapters.safetensors", "adapters/adapter_config.json",
    "compare/answers.jsonl", "compare/metrics.json", "compare/report.md",
}


def write_recipe(folder: Path, model: Path, runs: Path) -> Path:
    prompts, held_out = folder / "prompts.jsonl", folder / "held-out.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{q} ({i})", "context": c}) + "\n"
                               for i, (c, q) in enumerate(PROFILES * 4)))
    held_out.write_text("".join(json.dumps({"id": f"t{i}", "prompt": q, "context": c}) + "\n"
                                for i, (c, q) in enumerate(PROFILES[:4])))
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, prompts=prompts, held_out=held_out, runs=runs))
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs) -> Path:
    """runs/one (training.rounds: 1) and runs/two (2), trained by `mipo-mlx train` from one recipe."""
    folder = tmp_path_factory.mktemp("rounds")
    recipe = write_recipe(folder, tiny_model_dirs[("llama", False)], folder / "runs")
    for name, rounds in (("one", 1), ("two", 2)):
        assert cli.main(["train", str(recipe), "--set", f"run_name={name}", "--set", f"training.rounds={rounds}"]) == 0
    return folder / "runs"


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def by_round(run_dir: Path) -> dict:
    """{(round, split, step): loss}, the last reported (a resumed run reports again the steps it redoes)."""
    events, _ = read_events(run_dir / "events.jsonl")
    return {(number, e["split"], e["step"]): e["loss"] for number, e in in_rounds(events) if e["event"] == "metrics"}


def test_one_round_is_laid_out_as_before_and_is_the_first_round_of_two(runs):
    one, two = files(runs / "one"), files(runs / "two")
    assert set(one) == ONE_ROUND_FILES
    events, _ = read_events(runs / "one" / "events.jsonl")
    assert not [e for e in events if e["event"].startswith("round_")]
    # Round 1 of two rounds is the run of one: its pairs, every checkpoint and its adapter, to the byte.
    for name in one.keys() - {"recipe.yaml", "events.jsonl"} - {n for n in one if n.startswith("compare/")}:
        if not name.endswith("adapter_config.json") and not name.endswith("state.json"):  # they record the recipe
            assert one[name] == two[name], name
    assert {n for n in two if n.startswith("rounds/")} == {
        "rounds/2/pairs.jsonl", "rounds/2/adapters/adapters.safetensors", "rounds/2/adapters/adapter_config.json",
        *(f"rounds/2/checkpoints/step-00000{step}/{name}" for step in (3, 6, 8)
          for name in ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json"))}


def test_round_two_pairs_are_sampled_and_scored_by_the_round_one_model_with_new_noise(runs, tiny_model_dirs):
    first, second = read_pairs(runs / "two" / "pairs.jsonl"), read_pairs(runs / "two" / "rounds" / "2" / "pairs.jsonl")
    assert len(first) == len(second) == len(PROFILES) * 4
    assert {p.mipo.seed for p in first} == {0} and {p.mipo.seed for p in second} == {round_seed(0, 2)} != {0}
    assert [p.chosen_text for p in second] != [p.chosen_text for p in first]
    loaded = load_model(str(tiny_model_dirs[("llama", False)]))
    use_adapter(loaded.model, runs / "two" / "adapters")  # the adapter round 1 ended with
    items = [(p.prompt_messages(), p.chosen_text, p.rejected_text) for p in second]
    adapted, _, _ = score_pairs(loaded.model, loaded.tokenizer, items)
    with adapter_disabled(loaded.model):
        base, _, _ = score_pairs(loaded.model, loaded.tokenizer, items)
    stored = [p.ref_logps for p in second]
    assert [value for pair in adapted for value in pair] == pytest.approx([v for pair in stored for v in pair], abs=1e-5)
    assert max(abs(s - b) for pair, base_pair in zip(stored, base) for s, b in zip(pair, base_pair)) > 0.01


def test_round_two_goes_on_from_the_round_one_adapter_and_reports_each_round(runs):
    two = runs / "two"
    after_one = mx.load(str(two / "adapters" / "adapters.safetensors"))
    after_two = mx.load(str(two / "rounds" / "2" / "adapters" / "adapters.safetensors"))
    assert after_one.keys() == after_two.keys()
    assert not all(mx.array_equal(after_one[name], after_two[name]).item() for name in after_one)
    # Policy == reference at round 2's first step (the trainer stops otherwise): the adapter started as round 1's,
    # the model that scored round 2's pairs, and length desensitization scored its references with it too.
    losses = by_round(two)
    assert losses[2, "train", 1] == pytest.approx(math.log(2), abs=0.02)  # dropout is on in the step itself
    events, _ = read_events(two / "events.jsonl")
    finished_rounds = [e for e in events if e["event"] == "round_finished"]
    assert [(e["round"], e["rounds"]) for e in finished_rounds] == [(1, 2), (2, 2)]
    for event in finished_rounds:
        assert set(event["held_out"]) == {"loss", "rewards/accuracies", "generation/repetition_loop",
                                          "generation/context_echo"}  # the prompts have a context
        assert event["selected"]["step"] == 8
    report = (two / "compare" / "report.md").read_text(encoding="utf-8")
    assert f"**adapter**: {two / 'rounds' / '2' / 'adapters'}" in report


def test_the_tui_says_which_round_is_running(runs):
    state, shown = RunState(runs / "two"), []
    for event in read_events(runs / "two" / "events.jsonl")[0]:
        state.apply(event)
        if event["event"] == "stage_started":
            shown.append(state.stage_text)
    assert shown == ["sample (round 1/2)", "train (round 1/2)", "sample (round 2/2)", "train (round 2/2)", "compare"]
    assert any(note.startswith("round 2 of 2: held-out loss ") for note in state.notes)


def test_the_model_card_draws_and_tabulates_every_rounds_steps(runs, tmp_path):
    export_run(reopen_run(runs / "two"), tmp_path / "out", ["mlx"])
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8").split("## Training curve")[1]
    losses = by_round(runs / "two")
    assert "| round | step | DPO loss |" in card and "Iterative MIPO, 2 rounds" in card
    for number in (1, 2):  # each round's steps 1 to 8, its last step in the table
        assert f"| {number} | 8 | {losses[number, 'train', 8]:.4g} |" in card
    svg = (tmp_path / "out" / "training_curve.svg").read_text(encoding="utf-8")
    assert svg.count('stroke="#2563eb"') == svg.count('stroke="#dc2626"') == 3  # a line per round in each panel
    assert "━ round 1" in svg and "━ round 2" in svg and ">16</text>" in svg  # 16 steps across the rounds


def test_a_run_killed_in_round_two_resumes_to_the_bytes_of_a_run_never_killed(runs, tmp_path, train):
    (tmp_path / "recipe.yaml").write_bytes((runs.parent / "recipe.yaml").read_bytes())  # where `train` runs it
    name, clean, killed = ("--set", "run_name=killed", "--set", "training.rounds=2"), runs / "two", runs / "killed"
    second = killed / "rounds" / "2"
    kill_when(train(*name), lambda: lines(second / "pairs.jsonl") >= 1, "round 2 sampled a pair")
    assert lines(second / "pairs.jsonl") < len(PROFILES) * 4
    kill_when(train(*name, "--resume"), (second / "checkpoints" / "step-000003" / "state.json").exists,
              "round 2 saved a checkpoint")
    output = finished(train(*name, "--resume"))
    assert f"resuming {killed} in round 2 of 2: " in output and "round 1 of 2 finished before" in output
    assert "==== round 2 of 2\n" in output and "round 1 of 2: held-out loss " in output  # the rounds printed at the end
    clean_files, killed_files = files(clean), files(killed)
    assert clean_files.keys() == killed_files.keys()
    for file in clean_files.keys() - {"recipe.yaml", "events.jsonl", "compare/report.md"}:
        if file.endswith("optimizer.safetensors"):
            # A restored optimizer state is written with its tensors in another order: the same tensors, and so
            # another sha256 in state.json.
            clean_state, killed_state = mx.load(str(clean / file)), mx.load(str(killed / file))
            assert all(mx.array_equal(clean_state[k], killed_state[k]).item() for k in clean_state), file
        elif not file.endswith("state.json"):
            assert killed_files[file] == clean_files[file], file
    report = (killed / "compare" / "report.md").read_text(encoding="utf-8")
    assert report.replace(str(killed), str(clean)) == (clean / "compare" / "report.md").read_text(encoding="utf-8")
    assert by_round(killed) == by_round(clean)


@pytest.mark.parametrize("value, problem", [
    ("0", "expected a value at least 1, got 0"),
    ("1.5", "expected an integer, got 1.5"),
    ("two", "expected an integer, got 'two'"),
])
def test_rounds_that_are_not_a_whole_number_from_1_are_one_line_and_exit_2(tmp_path, value, problem):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\ntraining:\n  rounds: {value}\n")
    done = subprocess.run([sys.executable, "-m", "mipo_mlx.cli", "train", str(recipe)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"mipo-mlx: error: {recipe}: training.rounds: {problem}"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.yaml"]


def test_split_rounds_sample_and_train_on_every_prompt_once(tmp_path, tiny_model_dirs):
    recipe = write_recipe(tmp_path, tiny_model_dirs[("llama", False)], tmp_path / "runs")
    assert cli.main(["train", str(recipe), "--set", "run_name=split", "--set", "training.rounds=2",
                     "--set", "sampling.round_prompts=split"]) == 0
    run = tmp_path / "runs" / "split"
    first, second = read_pairs(run / "pairs.jsonl"), read_pairs(run / "rounds" / "2" / "pairs.jsonl")
    ids = [f"r{i}" for i in range(len(PROFILES) * 4)]
    assert [p.mipo.prompt_id for p in first] == ids[0::2] and [p.mipo.prompt_id for p in second] == ids[1::2]
    # Each round trains on its half's pairs (and holds out some of them), not on all of them.
    events, _ = read_events(run / "events.jsonl")
    trained = [e["train_pairs"] + e["eval_pairs"] for e in events if e["event"] == "stage_finished"
               and e["stage"] == "train"]
    assert trained == [len(ids) // 2] * 2


def test_echo_pairs_from_round_2_leave_round_1_as_it_was(tmp_path, tiny_model_dirs):
    recipe = write_recipe(tmp_path, tiny_model_dirs[("llama", False)], tmp_path / "runs")
    split = ["--set", "training.rounds=2", "--set", "sampling.round_prompts=split"]
    assert cli.main(["train", str(recipe), "--set", "run_name=plain", *split]) == 0
    assert cli.main(["train", str(recipe), "--set", "run_name=echo", *split, "--set", "sampling.echo_pairs=true",
                     "--set", "sampling.echo_from_round=2"]) == 0
    plain, echo = tmp_path / "runs" / "plain", tmp_path / "runs" / "echo"
    assert (echo / "pairs.jsonl").read_bytes() == (plain / "pairs.jsonl").read_bytes()
    second = read_pairs(echo / "rounds" / "2" / "pairs.jsonl")
    echoes = [p for p in second if p.mipo.strategy == "echo"]
    prompts = [p.mipo.prompt_id for p in second if p.mipo.strategy != "echo"]
    assert [p.mipo.prompt_id for p in echoes] == prompts  # one for each of round 2's prompts, all with a context
    assert all(p.rejected_text == p.prompt_messages()[0]["content"] for p in echoes)
    own = read_pairs(plain / "rounds" / "2" / "pairs.jsonl")
    assert [(p.chosen_text, p.rejected_text) for p in second if p.mipo.strategy != "echo"] == \
        [(p.chosen_text, p.rejected_text) for p in own]


def test_echo_pairs_from_a_round_the_run_does_not_have_are_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\nsampling:\n  echo_pairs: true\n  echo_from_round: 3\n"
                      "training:\n  rounds: 2\n")
    done = subprocess.run([sys.executable, "-m", "mipo_mlx.cli", "train", str(recipe)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"mipo-mlx: error: {recipe}: sampling.echo_from_round: echo pairs from round 3 need that many rounds, and "
        "training.rounds is 2; set sampling.echo_from_round to at most 2 or more training.rounds"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("rounds, negative, problem", [
    (13, "random_prompt", "round 12 of 13 1 of the 24 training prompts, and the random_prompt negative needs at "
                          "least 2 prompts"),
    (30, "drop_context", "each of 30 rounds its part of 24 training prompts, and round 30 none"),
])
def test_a_split_that_leaves_a_round_too_few_prompts_is_one_line_and_exit_2(tmp_path, tiny_model_dirs, rounds,
                                                                           negative, problem):
    recipe = write_recipe(tmp_path, tiny_model_dirs[("llama", False)], tmp_path / "runs")
    done = subprocess.run([sys.executable, "-m", "mipo_mlx.cli", "train", str(recipe),
                           "--set", f"training.rounds={rounds}", "--set", "sampling.round_prompts=split",
                           "--set", f"sampling.negative={negative}"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"mipo-mlx: error: {recipe}: sampling.round_prompts: split gives {problem}; set fewer training.rounds or "
        "sampling.round_prompts: all"]
    assert not (tmp_path / "runs").exists()
