"""Answer a new prompt with a run's model, before and after its adapter (no Textual here).

    live = LiveAnswers(Path("runs/quickstart"))
    print(live.load())                       # loads the model once, attaches the adapter
    for text in live.stream(messages, "adapted"):
        ...                                  # the answer so far, growing

The base answer is the same model with the LoRA scale at zero (lora.adapter_disabled),
so only one copy of the weights is in memory. Sampling follows the recipe's eval keys.
Call it from one thread only, the worker that owns this object, and `close()` it there.
"""

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import yaml

from mipo_mlx.pipeline import RECIPE_FILE
from mipo_mlx.recipe import EvalConfig, ModelConfig

ADAPTER_FILE = "adapters.safetensors"


def latest_adapter(run_dir: Path) -> Path | None:
    """The final adapter, or else the newest checkpoint of a run still training."""
    final = run_dir / "adapters"
    if (final / ADAPTER_FILE).is_file():
        return final
    checkpoints = sorted((run_dir / "checkpoints").glob(f"step-*/{ADAPTER_FILE}"))
    return checkpoints[-1].parent if checkpoints else None


class LiveAnswers:
    """The run's model, loaded once, answering with and without the run's adapter."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.loaded = None
        self.adapter: Path | None = None
        self.settings: dict = {}
        self.seed = 0

    def load(self) -> str:
        """Read the run's recipe, load the model and the newest adapter; say what was loaded."""
        # MLX and the model code load here, on the worker, so the TUI opens at once.
        from mipo_mlx.loading import load_model

        raw = yaml.safe_load((self.run_dir / RECIPE_FILE).read_text(encoding="utf-8")) or {}
        model, evaluation = raw.get("model") or {}, raw.get("eval") or {}
        defaults_model, defaults_eval = ModelConfig(), EvalConfig()
        model_path = model.get("path", defaults_model.path)
        self.settings = {key: evaluation.get(key, getattr(defaults_eval, key)) for key in ("temperature", "top_p", "max_tokens")}
        self.seed = raw.get("seed", 0)
        self.loaded = load_model(
            model_path,
            compute=model.get("compute", defaults_model.compute),
            revision=model.get("revision", defaults_model.revision),
        )
        self.adapter = latest_adapter(self.run_dir)
        if self.adapter is None:
            return f"{model_path} loaded; no adapter yet, so only the base model answers"
        from mipo_mlx.lora import load_adapter

        load_adapter(self.loaded.model, self.adapter)
        return f"{model_path} loaded with the adapter in {self.adapter.relative_to(self.run_dir)}"

    def close(self) -> None:
        """Free this thread's MLX streams; an MLX thread that ends without it aborts the exit."""
        import mlx.core as mx

        mx.synchronize()
        mx.clear_streams()

    def _base_model(self):
        """The adapter switched off (LoRA scale 0), or nothing to switch off."""
        if self.adapter is None:
            return nullcontext()
        from mipo_mlx.lora import adapter_disabled

        return adapter_disabled(self.loaded.model)

    def stream(self, messages: list[dict], side: str) -> Iterator[str]:
        """The growing answer to `messages`, from the base model or the adapted one."""
        from mipo_mlx.chat import encode_prompt
        from mipo_mlx.generation import SamplerSettings, stream_answer

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        settings = SamplerSettings(**self.settings)
        prompt_ids = encode_prompt(tokenizer, messages)
        pieces = stream_answer(model, tokenizer, prompt_ids, settings, self.seed)
        text = ""
        with self._base_model() if side == "base" else nullcontext():
            for piece in pieces:
                text += piece
                yield text
