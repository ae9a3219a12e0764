"""GGUF import: tiny files written like llama.cpp's, and the embedded model answering."""

import mlx.core as mx
import numpy as np
import pytest
import gguf_fixtures
from gguf_fixtures import LLAMA3_ROPE, write_tiny_gguf
from mlx_lm import generate

from mipo_mlx.errors import UserError
from mipo_mlx.gguf import load_gguf
from tiny_models import tiny_hf_tokenizer

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 8]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F32"])
def test_gguf_logits_match_the_weights_the_file_encodes(tmp_path, arch, qtype):
    path, reference = write_tiny_gguf(tmp_path / "tiny.gguf", arch, qtype)
    model, _, config = load_gguf(path)
    assert config["model_type"] == arch
    expected = reference(TOKENS)
    # MLX keeps GGUF scales in float16, so activations after the embedding are float16.
    assert mx.abs(model(TOKENS) - expected).max().item() < 2e-3 * mx.abs(expected).max().item()


def test_quantized_tensors_stay_quantized_with_bits_per_layer(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q4_0", embedding_qtype="Q8_0")
    model, _, config = load_gguf(path)
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert model.model.embed_tokens.bits == 8
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8


def test_skipping_the_qk_unpermutation_changes_the_model(tmp_path, monkeypatch):
    """The permutation matters: without undoing it the logits are wrong (the model 'talks nonsense')."""
    path, reference = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "F32")
    monkeypatch.setattr("mipo_mlx.gguf.unpermute_rows", lambda weight, heads: weight)
    model, _, _ = load_gguf(path)
    expected = reference(TOKENS)
    assert mx.abs(model(TOKENS) - expected).max().item() > 0.05 * mx.abs(expected).max().item()


def test_tokenizer_is_rebuilt_from_metadata(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", "Q8_0")
    _, tokenizer, _ = load_gguf(path)
    original = tiny_hf_tokenizer()
    text = "Bonjour, voici une idée!\n\tThe capital of France is Paris. 123"
    assert tokenizer.encode(text) == original.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert original.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


def test_user_defined_tokens_stay_whole_and_decode_as_text(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", "Q8_0", user_defined_tokens=("<|im_start|>",))
    _, tokenizer, _ = load_gguf(path)
    ids = tokenizer.encode("<|im_start|>user<|im_end|>")
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<|im_start|>user"


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    path, reference = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "F32", embedding_qtype="F32", llama3_rope=True)
    model, _, config = load_gguf(path)
    assert config["rope_scaling"] == LLAMA3_ROPE
    # Long enough that the slowest rotations, the ones Llama 3 rescales, move the logits.
    tokens = (mx.arange(400) * 7 % config["vocab_size"]).reshape(1, -1)
    expected = reference(tokens)
    assert mx.abs(model(tokens) - expected).max().item() < 1e-3 * mx.abs(expected).max().item()


def test_rope_freqs_that_are_not_llama3_scaling_are_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_fixtures, "llama3_rope_factors", lambda dims, base, scaling: np.full(dims // 2, 2.0, np.float32))
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "F32", llama3_rope=True)
    with pytest.raises(UserError, match="not Llama 3's RoPE scaling"):
        load_gguf(path)


def test_tensor_types_mlx_cannot_read_name_the_types_it_can(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "q5.gguf", "qwen2", "Q5_0")
    with pytest.raises(UserError, match="tensor type MLX cannot read.*Q4_0, Q4_1, Q8_0") as error:
        load_gguf(path)
    assert "\n" not in str(error.value)


def test_unsupported_architecture_and_garbage_file_are_user_errors(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not gguf")
    with pytest.raises(UserError, match="cannot read this GGUF file"):
        load_gguf(bad)


def test_embedded_tokenizer_matches_the_gguf_vocabulary_and_round_trips(embedded_model):
    tokenizer = embedded_model.tokenizer
    ids = tokenizer.encode("The capital of France is Paris.")
    assert tokenizer.convert_ids_to_tokens(ids) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
    # SmolLM splits digits one by one; special tokens are single ids, never split by BPE.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_ids) == ("<|im_start|>", "<|im_end|>", {2})
    text = "<|im_start|>user\nÜnïcödé 漢字 🙂 it's 123!\n\n  two spaces\tand a tab<|im_end|>\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_embedded_model_answers_paris_at_temperature_zero(embedded_model):
    tokenizer = embedded_model.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(embedded_model.model, tokenizer, prompt, max_tokens=24)
    assert "Paris" in answer
