"""The train stage on tiny models: accumulation, exact resume, self-checks, mlx-lm loading.

    .venv/bin/python -m pytest tests/test_trainer.py -q

The loss formulas themselves are checked against numpy in test_dpo.py.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import activations
from tiny_models import tiny_model

from mipo_mlx import trainer as trainer_module
from mipo_mlx.chat import encode_answer
from mipo_mlx.errors import UserError
from mipo_mlx.events import read_events
from mipo_mlx.loading import load_recipe_model
from mipo_mlx.lora import apply_lora
from mipo_mlx.pipeline import run_stages
from mipo_mlx.recipe import LoraConfig, TrainingConfig, parse_recipe
from mipo_mlx.rundir import MipoRecord, Pair, is_held_out, open_run, read_checkpoint_state, write_checkpoint_state
from mipo_mlx.scoring import answer_logprobs, length_desensitized, pad_batch, score_pairs

PAIRS = [
    ("What should I cook tonight?", "I live in Paris.", "Une soupe à l'oignon.", "A burger."),
    ("How can I sleep better?", "Answer in lowercase.", "go to bed early.", "Go To Bed Early."),
    ("What is a good hobby?", "My cat is Luna.", "Play with Luna.", "Knitting."),
    ("How do I make tea?", "Be brief.", "Boil water, add tea.", "Tea is an ancient drink with a long history in China."),
    ("What should I pack?", "Use bullet points.", "- water\n- map", "Water and a map."),
    ("How do I start running?", "Never use commas.", "Start slow and rest well.", "Start slow, rest, and stretch."),
    ("What game can we play?", "I have two kids.", "Hide and seek with the kids.", "Chess."),
    ("How do I relax?", "I love the sea.", "Walk by the sea.", "Read a book."),
]


def write_pairs(path, with_reference=False, count=len(PAIRS)):
    lines = []
    for i, (question, context, chosen, rejected) in enumerate(PAIRS[:count]):
        pair = {"prompt": [{"role": "system", "content": context}, {"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}
        if with_reference is not False:
            pair["mipo"] = {"id": f"p{i}#0", "prompt_id": f"p{i}", "ref_logps": with_reference}
        lines.append(json.dumps(pair))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def train_run(tmp_path, model_dir, name, *overrides, pairs_ref=False, resume=False, pairs=len(PAIRS)):
    text = f"model: {{path: {model_dir}}}\ndata: {{test: null}}\noutput_dir: {tmp_path}\nrun_name: {name}\n"
    recipe = parse_recipe(text, "r.yaml", ["training.eval_fraction=0.0", "training.learning_rate=1e-3",
                                           "training.warmup_ratio=0.0", "lora.rank=4", *overrides])
    run = open_run(recipe, resume=resume or (tmp_path / name).exists())
    if not (run.dir / "pairs.jsonl").exists():
        write_pairs(run.dir / "pairs.jsonl", pairs_ref, pairs)
    return run


def losses_of(run):
    events, _ = read_events(run.dir / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["event"] == "metrics" and e["split"] == "train"}


def test_trains_and_the_adapter_loads_in_mlx_lm_and_changes_answers(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs[("llama", False)]
    run = train_run(tmp_path, model_dir, "a", "training.epochs=6", "training.batch_size=4", "training.eval_fraction=0.25")
    summary = run_stages(run, ["train"])["train"]
    losses = losses_of(run)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[max(losses)] < losses[1]
    events, _ = read_events(run.dir / "events.jsonl")
    train_metrics = [e for e in events if e["event"] == "metrics" and e["split"] == "train"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second", "peak_memory_gb"):
        assert name in train_metrics[-1]
    assert any(e["event"] == "metrics" and e["split"] == "eval" for e in events)
    assert summary["eval_pairs"] > 0

    config = json.loads((run.dir / "adapters" / "adapter_config.json").read_text())
    assert config["model"] == str(model_dir) and config["mipo"]["training"]["epochs"] == 6
    assert len(config["mipo"]["chat_template_sha256"]) == 64

    base, tokenizer = mlx_lm.load(str(model_dir))
    adapted, _ = mlx_lm.load(str(model_dir), adapter_path=str(run.dir / "adapters"))
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "I live in Paris."},
                                            {"role": "user", "content": "What should I cook tonight?"}], add_generation_prompt=True)
    assert mlx_lm.generate(base, tokenizer, prompt, max_tokens=12) != mlx_lm.generate(adapted, tokenizer, prompt, max_tokens=12)


def test_batch_two_equals_batch_one_with_accumulation_two(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs[("qwen2", False)]
    # Two pairs: one step sees both either way.
    whole = train_run(tmp_path, model_dir, "b2", "training.batch_size=2", pairs=2)
    run_stages(whole, ["train"])
    accumulated = train_run(tmp_path, model_dir, "b1", "training.batch_size=1", "training.grad_accumulation=2", pairs=2)
    run_stages(accumulated, ["train"])
    a = mx.load(str(whole.dir / "adapters" / "adapters.safetensors"))
    b = mx.load(str(accumulated.dir / "adapters" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5


RESUME_SETTINGS = ("training.batch_size=2", "training.epochs=2", "training.save_every=3", "lora.dropout=0.1",
                   "training.warmup_ratio=0.2")


def interrupt_at(step: int, signals: int):
    """Patch Trainer.train_step to send `signals` SIGINTs (ctrl+c, the TUI's stop) once it reaches `step`."""
    real_step = trainer_module.Trainer.train_step

    def signalled(self):
        metrics = real_step(self)
        if self.step == step:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return metrics

    return signalled


def stopped_run(tmp_path, model_dir, name, monkeypatch, *settings, signals=1):
    """A run stopped by ctrl+c at step 4 (of 8)."""
    run = train_run(tmp_path, model_dir, name, *RESUME_SETTINGS, *settings)
    # As in a terminal, also when pytest runs as a background job (which starts with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(trainer_module.Trainer, "train_step", interrupt_at(4, signals))
            with pytest.raises(KeyboardInterrupt):
                run_stages(run, ["train"])
    finally:
        signal.signal(signal.SIGINT, previous)
    return run


def test_ctrl_c_checkpoints_the_step_and_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dirs, monkeypatch):
    model_dir = tiny_model_dirs[("llama", True)]
    straight = train_run(tmp_path, model_dir, "straight", *RESUME_SETTINGS)
    run_stages(straight, ["train"])
    expected = losses_of(straight)

    stopped = stopped_run(tmp_path, model_dir, "stopped", monkeypatch)
    assert sorted(p.name for p in (stopped.dir / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    events, _ = read_events(stopped.dir / "events.jsonl")
    assert events[-1]["event"] == "run_finished" and events[-1]["status"] == "stopped"
    assert not (stopped.dir / "adapters").exists()

    run_stages(train_run(tmp_path, model_dir, "stopped", *RESUME_SETTINGS, resume=True), ["train"])
    got = losses_of(stopped)
    assert set(got) == set(expected)
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-5


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dirs, monkeypatch):
    model_dir, accumulate = tiny_model_dirs[("qwen2", False)], ("training.batch_size=1", "training.grad_accumulation=2")
    straight = train_run(tmp_path, model_dir, "straight", *RESUME_SETTINGS, *accumulate)
    run_stages(straight, ["train"])
    expected = losses_of(straight)

    stopped = stopped_run(tmp_path, model_dir, "stopped", monkeypatch, *accumulate)
    shutil.rmtree(stopped.dir / "checkpoints" / "step-000004")
    run_stages(train_run(tmp_path, model_dir, "stopped", *RESUME_SETTINGS, *accumulate, resume=True), ["train"])
    got = losses_of(stopped)
    assert set(got) == set(expected) and len(got) == 8
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-5


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path, tiny_model_dirs, monkeypatch):
    run = stopped_run(tmp_path, tiny_model_dirs[("llama", False)], "forced", monkeypatch, signals=2)
    assert sorted(p.name for p in (run.dir / "checkpoints").iterdir()) == ["step-000003"]


