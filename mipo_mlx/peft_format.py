"""An mlx-lm LoRA adapter as a PEFT adapter that `PeftModel.from_pretrained` loads.

    weights, config = peft_adapter(mx.load("adapters.safetensors"), mlx_config,
                                   base_model="HuggingFaceTB/SmolLM2-135M-Instruct", num_hidden_layers=30)
    write_peft_adapter(out_dir, weights, config)   # adapter_model.safetensors + adapter_config.json

The two formats compute the same update with different layouts:

    mlx-lm: y += scale * (x @ lora_a) @ lora_b     lora_a (in, r), lora_b (r, out)
    PEFT:   y += (lora_alpha / r) * B(A(x))        lora_A.weight (r, in), lora_B.weight (out, r)

so lora_A = lora_a.T, lora_B = lora_b.T and lora_alpha = scale * r. Module names gain
PEFT's `base_model.model.` prefix: `model.layers.3.self_attn.q_proj.lora_a` becomes
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
"""

import json
import re
from pathlib import Path

import mlx.core as mx

from mipo_mlx.errors import UserError
from mipo_mlx.rundir import ADAPTER_CONFIG, ADAPTERS_DIR

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"  # PEFT's name, which happens to be mlx-lm's too
PEFT_PREFIX = "base_model.model."
# mlx-lm parameter suffix -> PEFT parameter suffix.
MLX_TO_PEFT_SUFFIX = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def adapted_modules(weights: dict) -> list[str]:
    """Module paths that carry a LoRA pair, e.g. `model.layers.0.self_attn.q_proj`."""
    modules = sorted({name.rpartition(".")[0] for name in weights})
    for module in modules:
        missing = [s for s in MLX_TO_PEFT_SUFFIX if f"{module}.{s}" not in weights]
        if missing:
            raise UserError(f"{module} has no {missing[0]}: not an mlx-lm LoRA adapter", key=ADAPTERS_DIR)
    extra = sorted(set(weights) - {f"{m}.{s}" for m in modules for s in MLX_TO_PEFT_SUFFIX})
    if extra:
        raise UserError(f"tensor {extra[0]} is not a LoRA weight; only LoRA adapters map to PEFT", key=ADAPTERS_DIR)
    return modules


def target_modules(modules: list[str], num_hidden_layers: int) -> dict:
    """PEFT's target_modules, plus layers_to_transform when only some layers are adapted."""
    in_layer = {}
    for module in modules:
        match = LAYER_MODULE.match(module)
        if not match:
            # A module outside the blocks (lm_head): PEFT matches exact full names too.
            return {"target_modules": modules}
        in_layer.setdefault(match.group(2), set()).add(int(match.group(1)))
    layer_sets = {frozenset(layers) for layers in in_layer.values()}
    if len(layer_sets) != 1:
        return {"target_modules": modules}
    (layers,) = layer_sets
    # PEFT matches a listed name against the end of each module path.
    leaves = {path.rpartition(".")[2] for path in in_layer}
    names = sorted(leaves) if len(leaves) == len(in_layer) else sorted(in_layer)
    if layers == set(range(num_hidden_layers)):
        return {"target_modules": names}
    return {"target_modules": names, "layers_to_transform": sorted(layers), "layers_pattern": "layers"}


def peft_adapter(weights: dict, mlx_config: dict, base_model: str, num_hidden_layers: int) -> tuple[dict, dict]:
    """PEFT tensors and adapter_config.json for an mlx-lm adapter (its tensors and its config)."""
    kind = mlx_config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise UserError(f"fine_tune_type is {kind!r}; only 'lora' adapters map to PEFT", key=ADAPTER_CONFIG)
    parameters = mlx_config["lora_parameters"]
    rank, scale = int(parameters["rank"]), float(parameters["scale"])
    modules = adapted_modules(weights)
    tensors = {}
    for module in modules:
        lora_a, lora_b = weights[f"{module}.lora_a"], weights[f"{module}.lora_b"]  # (in, r), (r, out)
        if lora_a.shape[1] != rank or lora_b.shape[0] != rank:
            raise UserError(f"{module} has rank {lora_a.shape[1]}, the config says {rank}", key=ADAPTER_CONFIG)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = mx.contiguous(lora_a.T)  # (r, in)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = mx.contiguous(lora_b.T)  # (out, r)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": float(parameters.get("dropout", 0.0)),
        **target_modules(modules, num_hidden_layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    return tensors, config


def write_peft_adapter(directory: Path, tensors: dict, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
