"""Seconds a mistake costs: the quickstart's preflight next to loading its model, in one fresh process.

    python bench/preflight.py [RECIPE]

Preflight (mipo_mlx/preflight.py) is what `mipo-mlx train` runs before anything else: it
imports what the checks need (not mlx-lm or transformers), then reads the recipe, every
data file to its last line and the model's files. Loading the model (mlx-lm and
transformers imported, then the weights) is what comes next in a run, the first thing a
mistake found later would have cost (goal: the whole preflight, imports included, under
5 s on a 2-core CPU).
"""

import argparse
import os
import tempfile
import time

started = time.perf_counter()
import mipo_mlx  # noqa: E402,F401  (before mlx: loads the fast BLAS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml")
    args = parser.parse_args()

    from mipo_mlx.pipeline import STAGES
    from mipo_mlx.preflight import preflight
    from mipo_mlx.recipe import load_recipe

    imported = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        recipe = load_recipe(args.recipe, [f"output_dir={runs}"])
        checked = preflight(recipe, resume=False, stages=list(STAGES))
    checked_at = time.perf_counter()

    from mipo_mlx.loading import load_recipe_model

    load_recipe_model(recipe.model)
    loaded_at = time.perf_counter()
    total = checked_at - started
    print(f"preflight of {args.recipe}: {total:.2f} s in all (imports {imported - started:.2f} s, reading the recipe, "
          f"{checked.train_prompts} + {checked.test_prompts or 0} prompts and the model's files "
          f"{checked_at - imported:.2f} s); loading the model next, imports included: {loaded_at - checked_at:.2f} s "
          f"(ratio {total / (loaded_at - checked_at):.2f}); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
