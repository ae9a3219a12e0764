"""LoRA DPO: the losses against numpy, accumulation, exact resume, self-checks, mlx-lm loading."""

import json
import math
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mipo_mlx import trainer as trainer_module
from mipo_mlx.dpo import dpo_losses, dpo_metrics
from mipo_mlx.errors import UserError
from mipo_mlx.events import read_events
from mipo_mlx.pipeline import open_run, run_stages
from mipo_mlx.recipe import parse_recipe

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


def numpy_dpo(pc, pr, rc, rr, beta, loss_type, smoothing, nc, nr):
    logsig = lambda x: -np.log1p(np.exp(-x))
    if loss_type == "ipo":
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    h = (pc - rc) - (pr - rr)
    losses = {
        "sigmoid": -logsig(beta * h) * (1 - smoothing) - logsig(-beta * h) * smoothing,
        "robust": (-logsig(beta * h) * (1 - smoothing) + logsig(-beta * h) * smoothing) / (1 - 2 * smoothing),
        "hinge": np.maximum(0, 1 - beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
    }[loss_type]
    return losses, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_losses_and_rewards_match_numpy(loss_type, smoothing):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-30, 5, 16) for _ in range(4))
    nc, nr = rng.integers(5, 40, 16).astype(float), rng.integers(5, 40, 16).astype(float)
    losses, chosen, rejected = dpo_losses(*(mx.array(v) for v in (pc, pr, rc, rr)), 0.1, loss_type, smoothing, mx.array(nc), mx.array(nr))
    expected = numpy_dpo(pc, pr, rc, rr, 0.1, loss_type, smoothing, nc, nr)
    for ours, theirs in zip((losses, chosen, rejected), expected):
        assert np.allclose(np.array(ours), theirs, atol=1e-5)
    metrics = dpo_metrics(losses, chosen, rejected, mx.array(pc), mx.array(pr))
    assert metrics["rewards/accuracies"].item() == pytest.approx(np.mean(expected[1] > expected[2]))
    assert metrics["rewards/margins"].item() == pytest.approx(np.mean(expected[1] - expected[2]), abs=1e-5)


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


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs[("llama", True)]
    settings = ("training.batch_size=2", "training.epochs=2", "training.save_every=3", "lora.dropout=0.1",
                "training.warmup_ratio=0.2")
    straight = train_run(tmp_path, model_dir, "straight", *settings)
    run_stages(straight, ["train"])
    expected = losses_of(straight)

    stopped = train_run(tmp_path, model_dir, "stopped", *settings)
    real_step = trainer_module.Trainer.train_step

    def interrupted(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    trainer_module.Trainer.train_step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stages(stopped, ["train"])
    finally:
        trainer_module.Trainer.train_step = real_step
    assert sorted(p.name for p in (stopped.dir / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    shutil.rmtree(stopped.dir / "checkpoints" / "step-000004")  # resume from the mid-run checkpoint at step 3
    resumed = train_run(tmp_path, model_dir, "stopped", *settings, resume=True)
    run_stages(resumed, ["train"])
    got = losses_of(resumed)
    assert set(got) == set(expected)
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-5


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
    real_logprobs = trainer_module.answer_logprobs
    monkeypatch.setattr(trainer_module, "answer_logprobs", lambda *args: mx.stop_gradient(real_logprobs(*args)))
    with pytest.raises(UserError, match="the first gradient is zero"):
        run_stages(run, ["train"])


def test_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "nan", "training.batch_size=2", "training.save_every=1")
    real_step = trainer_module.Trainer.train_step

    def poisoned(self):
        metrics = real_step(self)
        if self.step == 3:
            metrics["loss"] = float("nan")
        return metrics

    trainer_module.Trainer.train_step = poisoned
    try:
        with pytest.raises(UserError, match=r"step 3: loss nan .* is not finite; .*step-000002"):
            run_stages(run, ["train"])
    finally:
        trainer_module.Trainer.train_step = real_step
    assert (run.dir / "checkpoints" / "step-000002" / "adapters.safetensors").exists()
    events, _ = read_events(run.dir / "events.jsonl")
    assert events[-1]["event"] == "run_failed"


def test_pairs_without_reference_logps_are_scored_once_with_the_adapter_off(tmp_path, tiny_model_dirs):
    run = train_run(tmp_path, tiny_model_dirs[("qwen2", True)], "trl", "training.batch_size=2", "training.max_steps=1")
    run_stages(run, ["train"])
    assert losses_of(run)[1] == pytest.approx(math.log(2), abs=1e-4)
