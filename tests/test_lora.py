"""LoRA on float and quantized tiny models: zero start, switching off, mlx-lm format, atomic saves.

    .venv/bin/python -m pytest tests/test_lora.py -q
"""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from tiny_models import tiny_model, tiny_tokenizer

from mipo_mlx.errors import UserError
from mipo_mlx.files import atomic_folder
from mipo_mlx.lora import (
    adapter_config, adapter_disabled, apply_lora, load_adapter, lora_layers, save_adapter,
)
from mipo_mlx.recipe import LoraConfig
from mipo_mlx.rundir import ADAPTER_WEIGHTS
from mipo_mlx.scoring import token_logprobs

VARIANTS = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


def tokens():
    ids = tiny_tokenizer().encode("My cat Luna likes to sleep on the sofa in Berlin.")
    return mx.array([ids])  # (1, T)


def move_adapter(model, seed=1):
    """Give every lora_b a non-zero value, as training would."""
    mx.random.seed(seed)
    lora_b = [(k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(model.trainable_parameters()) if "lora_b" in k]
    model.load_weights(lora_b, strict=False)
    return model


@pytest.mark.parametrize("arch, quantized", VARIANTS)
def test_fresh_adapter_is_the_base_model_and_only_lora_trains(arch, quantized):
    model, _ = tiny_model(arch, quantized)
    base = token_logprobs(model, tokens())
    apply_lora(model, LoraConfig(rank=4, num_layers=1, keys=["self_attn.q_proj", "mlp.down_proj"]))
    assert len(lora_layers(model)) == 2  # the last layer only, two modules
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in trainable)
    assert mx.array_equal(token_logprobs(model, tokens()), base).item()


@pytest.mark.parametrize("arch, quantized", VARIANTS)
def test_adapter_disabled_gives_the_base_model_from_the_same_weights(arch, quantized):
    model, _ = tiny_model(arch, quantized)
    base = token_logprobs(model, tokens())
    move_adapter(apply_lora(model, LoraConfig(rank=4)))
    adapted = token_logprobs(model, tokens())
    assert mx.abs(adapted - base).max().item() > 1e-2
    with adapter_disabled(model):
        assert mx.allclose(token_logprobs(model, tokens()), base, atol=1e-5).item()
    assert mx.array_equal(token_logprobs(model, tokens()), adapted).item()  # scales are back


def test_scale_multiplies_the_update_directly_peft_alpha_is_scale_times_rank():
    model, _ = tiny_model("llama")
    lora = LoraConfig(rank=4, scale=20.0, num_layers=1, keys=["self_attn.q_proj"])
    wrapped = move_adapter(apply_lora(model, lora)).model.layers[-1].self_attn.q_proj
    x = mx.random.normal((3, wrapped.linear.weight.shape[1]))
    delta = wrapped(x) - wrapped.linear(x)
    peft_alpha = lora.scale * lora.rank  # PEFT multiplies by lora_alpha / r
    expected = (peft_alpha / lora.rank) * (x @ wrapped.lora_a) @ wrapped.lora_b
    assert mx.allclose(delta, expected, atol=1e-4).item()


def test_keys_that_match_nothing_are_a_user_error():
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match=r"lora.keys: no linear layer matched \['attn.query'\]"):
        apply_lora(model, LoraConfig(keys=["attn.query"]))


@pytest.mark.parametrize("arch, quantized", [("llama", True), ("qwen2", False)])
def test_saved_adapter_loads_in_mlx_lm_and_in_load_adapter(tmp_path, tiny_model_dirs, arch, quantized):
    model_dir = tiny_model_dirs[(arch, quantized)]
    model, tokenizer = mlx_lm.load(str(model_dir))
    lora = LoraConfig(rank=4, scale=10.0, num_layers=1, dropout=0.05)
    move_adapter(apply_lora(model, lora))
    ours = token_logprobs(model, tokens())
    path = save_adapter(model, tmp_path / "adapters", adapter_config(model, lora, str(model_dir), seed=7))

    config = json.loads((path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 1
    assert config["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.05, "keys": list(lora.keys)}
    assert config["model"] == str(model_dir) and config["mipo"] == {"seed": 7}

    loaded, _ = mlx_lm.load(str(model_dir), adapter_path=str(path))
    assert mx.allclose(token_logprobs(loaded.eval(), tokens()), ours, atol=1e-5).item()
    fresh, _ = mlx_lm.load(str(model_dir))
    load_adapter(fresh, path)
    assert mx.allclose(token_logprobs(fresh.eval(), tokens()), ours, atol=1e-5).item()


def test_a_failed_save_leaves_the_previous_adapter_whole(tmp_path):
    model, _ = tiny_model("llama")
    lora = LoraConfig(rank=4)
    apply_lora(model, lora)
    path = save_adapter(model, tmp_path / "adapters", adapter_config(model, lora, "tiny"))
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    with pytest.raises(OSError, match="disk full"), atomic_folder(path, replace=True) as staging:
        (staging / ADAPTER_WEIGHTS).write_text("half")
        raise OSError("disk full")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]  # no staging left behind


def test_a_missing_adapter_is_a_user_error(tmp_path):
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match="cannot load this adapter"):
        load_adapter(model, tmp_path / "no-adapter-here")
