"""Before/after evaluation: preference checkers, statistics, repetition loops, and the compare stage on the tiny model.

    .venv/bin/python -m pytest -q tests/test_compare.py
"""

import json

import numpy as np
import pytest

from mipo_mlx.compare import mutual_information, score
from mipo_mlx.report import write_outputs
from mipo_mlx.rundir import MipoRecord, Pair, reopen_run
from mipo_mlx.data import PromptRecord
from mipo_mlx.generation import Answer
from mipo_mlx.judge import judge_metrics, judge_rows
from mipo_mlx.loading import load_model
from mipo_mlx.lora import apply_lora
from mipo_mlx.metrics import (
    bootstrap_interval,
    echoed_words,
    paired_permutation_p,
    repetition_loop,
    self_bleu,
)
from mipo_mlx.model_card import before_after
from mipo_mlx.pipeline import run_stages
from mipo_mlx.preferences import check, check_all, detect_language
from mipo_mlx.recipe import LoraConfig


@pytest.mark.parametrize("preference, passing, failing", [
    ({"kind": "language", "value": "fr"}, "Bonjour, voici une idée pour le dîner.", "Hello, here is an idea for dinner."),
    ({"kind": "language", "value": "es"}, "Hola, ¿cómo estás? Te recomiendo una sopa.", "Bonjour, voici une soupe."),
    ({"kind": "language", "value": "de"}, "Ich empfehle dir eine Suppe mit Brot und ein Glas Wasser.", "I recommend a soup."),
    ({"kind": "case", "value": "lower"}, "go to bed early and skip the screen.", "Go to bed early."),
    ({"kind": "case", "value": "upper"}, "GO TO BED EARLY!", "GO TO BED early!"),
    ({"kind": "max_words", "value": 5}, "Walk by the sea.", "Walk by the sea every single morning."),
    ({"kind": "list_format", "value": "bullets"}, "Pack:\n- water\n- a map", "Pack:\n1. water\n2. a map"),
    ({"kind": "list_format", "value": "numbered"}, "1. water\n2. a map", "Water and a map."),
    ({"kind": "list_format", "value": "none"}, "Water and a map.", "- water\n- map"),
    ({"kind": "opening", "value": "Hello friend"}, "Hello friend! Try tea.", "Try tea. Hello friend"),
    ({"kind": "closing", "value": "Cheers!"}, "Try tea. Cheers!", "Cheers! Try tea."),
    ({"kind": "mention", "value": "Lisbon"}, "In Lisbon, try the tram.", "Try the tram."),
    ({"kind": "avoid", "value": ","}, "Start slow and rest well.", "Start slow, and rest well."),
    ({"kind": "avoid", "value": "coffee"}, "Try green tea.", "Try Coffee with milk."),
    ({"kind": "max_sentences", "value": 2}, "Drink water. Sleep well!", "Drink water. Sleep well. Walk."),
    ({"kind": "max_sentences", "value": 2}, "Pack light, e.g. one bag.", "Pack:\n- one bag\n- a map\n- water"),
    ({"kind": "emoji", "value": "any"}, "Enjoy the trip ✈️", "Enjoy the trip :)"),
    ({"kind": "bold", "value": "any"}, "Always **book early**.", "Always *book early*."),
    ({"kind": "no_exclamation", "value": "!"}, "Book early.", "Book early!"),
    ({"kind": "end_question", "value": "?"}, "Book early. Where are you going?", "Where to? Book early."),
    ({"kind": "end_question", "value": "?"}, "Book early. Ready to go?**", "Book early."),
    ({"kind": "greet_name", "value": "Iris"}, "Hi Iris, book early.", "Book early, Iris."),
    ({"kind": "greet_name", "value": "Iris"}, "Hello, Iris! Book early.", "Hi there, book early."),
    ({"kind": "quote", "value": '"'}, 'My tip: \u201cbook early\u201d.', 'A "word" alone.'),
    ({"kind": "signature_word", "value": "indeed"}, "Indeed, book early.", "Book early, indeedy."),
    ({"kind": "address_name", "value": "Aiko"}, "Well, Aiko, book early.", "Well, Aikos, book early."),
])
def test_every_checker_on_hand_written_answers(preference, passing, failing):
    assert check(preference, passing)
    assert not check(preference, failing)


