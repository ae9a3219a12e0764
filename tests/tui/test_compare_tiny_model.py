"""The Compare view answering a typed prompt with the tiny test model, before and after an adapter.

    .venv/bin/python -m pytest tests/tui/test_compare_tiny_model.py -q

The run directory's recipe names a tiny mlx-lm model directory. The base pane must show
exactly what the plain model generates for the prompt; with a LoRA adapter whose B
matrices were moved away from zero, the adapted pane must show a different answer.
"""

import mlx.core as mx
from mlx.utils import tree_flatten
from textual.widgets import Static
from tiny_models import save_tiny_model
from tui_helpers import wait_for

from mipo_mlx.chat import encode_prompt
from mipo_mlx.generation import SamplerSettings, stream_answer
from mipo_mlx.loading import load_model
from mipo_mlx.lora import adapter_config, apply_lora, save_adapter
from mipo_mlx.recipe import Recipe, dump_recipe
from mipo_mlx_tui.app import MipoApp
from mipo_mlx_tui.messages import AnswerStreamed

PROMPT = "What is the capital of France?"
MAX_TOKENS = 12


def tiny_run(tmp_path) -> tuple:
    """A run directory on the tiny model, and the recipe it holds."""
    model_dir = save_tiny_model(tmp_path / "tiny", "llama")
    recipe = Recipe()
    recipe.model.path, recipe.model.compute = str(model_dir), "float32"
    recipe.eval.temperature, recipe.eval.max_tokens = 0.0, MAX_TOKENS
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    return run_dir, recipe


def plain_answer(recipe: Recipe) -> str:
    plain = load_model(recipe.model.path, compute="float32")
    prompt_ids = encode_prompt(plain.tokenizer, [{"role": "user", "content": PROMPT}])
    settings = SamplerSettings(temperature=0.0, top_p=recipe.eval.top_p, max_tokens=MAX_TOKENS)
    return "".join(stream_answer(plain.model, plain.tokenizer, prompt_ids, settings, recipe.seed))


async def answers_in_the_panes(run_dir) -> dict:
    """Type the prompt in the Compare view; the finished answer of each side, as shown."""
    app = MipoApp(run_dir.parent, run_dir=run_dir, poll_seconds=0.05)
    messages = []
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.press("3", "slash", *PROMPT, "enter")
        finished = lambda: {m.side: m.text for m in messages if isinstance(m, AnswerStreamed) and m.finished}
        await wait_for(pilot, lambda: len(finished()) == 2, timeout=120)
        shown = {side: str(app.screen.query_one(f"#{side}-answer", Static).render()) for side in ("base", "adapted")}
    assert shown == finished()
    return shown


async def test_without_an_adapter_the_base_model_answers_alone(tmp_path):
    run_dir, recipe = tiny_run(tmp_path)
    shown = await answers_in_the_panes(run_dir)
    assert shown["base"] == plain_answer(recipe) != ""
    assert shown["adapted"] == "(no adapter yet: train first)"


async def test_with_an_adapter_both_answers_stream_and_differ(tmp_path):
    run_dir, recipe = tiny_run(tmp_path)
    tuned = load_model(recipe.model.path, compute="float32")
    apply_lora(tuned.model, recipe.lora)
    mx.random.seed(1)
    lora_b = [(name, mx.random.normal(value.shape) * 0.5) for name, value in tree_flatten(tuned.model.trainable_parameters()) if "lora_b" in name]
    assert lora_b
    tuned.model.load_weights(lora_b, strict=False)
    save_adapter(tuned.model, run_dir / "adapters", adapter_config(tuned.model, recipe.lora, recipe.model.path))

    shown = await answers_in_the_panes(run_dir)
    assert shown["base"] == plain_answer(recipe)
    assert shown["adapted"] != shown["base"]