def test_resume_refuses_pairs_that_changed_since_the_checkpoint(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs[("llama", False)]
    run = train_run(tmp_path, model_dir, "changed", "training.batch_size=2", "training.max_steps=2")
    run_stages(run, ["train"])
    write_pairs(run.dir / "pairs.jsonl", count=len(PAIRS) - 1)
    with pytest.raises(UserError, match="pairs.jsonl changed since .*step-000002"):
        run_stages(train_run(tmp_path, model_dir, "changed", "training.batch_size=2", "training.max_steps=2"), ["train"])


def test_wrong_reference_logps_stop_the_first_step(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "wrongref", "training.batch_size=2",
                    pairs_ref={"chosen": -1.0, "rejected": -50.0})
    with pytest.raises(UserError, match=r"first loss .* is not 0.693147 \(policy == reference\)"):
        run_stages(run, ["train"])


def test_an_update_that_changes_nothing_stops_the_run(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(trainer_module, "schedule", lambda training, total: 0.0)
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "nolr", "training.batch_size=2")
    with pytest.raises(UserError, match="the first update left the adapter unchanged"):
        run_stages(run, ["train"])


def test_zero_gradient_stops_the_run(tmp_path, tiny_model_dirs, monkeypatch):
    """The bug other MLX DPO trainers shipped: policy log-probs outside the differentiated graph."""
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "frozen", "training.batch_size=2")
    real_logprobs = trainer_module.batch_token_logprobs
    monkeypatch.setattr(trainer_module, "batch_token_logprobs", lambda *args: mx.stop_gradient(real_logprobs(*args)))
    with pytest.raises(UserError, match="the first gradient is zero"):
        run_stages(run, ["train"])


def test_nan_loss_stops_the_run_and_the_command_it_names_continues_it(tmp_path, tiny_model_dirs, monkeypatch):
    model_dir, settings = tiny_model_dirs[("llama", False)], ("training.batch_size=2", "training.save_every=1")
    run = train_run(tmp_path, model_dir, "nan", *settings)
    real_step = trainer_module.Trainer.train_step

    def poisoned(self):  # diverges at step 3 with the recipe's learning rate, not with a lower one
        metrics = real_step(self)
        if self.step == 3 and self.training.learning_rate == 1e-3:
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(trainer_module.Trainer, "train_step", poisoned)
    with pytest.raises(UserError, match=r"step 3: loss nan .* is not finite; continue from \S*step-000002 with a lower "
                                        r"learning rate: run the same command with --resume --set "
                                        r"training.learning_rate=0.0001$"):
        run_stages(run, ["train"])
    assert (run.dir / "checkpoints" / "step-000002" / "adapters.safetensors").exists()
    events, _ = read_events(run.dir / "events.jsonl")
    assert events[-1]["event"] == "run_failed"
    first = losses_of(run)

    resumed = train_run(tmp_path, model_dir, "nan", *settings, "training.learning_rate=0.0001", resume=True)
    assert resumed.changed == {"training.learning_rate": (0.001, 0.0001)}
    run_stages(resumed, ["train"])
    events, _ = read_events(run.dir / "events.jsonl")
    assert [e["changes"] for e in events if e["event"] == "recipe_changed"] == [{"training.learning_rate": [0.001, 0.0001]}]
    assert "learning_rate: 0.0001" in (run.dir / "recipe.yaml").read_text()
    losses = losses_of(run)
    assert [losses[1], losses[2]] == [first[1], first[2]] and all(math.isfinite(v) for v in losses.values())
    assert (run.dir / "adapters" / "adapters.safetensors").is_file()


