"""Recipes: the shipped ones are valid, --set and the resolved recipe behave, YAML is read strictly.

Broken recipes and flags, run through the CLI, are cases of tests/broken_inputs (tests/test_broken_inputs.py).
"""

import argparse
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from mipo_mlx.cli import COMMANDS, build_parser
from mipo_mlx.errors import UserError
from mipo_mlx.recipe import Recipe, dump_recipe, load_recipe, parse_recipe, recipe_reference
from mipo_mlx.rundir import open_run

ROOT = Path(__file__).resolve().parents[1]


def mipo_mlx(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "mipo_mlx.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def integer_keys(cls=Recipe, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from integer_keys(tp, f"{f.name}.")
        elif int in (tp, *typing.get_args(tp)):
            yield f"{prefix}{f.name}", f.metadata


def test_every_integer_key_has_an_upper_bound_its_help_explains():
    keys = dict(integer_keys())
    assert len(keys) >= 15
    for key, meta in keys.items():
        assert "max" in meta, key
        assert str(meta["max"]) in meta["help"] or key == "eval.math_shots", key  # the help says the bound and why


def test_a_key_given_twice_is_an_error_but_yaml_merge_keys_still_work():
    with pytest.raises(UserError, match=r"^r.yaml: training.beta: given twice, on lines 2 and 4; YAML would keep only"):
        parse_recipe("training:\n  beta: 0.1\n  epochs: 2\n  beta: 0.2\n", "r.yaml")
    # The same name in two different sections is two keys, and `<<:` merges may be overridden.
    recipe = parse_recipe("sampling: &s {temperature: 0.5, max_tokens: 9}\neval:\n  <<: *s\n  temperature: 0.2\n",
                          "r.yaml")
    assert (recipe.sampling.temperature, recipe.eval.temperature, recipe.eval.max_tokens) == (0.5, 0.2, 9)


def test_numbers_are_finite_and_integers_of_any_length_are_one_line():
    for text, message in [
        ("training: {beta: .inf}", "training.beta: expected a finite number, got inf"),
        ("training: {beta: 1" + "0" * 400 + "}", "training.beta: an integer of 401 digits, beyond the range"),
        ("seed: 1" + "0" * 20, "seed: expected a value at most 4294967295, got 1000000000"),
        ("lora: {rank: 1" + "0" * 30 + "}", "lora.rank: expected a value at most 4096"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            parse_recipe(text, "r.yaml")


def test_set_mistakes_name_the_flag_not_the_recipe_file():
    for override, message in [
        ("training.beta=0", "--set training.beta=0: expected a value greater than 0.0, got 0.0"),
        ("lora.num_layers=0", "--set lora.num_layers=0: must be -1 (all layers) or a positive count, not 0"),
        ("export.formats=[mlx, onnx]", "--set export.formats=[mlx, onnx]: expected one of 'mlx', 'peft'"),
        ("data.train=nope.jsonl", "--set data.train=nope.jsonl: file not found: nope.jsonl"),
        ("run_name.x=1", "--set run_name.x=1: run_name is a key, not a section"),
    ]:
        with pytest.raises(UserError, match="^" + re.escape(message)):
            parse_recipe("training: {beta: 0.1}", "r.yaml", [override])
    # A mistake the flag did not make is still the recipe file's.
    with pytest.raises(UserError, match=r"^r.yaml: training.epochs: expected an integer"):
        parse_recipe("training: {epochs: two}", "r.yaml", ["training.beta=0.2"])


def test_infonce_refuses_the_options_of_a_pairwise_margin():
    for key, value in [("label_smoothing", "0.1"), ("dpop_lambda", "0.5"), ("ld_alpha", "0.0")]:
        message = f"r.yaml: training.{key}: applies to the pairwise losses, not to training.loss: infonce"
        with pytest.raises(UserError, match="^" + re.escape(message)) as error:
            parse_recipe(f"training: {{loss: infonce, {key}: {value}}}", "r.yaml", [])
        assert error.value.key == f"training.{key}"
    assert parse_recipe("training: {loss: infonce, nll_weight: 0.3}", "r.yaml", []).training.loss == "infonce"


def test_shipped_recipes_are_valid():
    quickstart = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    personalize = load_recipe(ROOT / "recipes" / "personalize.yaml")
    assert quickstart.model.path == "smollm2-135m"
    assert personalize.model.path == "mlx-community/Qwen2.5-1.5B-Instruct-4bit"
    # The paper's personalization settings (MIPO.md).
    assert personalize.sampling.negative == "drop_context"
    assert (personalize.sampling.temperature, personalize.sampling.top_p) == (0.1, 0.9)
    assert (personalize.training.beta, personalize.training.loss) == (0.1, "sigmoid")
    assert personalize.training.adam_betas == [0.9, 0.95]
    assert quickstart.run_name == "quickstart"


def test_set_overrides_any_key_with_yaml_types():
    recipe = parse_recipe("training: {beta: 0.1}", "r.yaml", ["training.beta=0.2", "lora.keys=[mlp.up_proj]", "seed=7"])
    assert recipe.training.beta == 0.2
    assert recipe.lora.keys == ["mlp.up_proj"]
    assert recipe.seed == 7


def test_set_of_an_unknown_key_names_the_nearest():
    with pytest.raises(UserError, match=r"^--set training.bta=0.2: training\.bta: unknown key; did you mean 'beta'\?"):
        parse_recipe("", "r.yaml", ["training.bta=0.2"])


def test_set_without_equals_is_one_line_error(tmp_path):
    result = mipo_mlx("train", "recipes/quickstart.yaml", "--set", "training.beta")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mipo-mlx: error: --set: expected KEY=VALUE such as training.beta=0.2, got 'training.beta'"
    )


def test_missing_recipe_file_and_unknown_flag_are_one_line_errors():
    missing = mipo_mlx("train", "recipes/nope.yaml")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "mipo-mlx: error: recipes/nope.yaml: recipe not found; give a YAML file such as recipes/quickstart.yaml"
    ]
    flag = mipo_mlx("train", "recipes/quickstart.yaml", "--bogus")
    assert flag.returncode == 2
    assert len(flag.stderr.strip().splitlines()) == 1
    assert "--bogus" in flag.stderr


def test_resolved_recipe_round_trips_with_every_key():
    recipe = parse_recipe("training: {beta: 0.3}\nsampling: {negative: random_prompt}", "r.yaml")
    written = yaml.safe_load(dump_recipe(recipe))
    assert written["training"]["beta"] == 0.3
    assert set(written) == {f for f in Recipe.__dataclass_fields__}
    assert parse_recipe(dump_recipe(recipe), "again.yaml") == recipe


def test_reference_lists_every_key():
    reference = recipe_reference()
    for key in ("`training.beta`", "`sampling.negative`", "`lora.scale`", "`seed`", "`export.repo_id`"):
        assert key in reference


def test_run_directory_keeps_the_resolved_recipe_and_is_never_overwritten(tmp_path):
    recipe = parse_recipe(f"output_dir: {tmp_path}\nrun_name: r1\ntraining: {{beta: 0.25}}", "r.yaml")
    run = open_run(recipe, resume=False)
    saved = (run.dir / "recipe.yaml").read_text()
    assert yaml.safe_load(saved)["training"]["beta"] == 0.25
    (run.dir / "pairs.jsonl").write_text('{"kept": true}\n')

    with pytest.raises(UserError, match="already holds a run; add --resume"):
        open_run(recipe, resume=False)
    changed = parse_recipe(f"output_dir: {tmp_path}\nrun_name: r1\ntraining: {{beta: 0.5}}", "r.yaml")
    with pytest.raises(UserError, match="training.beta is 0.5 but the run was started with 0.25"):
        open_run(changed, resume=True)
    assert (run.dir / "recipe.yaml").read_text() == saved
    assert (run.dir / "pairs.jsonl").read_text() == '{"kept": true}\n'
    assert open_run(recipe, resume=True).resumed


def test_readme_recipe_reference_is_current():
    assert recipe_reference() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_commands_table_has_every_command_with_flags_it_takes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Commands\n", 1)[1].strip().split("\n\n", 1)[0]
    usages = [re.split(r"(?<!\\)\|", line)[1].strip() for line in table.splitlines()[2:]]
    rows = {usage.split()[1]: usage for usage in usages}
    assert sorted(rows) == sorted(COMMANDS)
    for name, usage in rows.items():
        subcommands = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        flags = {option for action in subcommands.choices[name]._actions for option in action.option_strings}
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage)) <= flags, name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "./scripts/install.sh --test && .venv/bin/python -m pytest -q"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
