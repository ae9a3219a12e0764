"""MIPO pair sampling on the tiny model: strategies, reference log-probs, resume, data errors."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx import sampling
from mipo_mlx.chat import encode_answer
from mipo_mlx.data import read_prompts
from mipo_mlx.errors import UserError
from mipo_mlx.loading import load_recipe_model
from mipo_mlx.pipeline import run_stages
from mipo_mlx.recipe import parse_recipe
from mipo_mlx.rundir import MipoRecord, Pair, PairsWriter, open_run
from mipo_mlx.scoring import score_answers

PROFILES = [
    ("I live in Paris and I answer in French.", "What should I cook tonight?"),
    ("Keep answers under 20 words.", "How can I sleep better?"),
    ("My cat Luna likes the sofa.", "What is a good hobby?"),
    ("Start with 'Hello friend'.", "How do I make tea?"),
    ("Use bullet points.", "What should I pack for a trip?"),
    ("Never use commas.", "How do I start running?"),
]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": q, "context": c}) + "\n" for i, (c, q) in enumerate(PROFILES)))
    return path


def make_run(tmp_path, model_dir, prompts, *overrides, name="run"):
    text = f"model: {{path: {model_dir}}}\ndata: {{train: {prompts}, test: null}}\noutput_dir: {tmp_path / 'runs'}\nrun_name: {name}\n"
    recipe = parse_recipe(text, "r.yaml", ["sampling.max_tokens=12", "sampling.batch_size=4", "sampling.temperature=0.8", *overrides])
    return open_run(recipe, resume=True)


def read_pairs(run):
    return [json.loads(line) for line in (run.dir / "pairs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["random_prompt", "drop_context", "swap_context"])
def test_no_negative_comes_from_its_own_prompt_or_context(tmp_path, tiny_model_dirs, prompts_file, strategy):
    run = make_run(tmp_path, tiny_model_dirs[("llama", False)], prompts_file, f"sampling.negative={strategy}")
    run_stages(run, ["sample"])
    pairs = read_pairs(run)
    assert len(pairs) == len(PROFILES)
    for pair in pairs:
        meta = pair["mipo"]
        own_context = pair["prompt"][0]["content"]
        negative_system = [m["content"] for m in meta["negative_prompt"] if m["role"] == "system"]
        assert pair["prompt"][0]["role"] == "system"  # stored as answers to the full prompt
        if strategy == "random_prompt":
            assert meta["negative_source"] != meta["prompt_id"]
            assert meta["negative_prompt"][-1]["content"] != pair["prompt"][-1]["content"]
        elif strategy == "drop_context":
            assert negative_system == []
            assert meta["negative_prompt"][-1] == pair["prompt"][-1]
        else:
            assert negative_system and negative_system[0] != own_context
            assert meta["negative_prompt"][-1] == pair["prompt"][-1]
        assert meta["pmi"] == pytest.approx(meta["ref_logps"]["chosen"] - meta["ref_logps"]["rejected"])


def test_k_negatives_give_k_pairs_per_prompt(tmp_path, tiny_model_dirs, prompts_file):
    run = make_run(tmp_path, tiny_model_dirs[("qwen2", False)], prompts_file, "sampling.negatives_per_prompt=3",
                   "sampling.negative=swap_context")
    run_stages(run, ["sample"])
    pairs = read_pairs(run)
    assert len(pairs) == 3 * len(PROFILES)
    assert len({p["mipo"]["id"] for p in pairs}) == len(pairs)
    by_prompt = {}
    for pair in pairs:
        by_prompt.setdefault(pair["mipo"]["prompt_id"], []).append(pair)
    assert all(len(group) == 3 for group in by_prompt.values())
    # One positive per prompt, shared by its k pairs.
    assert all(len({p["chosen"][0]["content"] for p in group}) == 1 for group in by_prompt.values())


def test_reference_logps_equal_a_fresh_full_forward(tmp_path, tiny_model_dirs, prompts_file):
    model_dir = tiny_model_dirs[("llama", True)]
    run = make_run(tmp_path, model_dir, prompts_file, "sampling.negative=drop_context")
    run_stages(run, ["sample"])
    loaded = load_recipe_model(run.recipe.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    for pair in read_pairs(run):
        for side in ("chosen", "rejected"):
            ids, start = encode_answer(tokenizer, pair["prompt"], pair[side][0]["content"])
            logits = model(mx.array([ids[:-1]])).astype(mx.float32)[0]  # (T-1, V)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            fresh = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert abs(fresh - pair["mipo"]["ref_logps"][side]) < 1e-3


def test_same_seed_same_pairs_and_a_killed_run_resumes_exactly(tmp_path, tiny_model_dirs, prompts_file, monkeypatch):
    model_dir = tiny_model_dirs[("llama", False)]
    clean = make_run(tmp_path, model_dir, prompts_file, "sampling.negative=drop_context", "sampling.batch_size=2", name="clean")
    run_stages(clean, ["sample"])
    expected = (clean.dir / "pairs.jsonl").read_text()

    killed = make_run(tmp_path, model_dir, prompts_file, "sampling.negative=drop_context", "sampling.batch_size=2", name="killed")
    real_answers = sampling.BatchDecoder.answers

    def dies_after_ten_answers(self):
        for count, answer in enumerate(real_answers(self)):
            if count == 10:  # of 12: the first group of pairs is written, the second not
                raise KeyboardInterrupt
            yield answer

    monkeypatch.setattr(sampling.BatchDecoder, "answers", dies_after_ten_answers)
    with pytest.raises(KeyboardInterrupt):
        run_stages(killed, ["sample"])
    written = (killed.dir / "pairs.jsonl").read_text()
    assert 0 < len(written) < len(expected) and expected.startswith(written)
    with open(killed.dir / "pairs.jsonl", "a") as f:
        f.write('{"prompt": [{"role": "user", "con')  # a kill in the middle of a line
    monkeypatch.setattr(sampling.BatchDecoder, "answers", real_answers)
    run_stages(make_run(tmp_path, model_dir, prompts_file, "sampling.negative=drop_context", "sampling.batch_size=2",
                        name="killed"), ["sample"])
    assert (killed.dir / "pairs.jsonl").read_text() == expected

    # A finished file is never rewritten: a rerun appends nothing and generates nothing.
    before = (clean.dir / "pairs.jsonl").stat().st_mtime_ns
    summary = run_stages(make_run(tmp_path, model_dir, prompts_file, "sampling.negative=drop_context",
                                  "sampling.batch_size=2", name="clean"), ["sample"])
    assert summary["sample"]["generated_answers"] == 0
    assert (clean.dir / "pairs.jsonl").stat().st_mtime_ns == before


@pytest.fixture
def start_sample(tmp_path):
    """Starts `mipo-mlx sample RECIPE` in a child process, as a person runs it; none outlives the test."""
    children = []

    def start(recipe, name):
        with open(tmp_path / f"{name}.log", "wb") as log:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "mipo_mlx.cli", "sample", str(recipe), "--set", f"run_name={name}"],
                cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
            ))
        return children[-1]

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def kill_after_lines(child, path, lines, timeout=120):
    """SIGKILL the child as soon as `path` holds at least `lines` complete lines; what it holds then."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= lines):
        assert child.poll() is None, f"the run ended (status {child.returncode}) before it wrote {lines} pair(s)"
        assert time.monotonic() < deadline, f"no {lines} pair(s) after {timeout} s"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run finished before the kill; give it more prompts"
    return path.read_bytes()