def test_pairs_without_reference_logps_are_scored_once_with_the_adapter_off(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("qwen2", True)], "trl", "training.batch_size=2", "training.max_steps=1")
    run_stages(run, ["train"])
    assert losses_of(run)[1] == pytest.approx(math.log(2), abs=1e-4)


def test_a_hand_written_pairs_file_with_a_raw_line_separator_in_an_answer_trains(tmp_path, tiny_model_dirs):
    """JSON keeps U+2028 raw in strings: the line is still one pair, not a malformed one."""
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "sep", "training.batch_size=2", "training.max_steps=1")
    pairs = run.dir / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().split("\n") if line]
    rows[0]["chosen"][0]["content"] = "Une soupe\u2028à l'oignon.\x85"
    pairs.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    assert "\u2028" in pairs.read_text(encoding="utf-8")
    run_stages(run, ["train"])
    assert losses_of(run)[1] == pytest.approx(math.log(2), abs=1e-4)


def test_a_pairs_file_that_is_not_utf8_is_a_one_line_error(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "latin", "training.batch_size=2")
    (run.dir / "pairs.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"cannot read .*pairs.jsonl \(UnicodeDecodeError\); write it as UTF-8"):
        run_stages(run, ["train"])


def test_an_adapter_that_does_not_start_at_zero_stops_the_first_step(tmp_path, tiny_model_dirs, monkeypatch):
    real_apply_lora = trainer_module.apply_lora

    def nonzero_lora(model, lora):
        real_apply_lora(model, lora)
        lora_b = [(k, mx.ones(v.shape) * 0.1) for k, v in tree_flatten(model.trainable_parameters()) if "lora_b" in k]
        return model.load_weights(lora_b, strict=False)

    monkeypatch.setattr(trainer_module, "apply_lora", nonzero_lora)
    run = train_run(tmp_path, tiny_model_dirs[("llama", True)], "nonzero", "training.batch_size=2")
    with pytest.raises(UserError, match="the adapter does not start at zero"):
        run_stages(run, ["train"])


def test_gradient_checkpointing_gives_the_same_losses_and_is_undone_after(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs[("llama", False)]
    plain = train_run(tmp_path, model_dir, "plain", "training.batch_size=4", "training.max_steps=3")
    run_stages(plain, ["train"])
    layer_call = type(load_recipe_model(plain.recipe.model).model.model.layers[0]).__call__
    checkpointed = train_run(tmp_path, model_dir, "ckpt", "training.batch_size=4", "training.max_steps=3",
                             "training.grad_checkpoint=true")
    run_stages(checkpointed, ["train"])
    expected, got = losses_of(plain), losses_of(checkpointed)
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-5
    assert type(load_recipe_model(checkpointed.recipe.model).model.model.layers[0]).__call__ is layer_call


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("shared_prompts", [True, False])
def test_the_step_has_the_log_probs_and_gradients_of_the_plain_formula(arch, shared_prompts):
    """Prompts and answers run once however many pairs share them, or the head on the answer window, the head in
    slices and swiglu with their own backward passes: the log-probs of whole sequences and autodiff's gradients."""
    model, tokenizer = tiny_model(arch, quantized=False)
    apply_lora(model, LoraConfig(rank=4)).train()
    mx.random.seed(1)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))

    def example(n, question, context, chosen, rejected):
        messages = [{"role": "system", "content": context}, {"role": "user", "content": question}]
        return trainer_module.Example(str(n), encode_answer(tokenizer, messages, chosen),
                                      encode_answer(tokenizer, messages, rejected), 0.0, 0.0)

    # Beside each of the first three pairs an echo pair: its prompt and chosen answer, the context rejected.
    echoes = [(question, context, chosen, context) for question, context, chosen, _ in PAIRS[:3]]
    examples = [example(n, *pair) for n, pair in enumerate(PAIRS + echoes)]
    batch, pairs, _, _, _ = trainer_module.collate(examples, list(range(len(examples))), 0, shared_prompts)
    if shared_prompts:  # 8 prompts, 8 chosen answers, 11 rejected ones
        assert (batch[0].shape[0], batch[-1].shape[0]) == (len(PAIRS), 2 * len(PAIRS) + len(echoes))
        assert pairs[len(PAIRS):, 0].tolist() == pairs[: len(echoes), 0].tolist()
    else:
        assert pairs.tolist() == [[n, len(examples) + n] for n in range(len(examples))]
    rows = [e.chosen for e in examples] + [e.rejected for e in examples]
    tokens, mask = pad_batch([ids for ids, _ in rows], [start for _, start in rows], 0)
    if not shared_prompts:
        assert batch[1].shape[1] < mask.shape[1]  # the window skips prompt positions
    weights = mx.random.normal((len(examples), 2))

    def plain(model):  # (B, 2): each pair's chosen and rejected answer, whole sequences one by one
        logits = model(tokens[:, :-1])
        logps = mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), tokens[:, 1:, None], axis=-1)
        return (logps.squeeze(-1) * mask).sum(axis=-1).reshape(2, -1).T

    def step_logprobs(model):
        return trainer_module.batch_token_logprobs(model, batch, shared_prompts).sum(axis=-1)[pairs]

    expected = nn.value_and_grad(model, lambda model: (plain(model) * weights).sum())(model)
    with trainer_module.lean_swiglu(model):
        got = nn.value_and_grad(model, lambda model: (step_logprobs(model) * weights).sum())(model)
    assert sys.modules[type(model).__module__].swiglu is activations.swiglu  # the patch is undone
    assert mx.allclose(step_logprobs(model), plain(model), atol=1e-4).item()
    assert abs(got[0].item() - expected[0].item()) < 1e-4
    got_grads = dict(tree_flatten(got[1]))
    # A shared prompt sums its answers' gradients into its keys and values: another float order.
    tolerance = 1e-4 if shared_prompts else 1e-5
    for name, grad in tree_flatten(expected[1]):
        assert mx.abs(got_grads[name] - grad).max().item() <= tolerance * mx.abs(grad).max().item(), name


