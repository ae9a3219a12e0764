"""`mipo-mlx convert` writes directories mlx-lm loads unchanged; `mipo-mlx info` describes models."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from gguf_fixtures import write_tiny_gguf

from mipo_mlx.convert import convert_model
from mipo_mlx.errors import UserError
from mipo_mlx.gguf import load_gguf
from mipo_mlx.info import describe_model

TOKENS = mx.array([[5, 17, 42, 99, 3]])


def test_converted_gguf_loads_in_mlx_lm_with_the_same_logits(tmp_path):
    gguf_path, _ = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q4_1")
    out = convert_model(str(gguf_path), tmp_path / "out")
    model, tokenizer = mlx_lm.load(str(out))
    ours, _, _ = load_gguf(gguf_path)
    assert mx.array_equal(model(TOKENS), ours(TOKENS))
    assert tokenizer.has_chat_template
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_convert_dtype_and_requantize(tmp_path):
    gguf_path, reference = write_tiny_gguf(tmp_path / "m.gguf", "qwen2", "Q8_0")
    f16, _ = mlx_lm.load(str(convert_model(str(gguf_path), tmp_path / "f16", dtype="float16")))
    assert f16.model.layers[0].mlp.up_proj.weight.dtype == mx.float16
    q4, _ = mlx_lm.load(str(convert_model(str(gguf_path), tmp_path / "q4", quantize=4, group_size=32)))
    assert q4.model.layers[0].mlp.up_proj.bits == 4


def test_convert_never_overwrites_and_leaves_nothing_half_written(tmp_path):
    gguf_path, _ = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        convert_model(str(gguf_path), out)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


def test_embedded_model_converted_answers_paris_with_mlx_lm_cli(tmp_path):
    out = tmp_path / "smollm2"
    convert = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.cli", "convert", "smollm2-135m", str(out)], capture_output=True, text=True, timeout=300
    )
    assert convert.returncode == 0, convert.stderr
    generate = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(out), "--prompt", "What is the capital of France?",
         "--temp", "0", "--max-tokens", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert generate.returncode == 0, generate.stderr
    assert "Paris" in generate.stdout
    info = describe_model(str(out))
    assert info["quantization"] == {"attention": "4-bit g32", "embedding": "8-bit g32", "mlp": "4-bit g32"}


def test_info_on_the_embedded_gguf():
    result = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.cli", "info", "smollm2-135m"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "llama, 30 layers, hidden 576" in text
    assert "parameters       134.5M" in text
    assert "attention: 4-bit g32; embedding: 8-bit g32; mlp: 4-bit g32" in text
    assert ("GGUF tensors     Q4_1 x210 -> 4-bit g32, the same values; F32 x61 -> float32; "
            "Q8_0 x1 -> 8-bit g32, the same values") in text
    assert "<|im_start|>" in text and "LoRA DPO" in text and "sampling" in text


@pytest.mark.parametrize("bits", [4, 3])
def test_info_counts_true_parameters_of_a_quantized_model(tiny_model_dirs, tmp_path, bits):
    float_dir = tiny_model_dirs[("llama", False)]
    float_info = describe_model(str(float_dir))
    quant_info = describe_model(str(convert_model(str(float_dir), tmp_path / "q", quantize=bits, group_size=32)))
    for key in ("parameters", "lora_parameters"):
        assert float_info["memory"][key] == quant_info["memory"][key]
    assert quant_info["quantization"]["mlp"] == f"{bits}-bit g32"
