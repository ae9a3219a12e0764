"""GGUF import: a Llama or Qwen2 GGUF file as an mlx-lm model and tokenizer.

    model, tokenizer, config = load_gguf("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")

gguf_file.py reads and checks the header; each tensor's bytes are then read a slice of
rows at a time and decoded with the reference dequantizers of the `gguf` package
(llama.cpp's own Python library), so the model is never whole in float32. Each quantized
tensor becomes an MLX affine-quantized layer (group size 32, scales and biases in
float16); IMPORTS says how each type maps.
Where every 32 values of the source are one step times a code plus one offset (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) MLX gets the same codes at the same bits and holds
the same numbers; Q2_K, Q3_K and Q6_K scale each 16 values on their own, which MLX's
groups of 32 cannot, so they are quantized again with enough bits that the error added
is a few percent of the source's own. F32, F16 and BF16 tensors stay float.

Names are mapped to mlx-lm's, llama.cpp's row permutation of the Llama Q and K
projections is undone, Llama 3's RoPE scaling is recovered from the `rope_freqs` tensor
llama.cpp stores instead of its settings, and the tokenizer (byte-level BPE, special tokens, BOS/EOS/PAD)
and chat template are rebuilt from the file's metadata.
"""

from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import _get_classes, infer_quant_config
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mipo_mlx.errors import UserError
from mipo_mlx.gguf_file import REDOWNLOAD, GGUFHeader, GGUFTensor, read_gguf_header
from mipo_mlx.model_sources import GGUF_LAYER_NAMES

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Llama 3.x's RoPE settings besides the factor; llama.cpp keeps only the per-frequency factors.
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
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