def test_a_batch_takes_the_pairs_of_one_prompt_and_chosen_answer_together_and_runs_them_once():
    def example(prompt_id, chosen, rejected):
        return trainer_module.Example(prompt_id, ([1, 2] + chosen, 2), ([1, 2] + rejected, 2), 0.0, 0.0)

    # Each prompt's own pair and its echo pair, of different lengths, and pairs of other lengths between them.
    examples = []
    for n in range(6):
        examples += [example(f"p{n}", [3] * (n + 1), [4] * (9 - n)), example(f"p{n}", [3] * (n + 1), [5])]
    batches = trainer_module.make_batches(examples, 4, whole_groups=False)
    assert sorted(i for batch in batches for i in batch) == list(range(len(examples)))
    for batch in batches:
        assert len({examples[i].prompt_id for i in batch}) == 2  # two whole prompts
        _, pairs, _, _, _ = trainer_module.collate(examples, batch, 0, shared_prompts=True)
        assert len(set(pairs[:, 0].tolist())) == 2  # two chosen answers, each scored once for both its pairs


def test_held_out_pairs_are_whole_prompts_chosen_by_seed():
    ids = [f"p{i}" for i in range(400)]
    held = {i for i in ids if is_held_out(i, 0.25, seed=0)}
    assert 60 < len(held) < 140
    assert held == {i for i in ids if is_held_out(i, 0.25, seed=0)}
    assert held != {i for i in ids if is_held_out(i, 0.25, seed=1)}


def test_a_step_needs_only_examples_a_model_and_a_config(tmp_path, monkeypatch):
    """What bench/dpo.py and a notebook do: no run directory, nothing written."""
    monkeypatch.chdir(tmp_path)
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4))
    # TRL's standard format (plain strings): the reference log-probs are scored here, adapter off.
    pairs = [Pair(f"{context} {question}", chosen, rejected) for question, context, chosen, rejected in PAIRS]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    training = TrainingConfig(batch_size=4, learning_rate=1e-3, warmup_ratio=0.0)
    trainer = trainer_module.Trainer(model, tokenizer, examples[:6], examples[6:], training, seed=0)
    model.train()
    first, second = trainer.train_step(), trainer.train_step()
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and second["loss"] != first["loss"]
    assert trainer.step == 2 and set(trainer.held_out_metrics()) >= {"loss", "rewards/accuracies"}
    assert list(tmp_path.iterdir()) == []


def test_held_out_metrics_have_no_dropout_noise():
    """With LoRA dropout on, the held-out loss is the model's, not a draw: the same twice, in whatever mode."""
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4, dropout=0.5))
    pairs = [Pair(f"{context} {question}", chosen, rejected) for question, context, chosen, rejected in PAIRS]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    training = TrainingConfig(batch_size=2, learning_rate=1e-2, warmup_ratio=0.0)
    trainer = trainer_module.Trainer(model, tokenizer, examples[:4], examples[4:], training, seed=0)
    model.train()
    trainer.train_step()  # a non-zero adapter, so that dropout would change the log-probs
    model.train()
    first = trainer.held_out_metrics()
    model.train()
    assert trainer.held_out_metrics() == first


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_then_follows_the_scheduler_type(kind):
    training = TrainingConfig(learning_rate=1e-3, warmup_ratio=0.1, lr_scheduler_type=kind)
    rate = trainer_module.schedule(training, 100)
    values = [rate(mx.array(step)).item() for step in (0, 10, 55, 99)]
    assert 0 < values[0] < values[1] == pytest.approx(1e-3)
    expected_middle = {"cosine": 5e-4, "linear": 5e-4, "constant": 1e-3}[kind]
    assert values[2] == pytest.approx(expected_middle, rel=0.05)
    assert values[3] == pytest.approx(1e-3 if kind == "constant" else 0.0, abs=2e-5)  # the last update: 1 step left


def test_length_desensitized_weights_are_trl_s_shared_and_tail_tokens():
    mask = mx.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=mx.float32)
    # Pairs (row 0, row 2) and (row 1, row 3): shared lengths 2 and 2; and row 0 against row 1: 2 again.
    weights = length_desensitized(mask[mx.array([[0, 2], [1, 3], [0, 1]])], 0.25)
    assert weights.tolist() == [[[1, 1, 0.25, 0.25, 0], [0, 1, 1, 0, 0]], [[1, 1, 0, 0, 0], [0, 1, 1, 0.25, 0.25]],
                                [[1, 1, 0.25, 0.25, 0], [1, 1, 0, 0, 0]]]


