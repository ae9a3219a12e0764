"""GGUF import: tiny files written like llama.cpp's, and the embedded model answering."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import gguf_fixtures
from gguf_fixtures import LLAMA3_ROPE, write_tiny_gguf
from mlx_lm import generate

from mipo_mlx.errors import UserError
from mipo_mlx.gguf import IMPORTS, load_gguf, tensor_types
from mipo_mlx.gguf_file import TENSOR_TYPES, read_gguf_header
from mipo_mlx.preflight import check_model
from tiny_models import tiny_hf_tokenizer

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 8]])


# How far the loaded model's logits may be from those of the weights the file encodes, relative to
# the largest logit, with MLX's float16 scales and biases made float32 so that only the import
# counts. Exact: the file's codes at its bits; 0 (float32 rounding) where the step and offset are
# float16 in the file too, about 2**-11 where they are products of a float16 and a 6-bit scale.
# Quantized again (16-value sub-blocks): measured 0.085-0.12 (Q2_K at 4 bits), 0.013-0.024 (Q3_K
# at 5), 0.006-0.007 (Q6_K at 8), where the source's own rounding moves these logits by 0.14
# (Q4_0), 0.09 (Q5_0) and 0.011 (Q8_0) from the float model's.
IMPORT_TOLERANCE = {
    "F32": 1e-5, "F16": 1e-5, "BF16": 1e-5,
    "Q4_0": 1e-5, "Q4_1": 1e-5, "Q5_0": 1e-5, "Q5_1": 1e-5, "Q8_0": 1e-5,
    "Q4_K": 2e-3, "Q5_K": 2e-3,
    "Q2_K": 0.15, "Q3_K": 0.04, "Q6_K": 0.02,
}


def relative_error(model, reference, tokens=TOKENS) -> float:
    expected = reference(tokens)
    return (mx.abs(model(tokens) - expected).max() / mx.abs(expected).max()).item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [name for name, _, _ in TENSOR_TYPES.values()])
def test_every_imported_type_gives_the_logits_of_the_weights_the_file_encodes(tmp_path, arch, qtype):
    path, reference = write_tiny_gguf(tmp_path / "tiny.gguf", arch, qtype)
    model, _, config = load_gguf(path)
    assert config["model_type"] == arch
    layer = model.model.layers[0].mlp.up_proj
    assert getattr(layer, "bits", None) == IMPORTS[qtype].bits
    model.set_dtype(mx.float32)
    assert relative_error(model, reference) < IMPORT_TOLERANCE[qtype]


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_as_loaded_with_float16_scales_the_logits_stay_close(tmp_path, qtype):
    path, reference = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", qtype)
    model, _, _ = load_gguf(path)
    # Activations after the embedding are float16, as on a Mac with model.compute: quantized.
    assert relative_error(model, reference) < IMPORT_TOLERANCE[qtype] + 2e-3


def test_quantized_tensors_stay_quantized_with_bits_per_layer(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q4_0", embedding_qtype="Q8_0")
    model, _, config = load_gguf(path)
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert model.model.embed_tokens.bits == 8
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8


def test_a_q4_k_m_mix_keeps_each_tensors_bits_and_says_what_each_type_became(tmp_path):
    path, reference = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", "Q4_K", embedding_qtype="Q6_K")
    model, _, _ = load_gguf(path)
    assert (model.model.layers[0].mlp.down_proj.bits, model.model.embed_tokens.bits) == (4, 8)
    assert tensor_types(read_gguf_header(path)) == {
        "Q4_K": {"tensors": 14, "imported_as": "4-bit g32, the same values"},
        "F32": {"tensors": 11, "imported_as": "float32"},  # norms, and Qwen2's Q, K, V biases
        "Q6_K": {"tensors": 1, "imported_as": "8-bit g32, quantized again"},
    }
    model.set_dtype(mx.float32)
    assert relative_error(model, reference) < IMPORT_TOLERANCE["Q6_K"]


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


def test_a_tensor_type_not_imported_is_one_line_naming_it(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "iq.gguf", "qwen2", "IQ4_NL")
    with pytest.raises(UserError, match=r"of its tensors are IQ4_NL \(e\.g\. blk\.0\.attn_q\.weight\), a type mipo-mlx "
                       r"does not import .*Q6_K\); use a Q4_K_M, Q5_K_M or Q8_0 file") as error:
        load_gguf(path)
    assert "\n" not in str(error.value) and error.value.file == str(path)


def test_garbage_old_versions_and_cut_files_are_one_line_naming_the_file(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", "Q4_K")
    whole = path.read_bytes()
    cases = {
        b"this is not a gguf file at all": "it starts with b'this', not GGUF",
        b"this is not gguf": "it is 16 bytes, too few for a GGUF header",
        b"GGUF" + (1).to_bytes(4, "little") + whole[8:]: "GGUF version 1, where mipo-mlx reads versions 2 and 3",
        whole[:2000]: r"a value at byte [\d,]+ needs [\d,]+ bytes, but the file ends at byte 2,000",
        whole[:-100]: r"tensor output_norm\.weight ends at byte [\d,]+, after the end of the file \([\d,]+ bytes\): it was cut",
        b"": "it is 0 bytes, too few for a GGUF header",
    }
    for content, problem in cases.items():
        path.write_bytes(content)
        with pytest.raises(UserError, match=f"cannot read this GGUF file.*{problem}.*download it again") as error:
            load_gguf(path)
        assert "\n" not in str(error.value) and error.value.file == str(path)


def test_preflight_refuses_such_a_file_in_one_line_before_loading_anything(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "iq.gguf", "llama", "IQ4_NL")
    with pytest.raises(UserError, match=r"^model\.path: .*iq\.gguf: 15 of its tensors are IQ4_NL"):
        check_model(str(path), key="model.path")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{path: {path}}}\noutput_dir: {tmp_path / 'runs'}\n", encoding="utf-8")
    # `train`'s one line and exit status 2, before mlx-lm is imported (seconds) or a run directory made.
    probe = ("import sys; from mipo_mlx.cli import main; code = main(['train', sys.argv[1]]); "
             "sys.exit(100 + code if 'mlx_lm' in sys.modules else code)")
    result = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1 and "model.path: " in result.stderr and "are IQ4_NL" in result.stderr
    assert not (tmp_path / "runs").exists()


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