def test_sample_command_killed_with_sigkill_resumes_to_the_clean_pairs(tmp_path, tiny_model_dirs, start_sample):
    # drop_context with batch 2: many short steps, so a kill lands mid-run.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{q} ({i})", "context": c}) + "\n"
                               for i, (c, q) in enumerate(PROFILES * 6)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{path: {tiny_model_dirs[('llama', False)]}}}\ndata: {{train: {prompts}, test: null}}\n"
                      f"output_dir: {tmp_path / 'runs'}\nsampling: {{negative: drop_context, batch_size: 2, "
                      "max_tokens: 8, temperature: 0.8}\n")
    clean = start_sample(recipe, "clean")
    killed = tmp_path / "runs" / "killed" / "pairs.jsonl"
    first = kill_after_lines(start_sample(recipe, "killed"), killed, 1)
    assert clean.wait(timeout=120) == 0, (tmp_path / "clean.log").read_text()
    expected = (tmp_path / "runs" / "clean" / "pairs.jsonl").read_bytes()
    assert expected.count(b"\n") == len(PROFILES) * 6
    assert expected.startswith(first) and len(first) < len(expected)

    # A kill in the middle of a write leaves the start of the next line; the rerun drops it and makes it again.
    complete = first[: first.rfind(b"\n") + 1]
    next_line = expected[len(complete) : expected.index(b"\n", len(complete)) + 1]
    killed.write_bytes(complete + next_line[: len(next_line) // 2])
    rerun = start_sample(recipe, "killed")
    assert rerun.wait(timeout=120) == 0, (tmp_path / "killed.log").read_text()
    resumed = killed.read_bytes()
    assert resumed == expected and resumed.endswith(b"\n")
    ids = [json.loads(line)["mipo"]["id"] for line in resumed.splitlines()]
    assert len(ids) == len(set(ids))


def test_pairs_file_keeps_unicode_line_breaks_in_answers_and_names_a_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = PairsWriter(path)
    requests, finish = {"chosen": "a/chosen", "rejected": "b/chosen"}, {"chosen": "stop", "rejected": "length"}
    for n, text in enumerate(["one\u2028two", "three\x85four\u2029"]):
        pairs.append(Pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": text}],
                          [{"role": "assistant", "content": "x"}], MipoRecord(id=f"p{n}", requests=requests, finish=finish)))
    pairs.close()
    # Every reader's line splitting sees two lines, and a resume reads back the exact answers.
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    reopened = PairsWriter(path)
    answers = sampling.known_answers(reopened.written)
    assert list(reopened.written) == ["p0", "p1"] and answers["a/chosen"].text == "three\x85four\u2029"
    reopened.close()

    path.write_bytes(path.read_bytes() + b'{"not": "a pair"}\n')
    with pytest.raises(UserError, match=rf"{path}:3: not a pair written by mipo-mlx"):
        PairsWriter(path)


def test_filters_drop_and_count(tmp_path, tiny_model_dirs, prompts_file):
    run = make_run(tmp_path, tiny_model_dirs[("llama", False)], prompts_file, "sampling.drop_truncated=true",
                   "sampling.max_tokens=2")
    summary = run_stages(run, ["sample"])["sample"]
    assert summary["dropped"].get("truncated", 0) + summary["pairs"] == len(PROFILES)
    assert all("length" not in p["mipo"]["finish"].values() for p in read_pairs(run))


@pytest.mark.parametrize("chosen, rejected, reason", [
    ("Walk. " * 12, "Read a book before bed and keep the room cool.", "looping"),
    ("Go to bed early and keep the room dark and cool.", "Go to bed early and keep the room dark and quiet.",
     "similar"),
    ("Go to bed early and keep the room dark.", "Drink warm milk, and read a paper book.", None),
])
def test_looping_and_near_duplicate_pairs_are_dropped_when_asked(chosen, rejected, reason):
    settings = parse_recipe("sampling: {drop_looping: true, drop_similar: 0.5}").sampling
    finish = {"chosen": "stop", "rejected": "stop"}
    pair = Pair([{"role": "user", "content": "How can I sleep better?"}], chosen, rejected, MipoRecord(finish=finish))
    assert sampling.drop_reason(pair, settings) == reason
    assert sampling.drop_reason(pair, parse_recipe("").sampling) is None  # off by default


@pytest.mark.parametrize("chosen, reason", [
    ("I'm Kenji, a carpenter living in Osaka. Try a warm bath.", "echo"),  # 6 words of the context
    ("Hi Kenji, a warm bath in Osaka helps. Take care", None),  # the name, the city and the closing asked for
])
def test_pairs_whose_chosen_answer_copies_its_context_are_dropped_when_asked(chosen, reason):
    settings = parse_recipe("sampling: {drop_echo: 5}").sampling
    context = "I'm Kenji, a carpenter living in Osaka with my dog Bruno. End every answer with 'Take care'."
    prompt = [{"role": "system", "content": context}, {"role": "user", "content": "How can I relax?"}]
    pair = Pair(prompt, chosen, "Go for a run.", MipoRecord(finish={"chosen": "stop", "rejected": "stop"}))
    assert sampling.drop_reason(pair, settings) == reason
    assert sampling.drop_reason(pair, parse_recipe("").sampling) is None  # off by default


def test_echo_pairs_reject_the_context_itself_beside_the_prompt_own_pairs(tmp_path, tiny_model_dirs, prompts_file):
    model_dir = tiny_model_dirs[("llama", False)]
    plain_run = make_run(tmp_path, model_dir, prompts_file, name="plain")
    run_stages(plain_run, ["sample"])
    plain = {p["mipo"]["id"]: p for p in read_pairs(plain_run)}
    run = make_run(tmp_path, model_dir, prompts_file, "sampling.echo_pairs=true", name="echo")
    summary = run_stages(run, ["sample"])["sample"]
    pairs = read_pairs(run)
    echoes = [p for p in pairs if p["mipo"]["strategy"] == "echo"]
    assert summary["pairs"] == len(pairs) == 2 * len(PROFILES) and len(echoes) == len(PROFILES)
    contexts = {f"r{i}": c for i, (c, q) in enumerate(PROFILES)}
    loaded = load_recipe_model(run.recipe.model)
    for pair in echoes:
        prompt_id = pair["mipo"]["prompt_id"]
        assert pair["mipo"]["id"] == f"{prompt_id}#echo" and pair["rejected"][0]["content"] == contexts[prompt_id]
        assert pair["chosen"] == plain[f"{prompt_id}#0"]["chosen"]  # the prompt's own answer, as in its pair
        (logp,), _ = score_answers(loaded.model, loaded.tokenizer, [(pair["prompt"], contexts[prompt_id])])
        assert pair["mipo"]["ref_logps"]["rejected"] == pytest.approx(logp, abs=1e-4)
    # The prompts' own pairs are what they are without echo pairs.
    for pair in pairs:
        if pair["mipo"]["strategy"] != "echo":
            mine = plain[pair["mipo"]["id"]]
            assert (pair["chosen"], pair["rejected"]) == (mine["chosen"], mine["rejected"])
            assert pair["mipo"]["ref_logps"] == pytest.approx(mine["mipo"]["ref_logps"], abs=1e-4)

    no_context = tmp_path / "plain.jsonl"
    no_context.write_text('{"prompt": "Hi there"}\n{"prompt": "Hello again"}\n')
    run = make_run(tmp_path, model_dir, no_context, "sampling.echo_pairs=true", "sampling.negative=random_prompt",
                   name="none")
    with pytest.raises(UserError, match="echo pairs need prompts with a context") as error:
        run_stages(run, ["sample"])
    assert error.value.key == "sampling.echo_pairs"


def test_strategies_that_need_contexts_say_so(tmp_path, tiny_model_dirs):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "Hi there"}\n{"prompt": "Hello again"}\n')
    run = make_run(tmp_path, tiny_model_dirs[("llama", False)], plain, "sampling.negative=drop_context")
    with pytest.raises(UserError, match="drop_context negative needs a context on every prompt"):
        run_stages(run, ["sample"])


