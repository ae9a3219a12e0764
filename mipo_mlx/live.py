"""Answer a new prompt with a run's model, before and after its adapter: the TUI's live compare.

    live = LiveAnswers(Path("runs/quickstart"))
    print(live.load())                       # loads the model once, attaches the newest adapter
    for text in live.stream(messages, "adapted"):
        ...                                  # the answer so far, growing

The base answer is the same model with the LoRA scale at zero (lora.adapter_disabled),
so only one copy of the weights is in memory. Sampling follows the run's recipe (its
`eval` keys and seed). Call it from one thread only, the worker that owns this object,
and `close()` it there.
"""

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx

from mipo_mlx.chat import encode_prompt
from mipo_mlx.generation import SamplerSettings, stream_answer
from mipo_mlx.loading import load_recipe_model
from mipo_mlx.lora import adapter_disabled, load_adapter
from mipo_mlx.rundir import latest_adapter, saved_recipe


class LiveAnswers:
    """The run's model, loaded once, answering with and without the run's adapter."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.loaded = None
        self.adapter: Path | None = None
        self.recipe = None

    def load(self) -> str:
        """Read the run's recipe, load the model and the newest adapter; say what was loaded."""
        # The TUI may run from another folder than the run did: the recipe's data paths are not checked.
        self.recipe = saved_recipe(self.run_dir, check_paths=False)
        self.loaded = load_recipe_model(self.recipe.model)
        self.adapter = latest_adapter(self.run_dir)
        model_path = self.recipe.model.path
        if self.adapter is None:
            return f"{model_path} loaded; no adapter yet, so only the base model answers"
        load_adapter(self.loaded.model, self.adapter)
        return f"{model_path} loaded with the adapter in {self.adapter.relative_to(self.run_dir)}"

    def close(self) -> None:
        """Free this thread's MLX streams; an MLX thread that ends without it aborts the exit."""
        mx.synchronize()
        mx.clear_streams()

    def stream(self, messages: list[dict], side: str) -> Iterator[str]:
        """The growing answer to `messages`, from the base model ("base") or the adapted one ("adapted")."""
        model, tokenizer, evaluation = self.loaded.model, self.loaded.tokenizer, self.recipe.eval
        settings = SamplerSettings(evaluation.temperature, evaluation.top_p, evaluation.max_tokens)
        pieces = stream_answer(model, tokenizer, encode_prompt(tokenizer, messages), settings, self.recipe.seed)
        # The base model is the adapter switched off (LoRA scale 0), when there is one to switch off.
        base = side == "base" and self.adapter is not None
        text = ""
        with adapter_disabled(model) if base else nullcontext():
            for piece in pieces:
                text += piece
                yield text
