"""The PEFT export, loaded by PEFT itself on torch CPU, gives the adapted MLX model's log-probs.

    .venv/bin/python -m pytest tests/test_peft.py -x -q

The base is a tiny float Llama or Qwen2 saved by mlx-lm (HF weight names and config, which
transformers reads as is); the adapter is exported with --format peft and loaded with
`PeftModel.from_pretrained`. A wrong transpose, lora_alpha or module name shows up here as
a load error or as log-probs that miss the MLX reference.
"""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from export_runs import adapted_logprobs, make_run
from mipo_mlx.export import export_run, probe_batch
from mipo_mlx.loading import load_model
from mipo_mlx.rundir import reopen_run

ATOL = 1e-3  # nats per sequence, fp32 on both sides
# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def torch_answer_logprobs(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Summed answer-token log-probs, as mipo_mlx.scoring computes them (right padding, no attention mask)."""
    tokens = torch.from_numpy(tokens).long()
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits.float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (logps * torch.from_numpy(mask)).sum(-1).numpy()


def export_and_load_peft(tmp_path, arch: str, **run_options):
    """(PEFT model, probe tokens, probe mask, MLX adapted reference, adapter_config.json) for a tiny run."""
    run_dir = make_run(tmp_path, arch, **run_options)
    base_dir = tmp_path / f"{arch}-base"
    out = tmp_path / "out"
    export_run(reopen_run(run_dir), out, ["peft"], base_model=str(base_dir))
    tokens, mask = probe_batch(run_dir, load_model(str(base_dir)).tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    config = json.loads((out / "adapter_config.json").read_text())
    return model, np.array(tokens), np.array(mask), adapted_logprobs(run_dir), config


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_on_transformers_reproduces_the_adapted_model(tmp_path, arch):
    model, tokens, mask, reference, config = export_and_load_peft(tmp_path, arch)
    np.testing.assert_allclose(torch_answer_logprobs(model, tokens, mask), reference, atol=ATOL)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["lora_alpha"] == 16.0 and "layers_to_transform" not in config  # scale 4 x rank 4, every layer
    # The adapter matters: without it transformers gives the base model's, far from the reference.
    with model.disable_adapter():
        assert np.abs(torch_answer_logprobs(model, tokens, mask) - reference).max() > 0.1


@pytest.mark.parametrize(("arch", "keys"), [("llama", ["self_attn.q_proj", "mlp.down_proj"]),
                                            ("qwen2", ["self_attn.v_proj", "mlp.up_proj"])])
def test_peft_with_some_layers_and_some_modules(tmp_path, arch, keys):
    model, tokens, mask, reference, config = export_and_load_peft(
        tmp_path, arch, num_layers=1, keys=keys, rank=2, scale=3.0)
    np.testing.assert_allclose(torch_answer_logprobs(model, tokens, mask), reference, atol=ATOL)
    # mlx-lm adapts the last num_layers layers; the tiny models have two.
    assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    assert config["target_modules"] == sorted(key.split(".")[1] for key in keys) and config["lora_alpha"] == 6.0
    adapted = sorted(name for name, _ in model.named_modules() if name.endswith(".lora_A.default"))
    assert adapted == sorted(f"base_model.model.model.layers.1.{key}.lora_A.default" for key in keys)