def test_check_all_groups_by_kind_and_detects_languages():
    preferences = [{"kind": "language", "value": "fr"}, {"kind": "avoid", "value": ","}]
    assert check_all(preferences, "Bonjour voici une idée") == {"language": True, "avoid": True}
    assert detect_language("The cat is on the sofa and it is happy.") == "en"


def test_statistics_behave():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 400)
    low, high = bootstrap_interval(values, 1000, 0)
    assert low < 1.0 < high and high - low < 0.4
    before = rng.normal(0, 1, 60)
    assert paired_permutation_p(before, before + 1.0, 1000, 0) < 0.01
    assert paired_permutation_p(before, before + rng.normal(0, 0.01, 60), 1000, 0) > 0.05


def test_self_bleu_is_high_for_repeated_answers_and_low_for_varied_ones():
    same = ["the cat sat on the mat today"] * 4
    varied = ["the cat sat on the mat", "dogs bark loudly at night", "green tea helps me relax", "paris is lovely in spring"]
    assert self_bleu(same) > 0.9
    assert self_bleu(varied) < 0.2


@pytest.mark.parametrize("answer", [
    "Bonjour! Je suis à Paris. Je suis à Paris. Je suis à Paris. Je suis à Pa",  # cut by max_tokens mid-word
    "Cheri, amo, amo, amo, amo, amo, amo, amo, amo, amo, amo",
    "Açaiba! Açaiba! Açaiba! Açaiba! Açaiba! Açaiba! Açaiba!",
    "Puppies need a lot of love. Puppies need a lot of attention. " * 2 + "Puppies need a lot of love. Pupp",
    "Il cibo è buono. La cena è pronta, la cena è pronta, la cena è pronta, la cena è pronta, la cena è",
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "Try tea. Then rest. Try tea. Then rest. Try tea. Then rest. Try tea. Then rest. Try tea. Then rest. Okay.",
    "I like cats. I like cats. I like cats. I like cats. I like cats. I like cats.",
    "I like cats... I like cats... I like cats... I like cats... I like cats...",  # the ellipses left out, still a loop
    "| Day | Plan |\n|---|---|\n| Mon | I like cats. I like cats. I like cats. I like cats. I like cats. I like",
    "Here is your plan: walk every day, walk every day, walk every day, walk every day, walk every day, walk",
])
def test_repetition_loops_are_caught(answer):
    assert repetition_loop(answer)


@pytest.mark.parametrize("answer", [
    "Bonjour, voici une idée pour le dîner: une soupe à l'oignon avec du pain.",
    "No, no, no. Try green tea instead, it helps you sleep.",
    "Pack:\n- water\n- a map\n- a hat\n- sun cream\n- a snack",
    "1. Keep your desk clean.\n2. Use a broom.\n3. Use a vacuum cleaner.\n4. Use a broom.",
    "| day | plan | time |\n| --- | --- | --- |\n| Monday | walk | 7 pm |",
    "Take care, take care!",
    "",
])
def test_ordinary_answers_are_not_loops(answer):
    assert not repetition_loop(answer)


WIDE_HEADER = "| " + " | ".join(f"week {i}" for i in range(1, 13)) + " |\n"


@pytest.mark.parametrize("answer", [
    WIDE_HEADER + "|---" * 12 + "|",  # a table cut after its separator row
    WIDE_HEADER + "| --- " * 12 + "|\n| " + " | ".join(str(i) for i in range(12)) + " |",
    WIDE_HEADER + "|:---:" * 12 + "|",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    "Shopping list\n" + "-" * 60 + "\nBread, milk and eggs.",
    "Shopping list\n" + "-----" * 12,
    "Results\n" + "=" * 40,
    "Chapter one " + "." * 40 + " 5\nChapter two " + "." * 40 + " 9",  # dot leaders
    "| Day | " + " | ".join(["✓"] * 12) + " |",  # marks alone in table cells
    "**Plan**\n\n---\n\n**Monday**: walk.\n\n---\n\n**Tuesday**: swim.\n\n---\n\n**Wednesday**: rest.\n\n---",
])
def test_table_separators_rules_and_leaders_are_not_loops(answer):
    assert not repetition_loop(answer)