def ld_trainer(alpha, nll_weight=0.0, dpop_lambda=0.0):
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4))
    pairs = [Pair(f"{context} {question}", chosen, rejected) for question, context, chosen, rejected in PAIRS]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    training = TrainingConfig(batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, ld_alpha=alpha,
                              nll_weight=nll_weight, dpop_lambda=dpop_lambda)
    return trainer_module.Trainer(model, tokenizer, examples[:6], examples[6:], training, seed=0), examples


def test_length_desensitization_reweights_policy_and_reference_alike():
    plain, examples = ld_trainer(None)
    halved, _ = ld_trainer(0.5)
    # The reference log-probs were scored again with the same weights: policy == reference at the start.
    assert halved.train_examples[0].ref_chosen != examples[0].ref_chosen
    for trainer in (plain, halved):
        trainer.model.train()
        assert trainer.train_step()["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # alpha 1 is plain DPO.
    same, _ = ld_trainer(1.0)
    assert [e.ref_chosen for e in same.train_examples] == pytest.approx([e.ref_chosen for e in examples[:6]], abs=1e-4)


def test_length_desensitized_pairs_share_their_chosen_answer_row_and_keep_their_own_weights():
    model, tokenizer = tiny_model("llama", quantized=False)
    pairs = [Pair(f"{context} {question}", chosen, negative)
             for question, context, chosen, rejected in PAIRS[:3] for negative in (rejected, context)]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    batch, rows, _, _, _ = trainer_module.collate(examples, list(range(6)), 0, shared_prompts=True)
    assert rows[0::2, 0].tolist() == rows[1::2, 0].tolist()  # a prompt's two pairs run its chosen answer once
    tokens = trainer_module.batch_token_logprobs(model, batch, shared_prompts=True)
    together = trainer_module.pair_sums(tokens, batch[-1], rows, 0.5)[1]  # (6, 2)
    for n in range(6):
        batch, rows, _, _, _ = trainer_module.collate(examples, [n], 0, shared_prompts=True)
        tokens = trainer_module.batch_token_logprobs(model, batch, shared_prompts=True)
        alone = trainer_module.pair_sums(tokens, batch[-1], rows, 0.5)[1]
        assert together[n].tolist() == pytest.approx(alone[0].tolist(), abs=1e-4)
    assert abs(together[0, 0] - together[1, 0]).item() > 1e-3  # the public parts differ: one row, two weightings


def test_length_desensitized_references_come_from_the_stored_public_parts_as_from_scoring_again():
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4))
    plain = [Pair(f"{context} {question}", chosen, rejected) for question, context, chosen, rejected in PAIRS]
    logps, publics, _ = score_pairs(model, tokenizer, [(p.prompt_messages(), p.chosen, p.rejected) for p in plain])
    pairs = [dataclasses.replace(p, mipo=MipoRecord(ref_logps={"chosen": c, "rejected": r, "chosen_public": pc,
                                                               "rejected_public": pr}))
             for p, (c, r), (pc, pr) in zip(plain, logps, publics)]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    training = TrainingConfig(batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, ld_alpha=0.5)
    stored = trainer_module.Trainer(model, tokenizer, examples[:6], examples[6:], training, seed=0)
    unstored = [dataclasses.replace(e, ref_public=None) for e in examples]  # a pairs file without them: scored
    scored = trainer_module.Trainer(model, tokenizer, unstored[:6], unstored[6:], training, seed=0)
    refs = [[r for e in t.train_examples + t.held_out for r in (e.ref_chosen, e.ref_rejected)] for t in (stored, scored)]
    assert refs[0] == pytest.approx(refs[1], abs=1e-4)
    # Without a pass: half the whole answer's and half its public part's stored log-prob.
    assert refs[0] == [0.5 * whole + 0.5 * public for pair in zip(logps, publics) for whole, public in zip(*pair)]
    assert refs[0] != pytest.approx([r for e in examples for r in (e.ref_chosen, e.ref_rejected)], abs=1e-2)
    model.train()
    assert stored.train_step()["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start


def test_infonce_takes_each_prompt_chosen_answer_against_all_its_negatives_at_once():
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4))
    # Prompts 0-2 have two negatives each (the second as an echo pair's: the context), prompt 3 one.
    pairs, prompt_ids = [], []
    for n, (question, context, chosen, rejected) in enumerate(PAIRS[:4]):
        for negative in [rejected, context][: 2 if n < 3 else 1]:
            pairs.append(Pair(f"{context} {question}", chosen, negative))
            prompt_ids.append(f"p{n}")
    examples = [dataclasses.replace(e, prompt_id=p) for e, p in
                zip(trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256), prompt_ids)]
    training = TrainingConfig(loss="infonce", batch_size=3, learning_rate=1e-3, warmup_ratio=0.0)
    trainer = trainer_module.Trainer(model, tokenizer, examples, [], training, seed=0)
    for batch in trainer.batches:  # whole prompts, never more than batch_size pairs unless one prompt has more
        assert sorted(batch) == [i for i, p in enumerate(prompt_ids) if p in {prompt_ids[j] for j in batch}]
    assert sorted(len(batch) for batch in trainer.batches) == [2, 2, 3]
    # Policy == reference: ln(k + 1) per prompt, averaged over the batch's prompts.
    loss, expected = trainer.initial_dpo_loss()
    first = trainer.next_micro_batches()[0][0]
    sizes = [prompt_ids[i] for i in first]
    assert expected == pytest.approx(sum(math.log(sizes.count(p) + 1) for p in set(sizes)) / len(set(sizes)))
    assert loss == pytest.approx(expected, abs=1e-4)

    mx.random.seed(2)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    indices = list(range(len(examples)))  # all four prompts in one batch
    batch, answer_rows, group, refs, _ = trainer_module.collate(examples, indices, trainer.pad_id,
                                                                trainer.shared_prompts)
    _, metrics = trainer._loss(model.eval(), batch, answer_rows, group, refs)
    logps = trainer_module.batch_token_logprobs(model, batch, trainer.shared_prompts).sum(axis=-1)[answer_rows].tolist()
    by_prompt = {}
    for (chosen, rejected), e in zip(logps, examples):
        rewards = by_prompt.setdefault(e.prompt_id, [training.beta * (chosen - e.ref_chosen)])
        rewards.append(training.beta * (rejected - e.ref_rejected))
    by_hand = [math.log(sum(math.exp(r) for r in rewards)) - rewards[0] for rewards in by_prompt.values()]
    assert metrics["loss"].item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    accuracies = [c - e.ref_chosen > r - e.ref_rejected for (c, r), e in zip(logps, examples)]
    assert metrics["rewards/accuracies"].item() == pytest.approx(sum(accuracies) / len(accuracies))


