"""LoRA adapters on mlx-lm models: attach, switch off, save and load in mlx-lm's format.

    apply_lora(model, recipe.lora)                 # mlx-lm LoRALinear on the chosen layers
    with adapter_disabled(model): ...              # the base model, from the same weights
    save_adapter(model, run_dir / "adapters", recipe.lora, base_model="smollm2-135m")
    mlx_lm.load(base, adapter_path=run_dir / "adapters")

`scale` is mlx-lm's: the update is `scale * (x @ lora_a) @ lora_b`, not divided by the
rank. PEFT's `lora_alpha / r` plays the same role, so PEFT's lora_alpha = scale * rank.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def num_lora_layers(model: nn.Module, requested: int) -> int:
    return len(model.model.layers) if requested == -1 else min(requested, len(model.model.layers))


def adapter_config(model: nn.Module, lora, base_model: str, **provenance) -> dict:
    """mlx-lm's adapter_config.json (what load_adapters reads), plus where it came from."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_lora_layers(model, lora.num_layers),
        "lora_parameters": {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": list(lora.keys)},
        "model": base_model,
        "mipo": provenance,
    }


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Freeze the base and wrap the recipe's modules in mlx-lm LoRA layers (lora_b starts at zero)."""
    model.freeze()
    parameters = {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": list(lora.keys)}
    linear_to_lora_layers(model, num_lora_layers(model, lora.num_layers), parameters)
    if not lora_layers(model):
        raise ValueError(f"no module matched lora.keys {list(lora.keys)}")
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
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


def write_atomically(directory: Path, files: dict) -> None:
    """Write {name: callable(path)} into `directory` as one unit: all new files or the old ones."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, write in files.items():
            write(staging / name)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def adapter_files(model: nn.Module, config: dict) -> dict:
    weights = dict(tree_flatten(model.trainable_parameters()))
    return {
        ADAPTER_WEIGHTS: lambda path: mx.save_safetensors(str(path), weights),
        ADAPTER_CONFIG: lambda path: path.write_text(json.dumps(config, indent=2)),
    }


def save_adapter(model: nn.Module, directory: str | Path, config: dict) -> Path:
    write_atomically(Path(directory), adapter_files(model, config))
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap `model` with the adapter saved in `directory` (mlx-lm's loader)."""
    return load_adapters(model, str(directory))
