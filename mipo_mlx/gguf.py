"""GGUF import: a Llama or Qwen2 GGUF file as an mlx-lm model and tokenizer.

    model, tokenizer, config = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

MLX reads the tensors (`mx.load(path, return_metadata=True)`): Q4_0, Q4_1 and Q8_0 come
back as MLX affine-quantized triplets (weight, scales, biases; group size 32) and stay
quantized layers, with bits per layer as in the file; F16/F32 tensors load as float.
Names are mapped to mlx-lm's, llama.cpp's row permutation of the Llama Q and K
projections is undone, Llama 3's RoPE scaling is recovered from the `rope_freqs` tensor
llama.cpp stores instead of its settings, and the tokenizer (byte-level BPE, special tokens, BOS/EOS/PAD)
and chat template are rebuilt from the file's metadata.
"""

from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import _get_classes, infer_quant_config
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mipo_mlx.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Llama 3.x's RoPE settings besides the factor; llama.cpp keeps only the per-frequency factors.
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# mx.load's message for a tensor type it cannot read (Q5_K, Q5_0, IQ4_XS, ...).
UNREADABLE_TENSOR_TYPE = "gguf_tensor_to_f16 failed"
LAYER_NAMES = {
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
# Pre-tokenizer split patterns by tokenizer.ggml.pre, as llama.cpp defines them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tokens that end an assistant turn in common chat templates.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4


def _value(metadata: dict, key: str, default=None):
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _mlx_lm_name(name: str, path: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[kind]}.{suffix}"
    if base not in TOP_LEVEL_NAMES:
        raise UserError(f"unexpected tensor {name!r} for a Llama/Qwen2 model", file=path)
    return f"{TOP_LEVEL_NAMES[base]}.{suffix}"


def unpermute_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row order (head, pair, half) -> (head, half, pair)."""
    rows = weight.shape[0]
    # (n_heads, half, 2, ...) -> (n_heads, 2, half, ...): rotary halves back together.
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_config(metadata: dict, weights: dict, path: str) -> dict:
    """An HF-style config.json dict for mlx-lm from the GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported; use a Llama or Qwen2 model", file=path
        )
    heads = _value(metadata, f"{arch}.attention.head_count")
    hidden = _value(metadata, f"{arch}.embedding_length")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _value(metadata, f"{arch}.block_count"),
        "intermediate_size": _value(metadata, f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _value(metadata, f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": _value(metadata, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _value(metadata, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _value(metadata, f"{arch}.context_length", 4096),
        "vocab_size": weights["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in weights,
    }
    head_dim = _value(metadata, f"{arch}.attention.key_length")
    if head_dim and head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if _value(metadata, f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _value(metadata, f"{arch}.rope.scaling.factor")}
    if "rope_freqs.weight" in weights:
        rope_dims = _value(metadata, f"{arch}.rope.dimension_count", head_dim or hidden // heads)
        config["rope_scaling"] = llama3_rope_scaling(weights["rope_freqs.weight"], rope_dims, config["rope_theta"], path)
    return config


def llama3_rope_scaling(rope_factors: mx.array, dims: int, base: float, path: str) -> dict:
    """Llama 3's rope_scaling whose per-frequency factors are the file's `rope_freqs` tensor."""
    scaling = {"rope_type": "llama3", "factor": rope_factors.max().item(), **LLAMA3_ROPE_DEFAULTS}
    # mlx-lm's Llama 3 periods over the unscaled ones are exactly llama.cpp's factors.
    expected = Llama3RoPE(dims, base=base, scaling_config=scaling)._freqs / base ** (mx.arange(0, dims, 2) / dims)
    if expected.shape != rope_factors.shape or not mx.allclose(expected, rope_factors.astype(mx.float32), rtol=1e-3):
        raise UserError("its rope_freqs tensor is not Llama 3's RoPE scaling, the only one supported", file=path)
    return scaling


def build_model(config: dict, weights: dict) -> tuple[nn.Module, dict]:
    """Instantiate mlx-lm's class for `config`, quantize layers as the weights are, load them.

    Returns the model and the config with its per-layer "quantization" entry, as mlx-lm writes it.
    """
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(weights)
    layers = {}

    def quantized_like_weights(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        layers[path] = infer_quant_config(path, module, weights)
        return layers[path]

    nn.quantize(model, class_predicate=quantized_like_weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if layers:
        # The most common setting is the default; layers that differ (e.g. an 8-bit embedding) are listed.
        (bits, group_size), _ = Counter((q["bits"], q["group_size"]) for q in layers.values()).most_common(1)[0]
        differing = {p: q for p, q in layers.items() if (q["bits"], q["group_size"]) != (bits, group_size)}
        config = {**config, "quantization": {"group_size": group_size, "bits": bits, **differing}}
    return model, config


def _pre_tokenizer(kind: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "smollm":
        # SmolLM splits every digit, then applies GPT-2's byte-level split.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if kind in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level])
    if kind in ("qwen2", "qwen35"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level])
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def gguf_tokenizer(metadata: dict, path: str) -> TokenizerWrapper:
    """The GGUF's byte-level BPE tokenizer and chat template, as an mlx-lm TokenizerWrapper."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(
            f"tokenizer type {metadata.get('tokenizer.ggml.model')!r} is not supported (only byte-level "
            "BPE, 'gpt2'); convert the model with mlx-lm from its Hub repository instead",
            file=path,
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    token_types = metadata["tokenizer.ggml.token_type"].tolist()
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = metadata.get("tokenizer.ggml.pre", "default")
    backend.pre_tokenizer = _pre_tokenizer(pre)
    if pre in ("qwen2", "qwen35"):
        backend.normalizer = normalizers.NFC()  # as in Qwen's own tokenizer.json
    backend.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == CONTROL_TOKEN]
    user_defined = [tokens[i] for i, kind in enumerate(token_types) if kind == USER_DEFINED_TOKEN]

    def token(key):
        index = _value(metadata, f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if _value(metadata, "tokenizer.ggml.add_bos_token", False) and bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding") or eos,
        unk_token=token("unknown"),
        additional_special_tokens=[t for t in control if t not in (bos, eos)],
        clean_up_tokenization_spaces=False,
    )
    # User-defined tokens (e.g. Qwen's <tool_call>) are never split, but decode as text even when skipping specials.
    hf_tokenizer.add_tokens(user_defined)
    hf_tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    vocab = hf_tokenizer.get_vocab()
    end_ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in control + user_defined}
    end_ids |= {_value(metadata, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")} - {None}
    return TokenizerWrapper(hf_tokenizer, BPEStreamingDetokenizer, eos_token_ids=sorted(end_ids))


def load_gguf(path: str | Path) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """Model (quantized layers as in the file), tokenizer and mlx-lm config of a GGUF file."""
    path = str(path)
    try:
        tensors, metadata = mx.load(path, return_metadata=True)
    except (RuntimeError, ValueError, OSError) as error:
        reason = " ".join(str(error).split())
        if UNREADABLE_TENSOR_TYPE in reason:
            reason = (
                "a tensor type MLX cannot read; MLX reads F32, F16, BF16, Q4_0, Q4_1, Q8_0 (and Q2_K, Q4_K, Q6_K "
                "as float16): use e.g. a Q4_0, Q8_0 or Q4_K_M file, or the model's mlx-community version"
            )
        raise UserError(f"cannot read this GGUF file ({reason})", file=path) from None
    config = gguf_config(metadata, tensors, path)
    kv_heads = config["num_key_value_heads"]
    weights = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight" or (name.startswith("blk.") and name.split(".")[2] not in LAYER_NAMES):
            continue  # llama.cpp extras that mlx-lm recomputes from the config (rope_freqs: see gguf_config)
        if config["model_type"] == "llama" and ".attn_q." in name:
            tensor = unpermute_rows(tensor, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".attn_k." in name:
            tensor = unpermute_rows(tensor, kv_heads)
        weights[_mlx_lm_name(name, path)] = tensor
    model, config = build_model(config, weights)
    tokenizer = gguf_tokenizer(metadata, path)
    config["eos_token_id"] = sorted(tokenizer.eos_token_ids)
    return model, tokenizer, config