def test_the_nll_term_is_the_mean_over_all_chosen_tokens_of_the_batch():
    trainer, _ = ld_trainer(None, nll_weight=1.0)
    indices = trainer.next_micro_batches()[0][0]
    batch, pairs, group, refs, _ = trainer_module.collate(trainer.train_examples, indices, trainer.pad_id,
                                                          trainer.shared_prompts)
    _, metrics = trainer._loss(trainer.model, batch, pairs, group, refs)
    model = trainer.model
    chosen = [trainer.train_examples[i].chosen for i in indices]
    total, count = 0.0, 0
    for ids, start in chosen:  # the plain forward, answer by answer
        logits = model(mx.array([ids[:-1]]))[0]
        logps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total -= sum(logps[t - 1, ids[t]].item() for t in range(start, len(ids)))
        count += len(ids) - start
    assert metrics["nll_loss"].item() == pytest.approx(total / count, rel=1e-4)
    assert metrics["loss"].item() == pytest.approx(math.log(2) + total / count, rel=1e-4)


def test_dpo_positive_starts_at_ln_2_and_learns(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "dpop", "training.dpop_lambda=5.0",
                    "training.epochs=3", "training.batch_size=4")
    run_stages(run, ["train"])
    losses = losses_of(run)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-4) and losses[max(losses)] < losses[1]


def test_the_final_adapter_is_the_held_out_best_step_and_early_stopping_ends_the_run(tmp_path, tiny_model_dirs):
    overrides = ("training.epochs=20", "training.batch_size=2", "training.eval_fraction=0.3", "training.eval_every=1",
                 "training.learning_rate=2e-2", "training.probe_prompts=0", "training.select_checkpoint=eval_loss")
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "best", *overrides, "training.early_stopping_patience=2")
    summary = run_stages(run, ["train"])["train"]
    events, _ = read_events(run.dir / "events.jsonl")
    held_out = {e["step"]: e["loss"] for e in events if e["event"] == "metrics" and e["split"] == "eval"}
    best = min(held_out, key=held_out.get)
    selected = summary["selected"]
    assert selected["step"] == best and selected["selected_by"] == "eval_loss"
    assert max(held_out) - best == 2  # stopped two evaluations (eval_every 1) after the best
    assert summary["steps"] == max(held_out) < run.recipe.training.epochs * 3  # before the last of 20 epochs
    checkpoint = run.dir / "checkpoints" / f"step-{best:06d}"
    assert (run.dir / "adapters" / "adapters.safetensors").read_bytes() == (checkpoint / "adapters.safetensors").read_bytes()
    assert json.loads((run.dir / "adapters" / "adapter_config.json").read_text())["mipo"]["step"] == best
    # A resumed run that stopped early trains no further.
    again = train_run(tmp_path, tiny_model_dirs[("llama", False)], "best", *overrides,
                      "training.early_stopping_patience=2", resume=True)
    assert run_stages(again, ["train"])["train"]["steps"] == summary["steps"]


def test_held_out_answers_that_loop_more_than_before_training_are_reported_and_not_selected(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "loops", "training.eval_fraction=0.3",
                    "training.select_checkpoint=eval_loss")
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4))
    pairs = [Pair(f"{context} {question}", chosen, rejected) for question, context, chosen, rejected in PAIRS]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    trainer = trainer_module.Trainer(model, tokenizer, examples[:6], examples[6:], run.recipe.training, seed=0)

    class LoopingProbe:  # answers that loop more after some steps than before training
        prompts, with_context, before = [None] * 4, 0, {"loops": 1, "echoes": 0, "tokens": 12.0}

        def __init__(self):
            self.loops = iter([1, 3])

        def answer(self):
            return {"loops": next(self.loops), "echoes": 0, "tokens": 12.0}

    probe, config = LoopingProbe(), {"mipo": {}}
    trainer.step = 10
    trainer_module.evaluate_held_out(trainer, run, config, probe)
    first = trainer.best
    trainer.step = 20
    trainer.held_out_metrics = lambda: {"loss": 0.01, "rewards/accuracies": 1.0}  # better, but it loops
    trainer_module.evaluate_held_out(trainer, run, config, probe)
    assert trainer.best == first and first["step"] == 10 and first["excess_loops"] == 0
    events, _ = read_events(run.dir / "events.jsonl")
    warnings = [e["text"] for e in events if e["event"] == "note" and e["level"] == "warning"]
    assert warnings == ["step 20: 3 of 4 held-out answers loop (1 before training)"]
    probes = [e for e in events if e["event"] == "metrics" and e["split"] == "eval"]
    assert [e["generation/repetition_loop"] for e in probes] == [0.25, 0.75]