def _mlx_lm_name(name: str, path: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        return f"model.layers.{layer}.{GGUF_LAYER_NAMES[kind]}.{suffix}"
    if base not in TOP_LEVEL_NAMES:
        raise UserError(f"unexpected tensor {name!r} for a Llama/Qwen2 model", file=path)
    return f"{TOP_LEVEL_NAMES[base]}.{suffix}"


def unpermute_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row order (head, pair, half) -> (head, half, pair)."""
    rows = weight.shape[0]
    # (n_heads, half, 2, ...) -> (n_heads, 2, half, ...): rotary halves back together.
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_config(metadata: dict, tensors: dict, path: str) -> dict:
    """An HF-style config.json dict for mlx-lm from the GGUF metadata and tensor table (gguf_file.GGUFHeader's)."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported; use a Llama or Qwen2 model", file=path
        )
    heads = metadata.get(f"{arch}.attention.head_count")
    hidden = metadata.get(f"{arch}.embedding_length")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": metadata.get(f"{arch}.block_count"),
        "intermediate_size": metadata.get(f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata.get(f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": metadata.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": metadata.get(f"{arch}.context_length", 4096),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    head_dim = metadata.get(f"{arch}.attention.key_length")
    if head_dim and head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if metadata.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": metadata.get(f"{arch}.rope.scaling.factor")}
    if "rope_freqs.weight" in tensors:
        rope_dims = metadata.get(f"{arch}.rope.dimension_count", head_dim or hidden // heads)
        factors = float_tensor(path, tensors["rope_freqs.weight"])
        config["rope_scaling"] = llama3_rope_scaling(factors, rope_dims, config["rope_theta"], path)
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
    token_types = metadata["tokenizer.ggml.token_type"]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = metadata.get("tokenizer.ggml.pre", "default")
    backend.pre_tokenizer = _pre_tokenizer(pre)
    if pre in ("qwen2", "qwen35"):
        backend.normalizer = normalizers.NFC()  # as in Qwen's own tokenizer.json
    backend.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == CONTROL_TOKEN]
    user_defined = [tokens[i] for i, kind in enumerate(token_types) if kind == USER_DEFINED_TOKEN]

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos:
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
    end_ids |= {metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")} - {None}
    return TokenizerWrapper(hf_tokenizer, BPEStreamingDetokenizer, eos_token_ids=sorted(end_ids))


GROUP_SIZE = 32  # MLX's smallest affine group; every quantized GGUF block holds whole groups of it
SLICE_VALUES = 1 << 22  # values decoded at a time (16 MB of float32): the whole model is never float at once


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 (blocks, 1)."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _scaled_codes(zero_code: int):
    """Q4_0, Q5_0, Q8_0: a float16 d per 32 values, value = d * (code - zero_code)."""
    return lambda blocks: (_f16(blocks, 0), -zero_code * _f16(blocks, 0))


def _scaled_codes_plus_min(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1, Q5_1: float16 d and m per 32 values, value = d * code + m."""
    return _f16(blocks, 0), _f16(blocks, 2)


def _k_quant_grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K, Q5_K: 256 values, the j-th 32 of them d * scale_j * code - dmin * min_j (6-bit scale_j, min_j)."""
    scales, mins = Q4_K.get_scale_min(blocks[:, 4:16])
    return _f16(blocks, 0) * scales.astype(np.float32), -_f16(blocks, 2) * mins.astype(np.float32)


@dataclass(frozen=True)
class Import:
    """How a GGUF tensor type becomes MLX: affine bits at GROUP_SIZE (None: stays float).

    `grid`, for types whose every 32 values are step * code + offset, gives (step, offset)
    per 32 values from the raw blocks (blocks, bytes per block): MLX then gets the file's
    own codes and the same numbers. Without it each 32 values are quantized again, from
    their minimum to their maximum.
    """

    bits: int | None
    grid: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def describe(self, type_name: str) -> str:
        if self.bits is None:
            return FLOAT_DTYPES[type_name]
        return f"{self.bits}-bit g{GROUP_SIZE}, " + ("the same values" if self.grid else "quantized again")


FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
IMPORTS = {
    **{name: Import(None) for name in FLOAT_DTYPES},
    "Q4_0": Import(4, _scaled_codes(8)),
    "Q4_1": Import(4, _scaled_codes_plus_min),
    "Q5_0": Import(5, _scaled_codes(16)),
    "Q5_1": Import(5, _scaled_codes_plus_min),
    "Q8_0": Import(8, _scaled_codes(128)),
    "Q4_K": Import(4, _k_quant_grid),
    "Q5_K": Import(5, _k_quant_grid),
    # Scaled per 16 values: quantized again with bits enough that the error added is a few
    # percent of the source's own (README: GGUF files).
    "Q2_K": Import(4),
    "Q3_K": Import(5),
    "Q6_K": Import(8),
}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing of (rows, columns) codes: each row a little-endian bit stream of uint32 words.

    Every 8 codes make `bits` whole bytes, the first code in the lowest bits: the low bytes of
    a uint64 (MLX runs on little-endian machines only).
    """
    eights = codes.reshape(len(codes), -1, 8)
    stream = np.zeros(eights.shape[:-1], np.uint64)
    for i in range(8):
        stream |= eights[..., i].astype(np.uint64) << np.uint64(bits * i)
    return np.ascontiguousarray(stream[..., None].view(np.uint8)[..., :bits]).reshape(len(codes), -1).view(np.uint32)


def tensor_bytes(path: str, tensor: GGUFTensor, first_row: int = 0, rows: int | None = None) -> np.ndarray:
    """Rows of a tensor's raw bytes, (rows, bytes per row): read, not mapped, so only what is decoded is in memory."""
    rows = prod(tensor.shape[:-1]) - first_row if rows is None else rows
    raw = np.fromfile(path, np.uint8, rows * tensor.row_bytes, offset=tensor.offset + first_row * tensor.row_bytes)
    return raw.reshape(rows, tensor.row_bytes)


def quantized_tensor(path: str, tensor: GGUFTensor, spec: Import) -> tuple[mx.array, mx.array, mx.array]:
    """A quantized GGUF matrix as MLX's (weight, scales, biases), decoded a slice of rows at a time."""
    rows, columns = prod(tensor.shape[:-1]), tensor.shape[-1]
    kind = GGMLQuantizationType[tensor.type_name]
    levels = 2**spec.bits - 1
    weight = np.empty((rows, columns * spec.bits // 32), np.uint32)
    scales = np.empty((rows, columns // GROUP_SIZE), np.float16)
    biases = np.empty_like(scales)
    step_rows = max(1, SLICE_VALUES // columns)
    for start in range(0, rows, step_rows):
        blocks = tensor_bytes(path, tensor, start, min(step_rows, rows - start))
        count = len(blocks)
        values = dequantize(blocks, kind).reshape(count, -1, GROUP_SIZE)
        if spec.grid:
            step, offset = (g.reshape(count, -1, 1) for g in spec.grid(blocks.reshape(-1, GGML_QUANT_SIZES[kind][1])))
        else:
            offset = values.min(axis=-1, keepdims=True)
            step = (values.max(axis=-1, keepdims=True) - offset) / levels
        # A group whose step is 0 holds one value, its offset: code 0.
        inverse = np.divide(1, step, out=np.zeros_like(step), where=step != 0)
        codes = np.subtract(values, offset, out=values)
        codes *= inverse
        np.clip(np.rint(codes, out=codes), 0, levels, out=codes)
        codes = codes.astype(np.uint8).reshape(count, -1)
        weight[start : start + count] = pack_codes(codes, spec.bits)
        scales[start : start + count] = step[..., 0]
        biases[start : start + count] = offset[..., 0]
    shape = (*tensor.shape[:-1], -1)
    return mx.array(weight.reshape(shape)), mx.array(scales.reshape(shape)), mx.array(biases.reshape(shape))


def float_tensor(path: str, tensor: GGUFTensor) -> mx.array:
    """An F32, F16 or BF16 GGUF tensor in its own dtype."""
    raw = tensor_bytes(path, tensor).reshape(-1)
    if tensor.type_name == "BF16":  # numpy has no bfloat16: MLX reinterprets the bytes
        return mx.array(raw.view(np.uint16).reshape(tensor.shape)).view(mx.bfloat16)
    return mx.array(raw.view(np.dtype(FLOAT_DTYPES[tensor.type_name])).reshape(tensor.shape))


def load_gguf(path: str | Path) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """Model (quantized layers as IMPORTS says), tokenizer and mlx-lm config of a GGUF file."""
    path = str(path)
    header = read_gguf_header(path)
    try:
        return _build(path, header)
    except (UserError, MemoryError):
        raise
    except Exception as error:  # a header that reads, with values that describe no model (damaged or unsupported)
        reason = f"{type(error).__name__}: {str(error)[:160]}"
        raise UserError(f"its metadata and tensors do not make a model ({reason}); {REDOWNLOAD}", file=path) from None


def _build(path: str, header: GGUFHeader) -> tuple[nn.Module, TokenizerWrapper, dict]:
    metadata, tensors = header.metadata, header.tensors
    config = gguf_config(metadata, tensors, path)
    tokenizer = gguf_tokenizer(metadata, path)
    kv_heads = config["num_key_value_heads"]
    weights = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight" or (name.startswith("blk.") and name.split(".")[2] not in GGUF_LAYER_NAMES):
            continue  # llama.cpp extras that mlx-lm recomputes from the config (rope_freqs: see gguf_config)
        spec, mlx_name = IMPORTS[tensor.type_name], _mlx_lm_name(name, path)
        if spec.bits is None:
            weights[mlx_name] = float_tensor(path, tensor)
        else:  # llama.cpp quantizes matrices only (norms and biases are F32 in every file type)
            base = mlx_name.removesuffix(".weight")
            weights.update(zip((f"{base}.weight", f"{base}.scales", f"{base}.biases"), quantized_tensor(path, tensor, spec)))
    for name in weights:
        if config["model_type"] == "llama" and ".self_attn.q_proj." in name:
            weights[name] = unpermute_rows(weights[name], config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".self_attn.k_proj." in name:
            weights[name] = unpermute_rows(weights[name], kv_heads)
    model, config = build_model(config, weights)
    config["eos_token_id"] = sorted(tokenizer.eos_token_ids)
    return model, tokenizer, config


def tensor_types(header: GGUFHeader) -> dict[str, dict]:
    """A GGUF file's tensor types, most used first: {"Q4_K": {"tensors": 169, "imported_as": "4-bit g32, ..."}}."""
    by_type = Counter(tensor.type_name for tensor in header.tensors.values())
    return {kind: {"tensors": count, "imported_as": IMPORTS[kind].describe(kind)} for kind, count in by_type.most_common()}
