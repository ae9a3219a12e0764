"""`mipo-mlx info MODEL`: what a model is and the memory sampling and LoRA training need.

    mipo-mlx info smollm2-135m
    mipo-mlx info out/smollm2 --json

Memory figures are estimates from the model's shapes: weights as this machine computes
with them (see loading.py's compute policy), the KV cache for a sampling batch, and for
LoRA DPO the adapter with its gradients and AdamW state plus activations and logits for
chosen and rejected answers together.
"""

import json
from collections import defaultdict

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters

from mipo_mlx.backend import describe_backend
from mipo_mlx.errors import UserError, rekeyed
from mipo_mlx.export import base_gguf_path
from mipo_mlx.generation import auto_batch_size
from mipo_mlx.gguf import tensor_types
from mipo_mlx.gguf_file import read_gguf_header
from mipo_mlx.loading import load_model, resolve_compute
from mipo_mlx.preflight import check_model
from mipo_mlx.recipe import DEFAULT_LORA_KEYS, LoraConfig, SamplingConfig, TrainingConfig

GB = 1024**3
FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Per layer and token, a transformer block keeps roughly this many hidden-size activations
# for the backward pass (attention and MLP inputs, norms, MLP intermediate in hidden units).
ACTIVATIONS_PER_TOKEN_LAYER = 16


def _layer_kind(path: str) -> str:
    for part, kind in (("self_attn", "attention"), ("mlp", "mlp"), ("embed_tokens", "embedding"), ("lm_head", "lm_head")):
        if part in path:
            return kind
    return "other"


def quantization_by_kind(model: nn.Module) -> dict[str, str]:
    """e.g. {"attention": "4-bit g32", "mlp": "4-bit g32", "embedding": "8-bit g32"}."""
    kinds = defaultdict(set)
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            kinds[_layer_kind(path)].add(f"{module.bits}-bit g{module.group_size}")
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            kinds[_layer_kind(path)].add(str(module.weight.dtype).removeprefix("mlx.core."))
    return {kind: ", ".join(sorted(values)) for kind, values in sorted(kinds.items())}


def memory_estimates(model: nn.Module, config: dict, compute: str) -> dict[str, float]:
    """GB for sampling and for LoRA DPO at the recipe defaults (batch, lengths, rank)."""
    params = get_total_parameters(model)
    if compute == "quantized":
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    else:
        weights = params * FLOAT_BYTES[compute]
    act_bytes = FLOAT_BYTES.get(compute, 2)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    sampling, training, lora = SamplingConfig(), TrainingConfig(), LoraConfig()
    tokens = sampling.max_tokens + 512  # an answer after a prompt of up to 512 tokens
    batch = sampling.batch_size or auto_batch_size(model, 512, sampling.max_tokens)
    kv_cache = 2 * layers * kv_heads * head_dim * tokens * batch * act_bytes
    # One LoRA pair (r x in, out x r) per adapted linear, counted from the first layer's shapes.
    first_layer = dict(model.model.layers[0].named_modules())
    lora_params = 0
    for key in DEFAULT_LORA_KEYS:
        module = first_layer.get(key)
        if module is not None:
            # A quantized weight packs 32 // bits values per uint32 column (3, 5, 6 bits: 32 / bits).
            out_dims, in_dims = module.weight.shape[0], module.weight.shape[1] * 32 // getattr(module, "bits", 32)
            lora_params += lora.rank * (in_dims + out_dims) * layers
    rows = 2 * training.batch_size  # chosen and rejected in one forward
    seq = training.max_seq_length // 2  # typical prompt plus answer
    activations = rows * seq * layers * hidden * ACTIVATIONS_PER_TOKEN_LAYER * act_bytes
    logits = 3 * rows * seq * config["vocab_size"] * 4  # float32 logits, log-softmax and their gradient
    return {
        "parameters": params,
        "weights_gb": weights / GB,
        "sampling_gb": (weights + kv_cache) / GB,
        "sampling_batch": batch,
        "lora_parameters": lora_params,
        "training_gb": (weights + lora_params * 16 + activations + logits) / GB,
    }


def describe_model(spec: str, compute: str = "auto") -> dict:
    """Everything `mipo-mlx info` prints, as a dict."""
    loaded = load_model(spec, compute="quantized")
    model, config = loaded.model, loaded.config
    chosen = resolve_compute(compute, model)
    template = loaded.tokenizer.chat_template if loaded.tokenizer.has_chat_template else None
    return {
        "model": spec,
        "architecture": config["model_type"],
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "attention_heads": f"{config['num_attention_heads']} ({config.get('num_key_value_heads', config['num_attention_heads'])} key/value)",
        "vocab_size": config["vocab_size"],
        "context_length": config.get("max_position_embeddings"),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "quantization": quantization_by_kind(model),
        # A GGUF file's tensor types, each with its count and what it became (gguf.IMPORTS).
        "gguf_tensor_types": tensor_types(read_gguf_header(source)) if (source := base_gguf_path(spec)) else None,
        "chat_template": template,
        "eos_token_ids": sorted(loaded.tokenizer.eos_token_ids),
        "compute_here": chosen,
        "backend": describe_backend(),
        "memory": memory_estimates(model, config, chosen),
    }


def format_description(info: dict) -> str:
    memory = info["memory"]
    sampling, training, lora = SamplingConfig(), TrainingConfig(), LoraConfig()
    template = info["chat_template"]
    lines = [
        f"model            {info['model']}",
        f"architecture     {info['architecture']}, {info['layers']} layers, hidden {info['hidden_size']}, "
        f"heads {info['attention_heads']}",
        f"parameters       {memory['parameters'] / 1e6:.1f}M",
        f"vocabulary       {info['vocab_size']} tokens, context {info['context_length']}, "
        f"tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}",
        "quantization     " + "; ".join(f"{kind}: {q}" for kind, q in info["quantization"].items()),
        *(["GGUF tensors     " + "; ".join(f"{kind} x{t['tensors']} -> {t['imported_as']}"
                                           for kind, t in info["gguf_tensor_types"].items())]
          if info["gguf_tensor_types"] else []),
        f"chat template    {'yes' if template else 'none (not an instruct model?)'}, end-of-turn ids {info['eos_token_ids']}",
        f"backend          {info['backend']['backend']} ({info['backend']['device']}), BLAS: {info['backend']['blas']}",
        f"compute here     {info['compute_here']} (model.compute: auto)",
        "memory (estimates)",
        f"  weights        {memory['weights_gb']:.2f} GB",
        f"  sampling       {memory['sampling_gb']:.2f} GB  (batch {memory['sampling_batch']}, up to {sampling.max_tokens} new tokens)",
        f"  LoRA DPO       {memory['training_gb']:.2f} GB  (rank {lora.rank}, {memory['lora_parameters'] / 1e6:.2f}M adapter "
        f"parameters, batch {training.batch_size} pairs, {training.max_seq_length // 2} tokens each)",
    ]
    if template:
        lines += ["chat template:", *("  " + line for line in template.strip().splitlines())]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="smollm2-135m, a .gguf file, an mlx-lm model directory or a Hub id.")
    parser.add_argument("--json", action="store_true", help="Print the description as JSON.")


def run(args) -> int:
    check_model(args.model, key="MODEL")
    try:
        info = describe_model(args.model)
    except UserError as error:
        raise (rekeyed(error, "MODEL") if error.key == "model.path" else error) from None
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