def test_a_loop_in_the_right_language_passes_the_language_check_and_shows_as_a_loop():
    records = [PromptRecord(f"p{i}", "What can I cook?", "Answer in Italian.",
                            extras={"preferences": [{"kind": "language", "value": "it"}]}) for i in range(2)]
    base = [Answer("You could cook pasta with tomatoes.", [1] * 7, "stop")] * 2
    loop = "Il cibo è un cibo, il cibo è un cibo, il cibo è un cibo, il cibo è un cibo, il"
    adapted = [Answer(loop, [1] * 24, "length")] * 2
    _, metrics = score(records, {"base": base, "adapted": adapted}, samples=100, seed=0)
    assert (metrics["adherence/language"]["before"], metrics["adherence/language"]["after"]) == (0.0, 1.0)
    assert (metrics["repetition_loop"]["before"], metrics["repetition_loop"]["after"]) == (0.0, 1.0)


PROFILE = "I'm Kenji, a carpenter living in Osaka with my dog Bruno. End every answer with 'Take care'."


@pytest.mark.parametrize("answer, words", [
    ("Hi Kenji, try a walk by the river in Osaka. Take care", 2),  # a name, a city, the closing asked for
    ("I'm Kenji, a carpenter living in Osaka. End every answer with 'Take care'.", 8),
    ("As a Carpenter living in OSAKA, you could build a shelf.", 5),  # case and punctuation do not matter
    ("", 0),
])
def test_echoed_words_is_the_longest_run_of_the_context_the_answer_repeats(answer, words):
    assert echoed_words(answer, PROFILE) == words


def test_answers_that_copy_their_context_count_as_echo_and_pass_a_mention_check():
    mention = {"preferences": [{"kind": "mention", "value": "Osaka"}]}
    records = [PromptRecord(f"p{i}", "How can I relax after work?", PROFILE, extras=mention) for i in range(2)]
    records.append(PromptRecord("plain", "How can I relax after work?"))  # no context: nothing to echo
    base = [Answer("Take a walk and read a book.", [1] * 7, "stop")] * 3
    adapted = [Answer("I'm Kenji, a carpenter living in Osaka with my dog Bruno.", [1] * 12, "stop")] * 3
    rows, metrics = score(records, {"base": base, "adapted": adapted}, samples=100, seed=0)
    assert [r.get("echo") for r in rows] == [{"base": False, "adapted": True}] * 2 + [None]
    assert metrics["context_echo"]["n"] == 2
    assert (metrics["context_echo"]["before"], metrics["context_echo"]["after"]) == (0.0, 1.0)
    assert (metrics["adherence/mention"]["before"], metrics["adherence/mention"]["after"]) == (0.0, 1.0)
    _, plain = score(records[2:], {"base": base[:1], "adapted": adapted[:1]}, samples=100, seed=0)
    assert "context_echo" not in plain