def test_held_out_answers_that_copy_their_context_more_than_before_training_are_reported(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "echoes", "training.eval_fraction=0.3")
    model, tokenizer = tiny_model("llama", quantized=False)
    apply_lora(model, LoraConfig(rank=4))
    context = "I'm Kenji, a carpenter living in Osaka with my dog Bruno."
    pairs = [Pair([{"role": "system", "content": context}, {"role": "user", "content": question}], chosen, rejected,
                  MipoRecord(prompt_id=f"p{n}")) for n, (question, _, chosen, rejected) in enumerate(PAIRS)]
    examples = trainer_module.build_examples(pairs, model, tokenizer, max_seq_length=256)
    assert all(e.context == context for e in examples)
    trainer = trainer_module.Trainer(model, tokenizer, examples[:6], examples[6:], run.recipe.training, seed=0)
    probe = trainer_module.Probe(trainer, count=2, max_tokens=8)
    assert probe.with_context == 2 and probe.before["echoes"] == 0  # the tiny model's answers copy nothing
    echo = {"loops": 0, "echoes": 2, "tokens": 8.0}
    probe.answer = lambda: echo  # the answers after some steps: both copy the context
    trainer.step = 10
    _, metrics = trainer_module.evaluate_held_out(trainer, run, {"mipo": {}}, probe)
    assert metrics["generation/context_echo"] == 1.0
    events, _ = read_events(run.dir / "events.jsonl")
    warnings = [e["text"] for e in events if e["event"] == "note" and e["level"] == "warning"]
    assert warnings == ["step 10: 2 of 2 held-out answers copy their context (0 before training)"]


def damage_with_random_bytes(checkpoint):
    weights = checkpoint / "adapters.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))


def damage_tensor_bytes(checkpoint):
    """4 KiB of the tensor data (after the header) randomized: the file still reads, its values are garbage."""
    weights = checkpoint / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    span = min(4096, len(data) - start)
    data[start : start + span] = os.urandom(span)
    weights.write_bytes(bytes(data))


def damage_with_finite_noise(checkpoint):
    """1024 values of a trained lora_b moved by small finite noise: a valid file of plausible weights."""
    weights = checkpoint / "adapters.safetensors"
    tensors = mx.load(str(weights))
    name = next(n for n in sorted(tensors) if n.endswith("lora_b"))
    flat = tensors[name].reshape(-1)
    count = min(1024, flat.size)
    flat = mx.concatenate([flat[:count] + 1e-3 * mx.random.normal((count,)), flat[count:]])
    mx.save_safetensors(str(weights), {**tensors, name: flat.reshape(tensors[name].shape)})


def damage_by_losing_a_file(checkpoint):
    (checkpoint / "optimizer.safetensors").unlink()


