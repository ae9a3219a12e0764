"""Write tiny Llama and Qwen2 GGUF files the way llama.cpp does, for loader tests.

    path, reference = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q4_0")
    path, reference = write_tiny_gguf(tmp_path / "m.gguf", "qwen2", "Q4_K", "Q6_K", types={"mlp.down_proj": "Q5_0"})

`reference` is an mlx-lm model holding the exact weights the file encodes (quantized
tensors dequantized with gguf's own reference code), so a correct loader must give the
same logits. Types the gguf package can encode (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
are encoded from the weights as llama.cpp does; the K-quants it cannot encode (Q2_K ...
Q6_K) are random valid blocks, every code and sub-block scale bit pattern, with the
float16 block scales set so the weights have the source's spread and about zero mean.
K-quant blocks hold 256 values, so a file with one is 256 wide. `types` gives the tensors
whose name holds a key that key's type instead, as Q4_K_M files mix types. Llama Q/K rows are
permuted as llama.cpp's converter does; with
`llama3_rope=True` the file carries Llama 3's RoPE scaling as llama.cpp does, as a
`rope_freqs` tensor of per-frequency factors.
"""

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf.quants import dequantize, quantize
from gguf.constants import GGML_QUANT_SIZES
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2

from tiny_models import tiny_config, tiny_hf_tokenizer

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama Q/K rows."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers."):
        layer, rest = parts[2], ".".join(parts[3:-1])
        return f"blk.{layer}.{HF_TO_GGUF[rest]}.{parts[-1]}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[".".join(parts[:-1])] + "." + parts[-1]


# K-quant blocks: the byte offsets of the float16 scale d and, for types with minimums, dmin; the code bits.
K_QUANT_SCALES = {"Q2_K": (80, 82, 2), "Q3_K": (108, None, 3), "Q4_K": (0, 2, 4), "Q5_K": (0, 2, 5), "Q6_K": (208, None, 6)}


def neighbour_like_scales(blocks: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Sub-block scales (and minimums) of 16 values within about 30% of each other, as llama.cpp's encoders give
    neighbouring values (Qwen2.5's Q6_K tensors: a median ratio of 1.23); fully random ones are a worst case
    no file has. Q4_K and Q5_K keep every random scale: they are imported exactly whatever their scales."""
    if kind == "Q2_K":
        blocks[:, :16] |= 0xCC  # 4-bit scale and minimum, 12 to 15
    elif kind == "Q3_K":
        blocks[:, 96:104] |= 0x88  # low 4 bits of the 6-bit scales 8 to 15
        blocks[:, 104:108] = 0xFF  # and their high 2 bits 3: scales 56 to 63, d * 24 to 31
    elif kind == "Q6_K":
        scales = rng.integers(96, 128, (len(blocks), 16)) * rng.choice([-1, 1], (len(blocks), 16))
        blocks[:, 192:208] = scales.astype(np.int8).view(np.uint8)


def random_blocks(weight: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes as `kind` blocks for a matrix shaped like `weight`, (rows, bytes per row)."""
    block, block_bytes = GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return rng.integers(0, 256, (weight.shape[0], weight.shape[1] // block * block_bytes), dtype=np.uint8)


def random_k_quant(weight: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random valid `kind` blocks for a matrix shaped like `weight`: its spread, about zero mean."""
    qtype = gguf.GGMLQuantizationType[kind]
    rows = random_blocks(weight, kind, rng)
    blocks = rows.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    neighbour_like_scales(blocks, kind, rng)
    d_at, dmin_at, code_bits = K_QUANT_SCALES[kind]

    def set_scales(d):
        blocks[:, d_at : d_at + 2] = np.float16(d).reshape(1).view(np.uint8)
        if dmin_at is not None:  # value = d * scale * code - dmin * min: a mean code's worth of minimum centres it
            blocks[:, dmin_at : dmin_at + 2] = np.float16(d * (2**code_bits - 1) / 2).reshape(1).view(np.uint8)

    set_scales(1.0)
    set_scales(weight.std() / dequantize(rows, qtype).std())
    return rows


def encode(weight: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`weight` as a GGUF tensor of type `kind`, in the bytes (or floats) GGUFWriter takes.

    Types neither gguf nor this file encode (IQ4_NL, ...) are random bytes: the loader refuses them unread.
    """
    if kind in K_QUANT_SCALES:
        return random_k_quant(weight, kind, rng)
    try:
        return quantize(weight, gguf.GGMLQuantizationType[kind])
    except NotImplementedError:
        return random_blocks(weight, kind, rng)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def llama3_rope_factors(head_dim: int, base: float, scaling: dict) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for Llama 3: 1 for fast rotations, `factor` for slow ones, smooth between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_tiny_gguf(
    path: Path, arch: str = "llama", qtype: str = "Q4_0", embedding_qtype: str = "Q8_0", seed: int = 0,
    llama3_rope: bool = False, user_defined_tokens: tuple[str, ...] = (), types: dict[str, str] | None = None,
):
    types = types or {}
    config = tiny_config(arch)
    if {qtype, embedding_qtype, *types.values()} & set(K_QUANT_SCALES):
        config.update(hidden_size=256, intermediate_size=512)
    if llama3_rope:
        config["rope_scaling"] = LLAMA3_ROPE
    module = {"llama": llama, "qwen2": qwen2}[arch]
    mx.random.seed(seed)
    source = module.Model(module.ModelArgs.from_dict(config))
    weights = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(source.parameters())}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    _add_tokenizer(writer, user_defined_tokens)
    if llama3_rope:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, config["rope_theta"], LLAMA3_ROPE))
    exact = {}
    rng = np.random.default_rng(seed)
    for name, weight in weights.items():
        is_matrix = weight.ndim == 2
        kind = next((t for part, t in types.items() if part in name), embedding_qtype if "embed_tokens" in name else qtype)
        stored = weight
        if arch == "llama" and ".q_proj.weight" in name:
            stored = permute_rows(weight, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj.weight" in name:
            stored = permute_rows(weight, config["num_key_value_heads"])
        if is_matrix and kind != "F32":
            qt = gguf.GGMLQuantizationType[kind]
            raw = encode(stored, kind, rng)
            writer.add_tensor(_gguf_name(name), raw, raw_dtype=qt)
            with np.errstate(invalid="ignore"):  # random IQ blocks may hold NaN scales; the loader refuses them
                decoded = dequantize(raw, qt).reshape(stored.shape)
            # The reference keeps the un-permuted order of what the file encodes.
            exact[name] = decoded if stored is weight else _unpermuted(decoded, name, config)
        else:
            writer.add_tensor(_gguf_name(name), stored)
            exact[name] = weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source.load_weights([(k, mx.array(v)) for k, v in exact.items()])
    source.eval()
    return path, source


def _unpermuted(weight: np.ndarray, name: str, config: dict) -> np.ndarray:
    heads = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tokenizer(writer: gguf.GGUFWriter, user_defined_tokens: tuple[str, ...]) -> None:
    tokenizer = tiny_hf_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([4 if t in user_defined_tokens else 3 if t in specials else 1 for t in tokens])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
