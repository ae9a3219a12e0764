"""Recipes: every broken recipe in tests/recipes/broken gets one clear line and exit status 2.

Each broken file says in its first line (`# expect: ...`) the message a user must see.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mipo_mlx.cli import COMMANDS, build_parser
from mipo_mlx.errors import UserError
from mipo_mlx.rundir import open_run
from mipo_mlx.recipe import Recipe, dump_recipe, load_recipe, parse_recipe, recipe_reference

ROOT = Path(__file__).resolve().parents[1]
BROKEN = sorted((ROOT / "tests" / "recipes" / "broken").glob("*.yaml"))


def mipo_mlx(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "mipo_mlx.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def expected_message(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must say what it expects"
    return first.removeprefix("# expect: ")


def test_there_are_at_least_twenty_broken_recipes():
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_recipe_is_one_line_and_exit_2(path):
    relative = path.relative_to(ROOT)
    result = mipo_mlx("train", str(relative))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mipo-mlx: error: {relative}: ")
    assert expected_message(path) in lines[0]
    assert "Traceback" not in result.stderr


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
    with pytest.raises(UserError, match=r"training\.bta: unknown key; did you mean 'beta'\?"):
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