DAMAGES = {
    "random-bytes": (damage_with_random_bytes, "adapters.safetensors is not the file written at step 4"),
    "randomized-tensor-bytes": (damage_tensor_bytes, "adapters.safetensors is not the file written at step 4"),
    "finite-noise": (damage_with_finite_noise, "adapters.safetensors is not the file written at step 4"),
    "missing-file": (damage_by_losing_a_file, "optimizer.safetensors is missing"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dirs):
    """The 8 steps of RESUME_SETTINGS in one go: what every resumed run must end as, byte for byte."""
    run = train_run(tmp_path_factory.mktemp("uninterrupted"), tiny_model_dirs[("llama", False)], "straight",
                    *RESUME_SETTINGS)
    run_stages(run, ["train"])
    return run


def same_run(got, expected) -> None:
    """The same adapter (both files) and the same loss at every step."""
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert (got.dir / "adapters" / name).read_bytes() == (expected.dir / "adapters" / name).read_bytes(), name
    assert losses_of(got) == losses_of(expected)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_reported_in_one_line_and_the_one_before_ends_as_the_uninterrupted_run(
        damage, tmp_path, tiny_model_dirs, monkeypatch, caplog, uninterrupted):
    model_dir = tiny_model_dirs[("llama", False)]
    stopped = stopped_run(tmp_path, model_dir, "damaged", monkeypatch)  # checkpoints at steps 3 and 4
    newest = stopped.dir / "checkpoints" / "step-000004"
    make_damage, problem = DAMAGES[damage]
    make_damage(newest)

    caplog.set_level(logging.INFO, logger="mipo_mlx")
    run_stages(train_run(tmp_path, model_dir, "damaged", *RESUME_SETTINGS, resume=True), ["train"])
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning == (f"checkpoint {newest} is damaged: {problem}"
                       + (" (its sha256 differs from the one recorded)" if "written" in problem else "")
                       + "; set aside as damaged-step-000004, continuing from step-000003")
    assert (stopped.dir / "checkpoints" / "damaged-step-000004").is_dir()
    same_run(stopped, uninterrupted)


def test_a_checkpoint_of_another_adapter_is_caught_by_its_tensors_before_it_is_loaded(
        tmp_path, tiny_model_dirs, monkeypatch, caplog, uninterrupted):
    """Digests that match, but tensors this recipe's adapter does not have (here rank 2 instead of 4)."""
    model_dir = tiny_model_dirs[("llama", False)]
    stopped = stopped_run(tmp_path, model_dir, "other", monkeypatch)
    newest = stopped.dir / "checkpoints" / "step-000004"
    tensors = mx.load(str(newest / "adapters.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("lora_a"))
    mx.save_safetensors(str(newest / "adapters.safetensors"), {**tensors, name: tensors[name][:, :2]})
    state = read_checkpoint_state(newest)
    write_checkpoint_state(newest, {k: v for k, v in state.items() if k != "sha256"})  # as if written so

    caplog.set_level(logging.WARNING, logger="mipo_mlx")
    run_stages(train_run(tmp_path, model_dir, "other", *RESUME_SETTINGS, resume=True), ["train"])
    [warning] = [r.getMessage() for r in caplog.records]
    shape = list(tensors[name].shape)
    assert (f"adapters.safetensors does not hold the tensors this recipe's adapter has ({name} is F32 "
            f"[{shape[0]}, 2], not F32 {shape})") in warning
    same_run(stopped, uninterrupted)


def test_a_run_whose_every_checkpoint_is_damaged_stops_in_one_line(tmp_path, tiny_model_dirs, monkeypatch):
    model_dir = tiny_model_dirs[("llama", False)]
    stopped = stopped_run(tmp_path, model_dir, "lost", monkeypatch)
    for step in (3, 4):
        damage_with_finite_noise(stopped.dir / "checkpoints" / f"step-{step:06d}")
    with pytest.raises(UserError, match=r"^--resume: every checkpoint of \S+ is damaged \(step-000004: .*; step-000003: "
                                        r".*\); move \S+checkpoints away to train again from the first step"):
        run_stages(train_run(tmp_path, model_dir, "lost", *RESUME_SETTINGS, resume=True), ["train"])
    assert sorted(p.name for p in (stopped.dir / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


def test_each_checkpoint_records_the_sha256_of_its_files(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "digests", "training.batch_size=4",
                    "training.max_steps=2", "training.save_every=1")
    run_stages(run, ["train"])
    events, _ = read_events(run.dir / "events.jsonl")
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert [e["step"] for e in saved] == [1, 2]
    for event in saved:
        state = read_checkpoint_state(event["path"])
        assert set(state["sha256"]) == {"adapters.safetensors", "adapter_config.json", "optimizer.safetensors"}
        assert state["sha256"]["adapters.safetensors"] == event["sha256"]
        for name, digest in state["sha256"].items():
            assert hashlib.sha256((Path(event["path"]) / name).read_bytes()).hexdigest() == digest


def test_held_out_evaluations_come_every_eval_every_steps_and_at_the_last_not_twice_in_a_row(tmp_path, tiny_model_dirs):
    overrides = ("training.epochs=20", "training.batch_size=2", "training.eval_fraction=0.3", "training.eval_every=4",
                 "training.probe_prompts=0")
    for steps, expected in ((9, [4, 9]), (10, [4, 8, 10])):  # step 8 is half an interval (2 steps) from 10
        run = train_run(tmp_path, tiny_model_dirs[("llama", False)], f"every-{steps}", *overrides,
                        f"training.max_steps={steps}")
        run_stages(run, ["train"])
        events, _ = read_events(run.dir / "events.jsonl")
        assert [e["step"] for e in events if e["event"] == "metrics" and e["split"] == "eval"] == expected


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_answers_cut_at_max_seq_length_train_from_policy_equal_to_reference(tmp_path, tiny_model_dirs, ld_alpha):
    """Stored reference log-probs cover whole answers; past training.max_seq_length the policy sees part of one."""
    model_dir = tiny_model_dirs[("llama", False)]
    loaded = load_recipe_model(parse_recipe(f"model: {{path: {model_dir}}}\n", "r.yaml", []).model)
    plain = [Pair([{"role": "system", "content": context}, {"role": "user", "content": question}],
                  [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])
             for question, context, chosen, rejected in PAIRS]
    logps, publics, _ = score_pairs(loaded.model, loaded.tokenizer,
                                    [(p.prompt_messages(), p.chosen_text, p.rejected_text) for p in plain])
    encoded = [[encode_answer(loaded.tokenizer, p.prompt_messages(), text) for text in (p.chosen_text, p.rejected_text)]
               for p in plain]
    cut_at = max(start for pair in encoded for _, start in pair) + 2  # every prompt fits, some answers do not
    assert sum(len(ids) > cut_at for pair in encoded for ids, _ in pair) >= 4
    alpha = "null" if ld_alpha is None else ld_alpha
    run = train_run(tmp_path, model_dir, f"cut-{alpha}", "training.batch_size=4", "training.max_steps=1",
                    f"training.max_seq_length={cut_at}", f"training.ld_alpha={alpha}")
    lines = [json.loads(line) for line in (run.dir / "pairs.jsonl").read_text().splitlines()]
    for i, (line, (c, r), (pc, pr)) in enumerate(zip(lines, logps, publics)):
        line["mipo"] = {"id": f"p{i}#0", "prompt_id": f"p{i}",
                        "ref_logps": {"chosen": c, "rejected": r, "chosen_public": pc, "rejected_public": pr}}
    (run.dir / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_stages(run, ["train"])  # the first-step check holds: the cut answers' references are the cut answers'
    assert losses_of(run)[1] == pytest.approx(math.log(2), abs=1e-4)