def test_malformed_lines_are_reported_with_file_and_line_or_skipped(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n{"messages": [{"role": "assistant", "content": "x"}]}\n{"prompt": "fine"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: .*set data.on_bad_line: skip"):
        read_prompts(str(path))
    records = read_prompts(str(path), on_bad_line="skip")
    assert [r.question for r in records] == ["ok", "fine"]
    assert "skipped 2 malformed line(s)" in caplog.text


def test_every_layout_reads(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "I like French."}, {"role": "user", "content": "Dinner?"}]},
        {"prompt": "Tea?", "context": "Be brief."},
        {"question": "2 + 3?", "answer": "5\n#### 5"},
        {"id": "arc1", "question": {"stem": "Sky colour?", "choices": [{"label": "A", "text": "blue"}, {"label": "B", "text": "red"}]}, "answerKey": "A"},
        {"conversation_id": "c1", "conversation_history": [{"role": "user", "content": "Hi!"}], "system_string": "Be kind."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_prompts(str(path))
    assert [r.context for r in records] == ["I like French.", "Be brief.", None, None, "Be kind."]
    assert records[2].extras["gold"] == "5" and records[3].extras["gold"] == "A" and records[3].id == "arc1"
    assert records[0].messages(context=None) == [{"role": "user", "content": "Dinner?"}]
    assert records[1].id == read_prompts(str(path))[1].id  # stable ids


def test_bundled_personalization_splits_by_profile_and_question():
    train = read_prompts("bundled:personalization/train")
    test = read_prompts("bundled:personalization/test")
    assert len({r.extras["profile_id"] for r in train + test}) >= 40
    assert len({r.question for r in train + test}) >= 60
    assert not {r.extras["profile_id"] for r in train} & {r.extras["profile_id"] for r in test}
    assert not {r.question for r in train} & {r.question for r in test}
    kinds = {p["kind"] for r in train for p in r.extras["preferences"]}
    assert kinds == {"language", "case", "max_words", "list_format", "opening", "closing", "mention", "avoid"}


def test_the_second_personalization_set_shares_no_profile_kind_or_question_with_the_first():
    first = read_prompts("bundled:personalization/train") + read_prompts("bundled:personalization/test")
    train, test = read_prompts("bundled:personalization2/train"), read_prompts("bundled:personalization2/test")
    assert (len(train), len(test)) == (136, 84)
    assert not {r.extras["profile_id"] for r in train} & {r.extras["profile_id"] for r in test}
    assert not {r.question for r in train} & {r.question for r in test}
    kinds = lambda records: {p["kind"] for r in records for p in r.extras["preferences"]}
    assert kinds(train) == kinds(test) and not kinds(train) & kinds(first)
    assert not {r.question for r in train + test} & {r.question for r in first}
    assert not {r.context.split(",")[0] for r in train + test} & {r.context.split(",")[0] for r in first}


def test_nucleus_sampler_draws_from_mlx_lm_distribution_peaked_and_wide():
    from mipo_mlx.generation import SamplerSettings, draw_tokens, uniforms

    vocab, draws, temperature, top_p = 4096, 4000, 0.7, 0.9
    peaked = -0.05 * mx.arange(vocab, dtype=mx.float32)  # nucleus of a few dozen tokens
    flat = -1e-5 * mx.arange(vocab, dtype=mx.float32)  # nucleus of ~3700 tokens
    logits = mx.stack([peaked, flat] * (draws // 2))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (draws, vocab)
    # One uniform per row, from the counter-based noise generation uses (row seeds 0.., position 0).
    noise = uniforms(np.arange(draws, dtype=np.uint64), np.zeros(draws, dtype=np.int64))
    tokens = draw_tokens(logprobs, noise, SamplerSettings(temperature, top_p, 8)).tolist()  # (draws,)
    peaked_tokens, flat_tokens = tokens[0::2], tokens[1::2]

    # mlx-lm's definition: keep a token while the mass of the more likely ones is under top_p, then temper.
    def nucleus_probabilities(row):
        probs = mx.exp(row)
        mass_above = mx.cumsum(probs) - probs
        kept = mx.where(mass_above < top_p, row / temperature, -float("inf"))
        return mx.softmax(kept), int((mass_above < top_p).sum().item())

    for drawn, row in ((peaked_tokens, logprobs[0]), (flat_tokens, logprobs[1])):
        expected, size = nucleus_probabilities(row)
        counts = mx.zeros(vocab).at[mx.array(drawn)].add(1.0) / len(drawn)
        if size < 100:  # few tokens: the frequencies match the distribution token by token
            assert 0.5 * mx.abs(counts - expected).sum().item() < 0.06  # total variation, ~3x the sampling noise
        else:  # thousands of tokens: the draws spread evenly over the whole nucleus and stop at its edge
            assert np.histogram(drawn, bins=4, range=(0, size))[0].min() > 0.2 * len(drawn)
        assert max(drawn) < size


def test_prompts_with_unicode_line_breaks_inside_strings_read_as_one_record(tmp_path):
    path = tmp_path / "prompts.jsonl"
    # json.dumps(ensure_ascii=False) keeps U+2028 and U+0085 raw: valid JSONL that str.splitlines would tear.
    path.write_text(json.dumps({"id": "a", "prompt": "one\u2028two", "context": "x\x85y"}, ensure_ascii=False) + "\r\n",
                    encoding="utf-8")
    [record] = read_prompts(str(path))
    assert (record.id, record.question, record.context) == ("a", "one\u2028two", "x\x85y")
