"""LoRA adapters on mlx-lm models: attach, switch off, save and load in mlx-lm's format.

    apply_lora(model, recipe.lora)                 # mlx-lm LoRALinear on the chosen layers
    with adapter_disabled(model): ...              # the base model, from the same weights
    config = adapter_config(model, recipe.lora, "smollm2-135m", seed=0)
    save_adapter(model, run_dir / "adapters", config)
    use_adapter(model, run_dir / "adapters")        # that adapter on, whether the model has LoRA layers yet or not
                                                   # (on several ranks: rank 0's, on every rank)
    mlx_lm.load(base, adapter_path=run_dir / "adapters")

The base may be quantized (QLoRA: mlx-lm wraps QuantizedLinear the same way) or float;
only lora_a and lora_b are trainable. lora_b starts at zero, so a fresh adapter is the
base model exactly, which the trainer's first-step check relies on.

`scale` is mlx-lm's: the update is `scale * (x @ lora_a) @ lora_b`, not divided by the
rank. PEFT computes `(lora_alpha / r) * (x @ A.T) @ B.T`, so the same adapter in PEFT
has lora_alpha = scale * rank (mlx-lm's scale 20 at rank 8 is PEFT's lora_alpha 160).
"""

import contextlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from mipo_mlx import distributed
from mipo_mlx.errors import UserError
from mipo_mlx.files import atomic_folder
from mipo_mlx.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def num_lora_layers(model: nn.Module, requested: int) -> int:
    """How many of the last layers get LoRA (-1: all of them)."""
    return len(model.model.layers) if requested == -1 else min(requested, len(model.model.layers))


def lora_parameters(lora) -> dict:
    """The recipe's LoRA settings as mlx-lm names them (linear_to_lora_layers, adapter_config.json)."""
    return {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": list(lora.keys)}


def adapter_config(model: nn.Module, lora, base_model: str, **provenance) -> dict:
    """mlx-lm's adapter_config.json (what load_adapters reads), plus where it came from."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_lora_layers(model, lora.num_layers),
        "lora_parameters": lora_parameters(lora),
        "model": base_model,
        "mipo": provenance,
    }


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Freeze the base and wrap the recipe's modules in mlx-lm LoRA layers (lora_b starts at zero).

    The model comes back in eval mode (no dropout), like a loaded one; training calls model.train().
    """
    model.freeze()
    linear_to_lora_layers(model, num_lora_layers(model, lora.num_layers), lora_parameters(lora))
    if not lora_layers(model):
        raise UserError(f"no linear layer matched {list(lora.keys)}; use module paths inside a layer such as "
                        "self_attn.q_proj or mlp.down_proj", key="lora.keys")
    return model.eval()


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """The model's LoRA layers (none before apply_lora or load_adapter)."""
    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Run the base model: every LoRA scale is 0 inside the block, restored after."""
    layers = lora_layers(model)
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def write_adapter(directory: Path, model: nn.Module, config: dict) -> None:
    """The adapter's two files (adapters.safetensors, adapter_config.json) into an existing `directory`."""
    mx.save_safetensors(str(directory / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def save_adapter(model: nn.Module, directory: str | Path, config: dict) -> Path:
    """adapters.safetensors + adapter_config.json (from adapter_config) in `directory`, atomically."""
    with atomic_folder(directory, replace=True) as staging:
        write_adapter(staging, model, config)
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap `model` with the adapter saved in `directory` (mlx-lm's loader), in eval mode."""
    try:
        return load_adapters(model, str(directory)).eval()
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot load this adapter for this model: {error}", file=str(directory)) from None


def use_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """`model` with the adapter saved in `directory` on, in eval mode: its weights into the LoRA layers the model has
    (another adapter's, or those training left at a later step than the one saved), else new layers (load_adapter).

    On several ranks (distributed.py) the adapter is rank 0's: the other ranks get its layers' settings and its
    weights from rank 0, bit for bit, and never read `directory` (it may be on rank 0's machine alone).
    """
    settings = distributed.from_main(lambda: read_adapter(model, Path(directory)))
    if settings is not None and not distributed.is_main():
        model.freeze()
        linear_to_lora_layers(model, settings["num_layers"], settings["lora_parameters"])
    weights = distributed.arrays_from_main(dict(tree_flatten(model.trainable_parameters())))
    if not distributed.is_main():
        model.load_weights(list(weights.items()), strict=False)
    return model.eval()


def read_adapter(model: nn.Module, directory: Path) -> dict | None:
    """The adapter in `directory` into the model's LoRA layers; into new ones if it has none, then their settings."""
    if lora_layers(model):
        model.load_weights(str(directory / ADAPTER_WEIGHTS), strict=False)
        return None
    model.freeze()  # only lora_a and lora_b trainable, as after apply_lora: mlx-lm's loader freezes nothing
    load_adapter(model, directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return {"num_layers": config["num_layers"], "lora_parameters": config["lora_parameters"]}