def strict_json(text: str):
    """json.loads refusing NaN and Infinity, as strict JSON readers do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_undefined_metrics_are_null_in_metrics_json_and_n_a_in_the_report(tmp_path):
    # One prompt (Self-BLEU needs two answers) and a judge that never gives a score (no prompt scored on both sides).
    records = [PromptRecord("p0", "What can I cook?", "Answer in Italian.")]
    rows, metrics = score(records, {"base": [Answer("Pasta.", [1], "stop")], "adapted": [Answer("Pasta!", [1], "stop")]},
                          samples=100, seed=0)
    judge_rows(lambda conversations: ["I cannot tell."] * len(conversations), records, rows)
    metrics.update(judge_metrics(rows, samples=100, seed=0))
    write_outputs(tmp_path / "compare", rows, metrics, {"model": "tiny"})
    written = strict_json((tmp_path / "compare" / "metrics.json").read_text())
    assert written["self_bleu"] == {"n": 1, "before": None, "after": None}
    assert written["judge/score"] == {"n": 0, "before": None, "before_ci": [None, None], "after": None,
                                      "after_ci": [None, None], "difference_ci": [None, None], "p_value": None}
    assert written["judge/win_rate/adapted_vs_base"]["value"] is None
    assert written["answer_tokens"]["before"] == 1  # defined values stay as they were
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "| self_bleu | 1 | n/a | n/a | n/a | |" in report
    assert "| judge/score | 0 | n/a | n/a | n/a | n/a |" in report
    assert "| adapted_vs_base | 0 | n/a | n/a | n/a | n/a |" in report
    # The model card reads metrics.json back, nulls included.
    assert "| judge/score | 0 | n/a | n/a | n/a | n/a |" in before_after(tmp_path)


def test_mutual_information_on_held_out_pairs_before_and_after(tiny_model_dirs):
    from test_lora import move_adapter

    loaded = load_model(str(tiny_model_dirs[("llama", False)]))
    move_adapter(apply_lora(loaded.model, LoraConfig(rank=4)))
    examples = [("What should I cook?", "I live in Paris.", "Une soupe."), ("How do I relax?", "I love the sea.", "Walk.")]
    # drop_context pairs: the negative prompt is the question without the user's context.
    pairs = [Pair([{"role": "system", "content": context}, {"role": "user", "content": question}],
                  [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": "Chess."}],
                  MipoRecord(negative_prompt=[{"role": "user", "content": question}]))
             for question, context, chosen in examples]
    metrics = mutual_information(loaded.model, loaded.tokenizer, pairs, beta=0.1, samples=100, seed=0)
    assert metrics["mutual_information/pmi"]["n"] == 2 and metrics["mutual_information/pmi"]["before"] != 0
    assert metrics["rewards/margins"]["before"] == 0 and metrics["rewards/margins"]["after"] != 0


def test_compare_stage_writes_answers_metrics_and_report(tmp_path, tiny_model_dirs):
    from test_trainer import train_run

    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"id": f"t{i}", "prompt": q, "context": "Please always answer me in French.",
                                             "preferences": [{"kind": "language", "value": "fr"}]}) + "\n"
                                 for i, q in enumerate(["What can I cook?", "How do I relax?", "Any weekend idea?"]))
                         + "{not json\n")  # skipped, as data.on_bad_line says
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "cmp", "training.batch_size=2", "training.max_steps=2",
                    f"data.test={test_file}", "data.on_bad_line=skip", "eval.max_tokens=8", "eval.bootstrap_samples=100",
                    f"eval.judge_model={tiny_model_dirs[('llama', False)]}")  # the run's own model, adapter off
    run_stages(run, ["train", "compare"])
    rows = [json.loads(line) for line in (run.dir / "compare" / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t0", "t1", "t2"]
    assert all(set(r["checks"]) == {"base", "adapted"} and "language" in r["checks"]["base"] for r in rows)
    metrics = strict_json((run.dir / "compare" / "metrics.json").read_text())
    assert metrics["adherence/language"]["n"] == 3
    assert {"before_ci", "after_ci", "p_value"} <= set(metrics["answer_tokens"])
    assert metrics["repetition_loop"]["n"] == 3 and all(set(r["loop"]) == {"base", "adapted"} for r in rows)
    assert metrics["judge/replies_without_score"]["n"] == 3  # one stated preference (the context) per prompt
    assert all(r["judge"]["preferences"] == ["Please always answer me in French."] for r in rows)
    report = (run.dir / "compare" / "report.md").read_text()
    assert "| adherence/overall | 3 |" in report and "| repetition_loop | 3 |" in report and "**judge**" in report and "temperature 0.1" in report and "## Examples" in report


def test_compare_after_training_answers_with_the_selected_adapter_as_a_later_compare_does(tmp_path, tiny_model_dirs):
    from test_trainer import train_run

    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"id": f"t{i}", "prompt": q}) + "\n"
                                 for i, q in enumerate(["What can I cook?", "How do I relax?", "Any weekend idea?"])))
    run = train_run(tmp_path, tiny_model_dirs[("llama", False)], "sel", "training.epochs=20", "training.batch_size=2",
                    "training.eval_fraction=0.3", "training.eval_every=1", "training.learning_rate=2e-2",
                    "training.probe_prompts=0", "training.select_checkpoint=eval_loss",
                    "training.early_stopping_patience=2", f"data.test={test_file}", "eval.max_tokens=16",
                    "eval.bootstrap_samples=100")
    summary = run_stages(run, ["train", "compare"])["train"]
    assert summary["selected"]["step"] < summary["steps"]  # training went on past the adapter it selected
    answers = run.dir / "compare" / "answers.jsonl"
    after_training = answers.read_bytes()
    answers.unlink()
    run_stages(reopen_run(run.dir), ["compare"])  # `mipo-mlx compare RUN_DIR`: adapters/ on a freshly loaded model
    assert answers.read_bytes() == after_training
