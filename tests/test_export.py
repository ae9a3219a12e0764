"""`mipo-mlx export`: every format reloads and reproduces the adapted model; the card carries the run.

    .venv/bin/python -m pytest tests/test_export.py -x -q
"""

import argparse
import os
import subprocess
import sys
import weakref

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from gguf import GGUFReader, GGUFValueType

from export_runs import adapted_logprobs, logprobs_of, make_run
from mipo_mlx import export
from mipo_mlx.errors import UserError
from mipo_mlx.export import GGUF_FLOATS, export_run
from mipo_mlx.gguf import tensor_bytes
from mipo_mlx.gguf_file import read_gguf_header
from mipo_mlx.loading import is_quantized, load_model
from mipo_mlx.lora import load_adapter
from mipo_mlx.model_card import CardInputs, usage
from mipo_mlx.rundir import reopen_run
from mipo_mlx.recipe import parse_recipe


def parse_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return parser.parse_args(argv)


def greedy(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)


def test_mlx_adapter_and_fused_model_reproduce_the_adapted_model(tmp_path):
    run_dir = make_run(tmp_path, "llama")
    reference = adapted_logprobs(run_dir)
    out = tmp_path / "out"
    result = export_run(reopen_run(run_dir), out, ["mlx", "fused"])

    base_dir = tmp_path / "llama-base"
    model, tokenizer = mlx_lm.load(str(base_dir), adapter_path=str(out / "mlx"))
    np.testing.assert_allclose(logprobs_of(model, run_dir, tokenizer), reference, atol=1e-4)
    fused, tokenizer = mlx_lm.load(str(out / "fused"))
    np.testing.assert_allclose(logprobs_of(fused, run_dir, tokenizer), reference, atol=1e-3)
    assert result.drift["fused"] < 1e-3
    # Same greedy continuation from the fused model as from base + adapter.
    assert greedy(fused, tokenizer) == greedy(model, tokenizer)
    # The adapter changes the model: the base alone scores differently.
    base, _ = mlx_lm.load(str(base_dir))
    assert np.abs(logprobs_of(base, run_dir, tokenizer) - reference).max() > 0.1


def test_fusing_into_a_quantized_base_dequantizes_unless_asked(tmp_path, capsys):
    run_dir = make_run(tmp_path, "llama", quantized=True)
    reference = adapted_logprobs(run_dir)  # float32 compute on the CPU, as the run trained
    args = parse_args(str(run_dir), "--to", str(tmp_path / "float"), "--format", "fused")
    assert export.run(args) == 0
    fused, tokenizer = mlx_lm.load(str(tmp_path / "float" / "fused"))
    assert not is_quantized(fused)
    np.testing.assert_allclose(logprobs_of(fused, run_dir, tokenizer), reference, atol=1e-3)

    args = parse_args(str(run_dir), "--to", str(tmp_path / "q"), "--format", "fused", "--keep-quantized")
    assert export.run(args) == 0
    printed = capsys.readouterr().out
    requantized, _ = mlx_lm.load(str(tmp_path / "q" / "fused"))
    assert is_quantized(requantized)
    drift = np.abs(logprobs_of(requantized, run_dir, tokenizer) - reference).max()
    assert drift > 1e-3  # re-quantizing shifts outputs, which is why it is opt-in
    assert f"fused: sequence log-probs within {drift:.2e}" in printed


def test_keep_quantized_frees_the_float_model_before_the_quantized_one_loads(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, "llama", quantized=True)
    models, load = [], export.load_recipe_model

    def counted(spec, **options):
        if options.get("compute") == "quantized":
            # One model in memory at a time: the fused float one is gone, and MLX keeps none of its memory cached.
            assert models[0]() is None and mx.get_cache_memory() == 0
        loaded = load(spec, **options)
        models.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(export, "load_recipe_model", counted)
    export_run(reopen_run(run_dir), tmp_path / "q", ["fused"], keep_quantized=True)
    assert len(models) == 2 and is_quantized(mlx_lm.load(str(tmp_path / "q" / "fused"))[0])


@pytest.mark.parametrize(("arch", "dtype", "changed_type"), [("llama", None, "F32"), ("qwen2", "float16", "F16")])
def test_gguf_of_a_k_quant_base_is_the_source_with_the_changed_matrices_as_floats(tmp_path, capsys, arch, dtype,
                                                                                 changed_type):
    # Q5_0, Q4_K, Q6_K and Q8_0 tensors, as in llama.cpp's Q4_K_M files; the adapter on some of the matrices.
    keys = ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"]
    run_dir = make_run(tmp_path, arch, base="q4_k_m", keys=keys)
    reference = adapted_logprobs(run_dir)
    adapted = load_model(str(tmp_path / f"{arch}.gguf"))
    load_adapter(adapted.model, run_dir / "adapters")
    argv = [str(run_dir), "--to", str(tmp_path / "out"), "--format", "gguf"] + (["--dtype", dtype] if dtype else [])
    assert export.run(parse_args(*argv)) == 0
    path = tmp_path / "out" / "gguf" / "model.gguf"

    exported = load_model(str(path))  # as the run loaded its base: dequantized to float32 on the CPU
    tolerance = 1e-4 if dtype is None else 2e-2  # float16's rounding of the changed matrices
    np.testing.assert_allclose(logprobs_of(exported.model, run_dir, exported.tokenizer), reference, atol=tolerance)
    assert greedy(exported.model, exported.tokenizer) == greedy(adapted.model, adapted.tokenizer)
    assert "gguf: sequence log-probs within" in capsys.readouterr().out

    source, written = read_gguf_header(tmp_path / f"{arch}.gguf"), read_gguf_header(path)
    # The tiny source has no general.file_type (llama.cpp's files do: 15 for Q4_K_M); the export says its own.
    assert written.metadata == {**source.metadata, "general.file_type": GGUF_FLOATS[dtype or "float32"][1]}
    assert written.value_types == {**source.value_types, "general.file_type": (GGUFValueType.UINT32, None)}
    changed = {f"blk.{layer}.{kind}.weight" for layer in range(2) for kind in ("attn_q", "attn_k", "ffn_up")}
    assert {n: t.type_name for n, t in written.tensors.items()} == {
        n: changed_type if n in changed else t.type_name for n, t in source.tensors.items()}
    assert {source.tensors[n].type_name for n in changed} == {"Q5_0", "Q4_K"}
    assert {t.type_name for n, t in written.tensors.items() if n not in changed} == {"Q5_0", "Q6_K", "Q8_0", "F32"}
    for name in source.tensors.keys() - changed:  # the source's own bytes, for llama.cpp as for mipo-mlx
        assert (tensor_bytes(str(path), written.tensors[name]) == tensor_bytes(str(source.path), source.tensors[name])).all()
    # The gguf package's own reader (llama.cpp's Python library) reads every tensor back.
    reader = GGUFReader(path)
    assert [(t.name, t.tensor_type.name) for t in reader.tensors] == [(n, t.type_name) for n, t in written.tensors.items()]
    assert "tokenizer.chat_template" in reader.fields


def test_gguf_export_of_a_run_whose_gguf_base_was_cut_is_one_line_and_writes_nothing(tmp_path, capsys):
    from mipo_mlx import cli

    run_dir = make_run(tmp_path, "qwen2", base="q4_k_m")
    base = tmp_path / "qwen2.gguf"
    base.write_bytes(base.read_bytes()[:-1000])
    assert cli.main(["export", str(run_dir), "--to", str(tmp_path / "out"), "--format", "gguf"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "cannot read this GGUF file" in error and "it was cut short" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "words"), [("qwen2", "'qwen2' model is not supported"), ("llama", "byte-level BPE")])
def test_gguf_refusals_name_the_reason_and_write_nothing(tmp_path, arch, words):
    run_dir = make_run(tmp_path, arch)
    with pytest.raises(UserError, match=words) as caught:
        export_run(reopen_run(run_dir), tmp_path / "out", ["mlx", "gguf"])
    assert "convert_hf_to_gguf.py" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_the_peft_base_is_spoken_of_only_when_peft_files_are_written(tmp_path):
    run_dir = make_run(tmp_path, "llama", base="gguf")  # a local file, which transformers cannot load

    def export_output(out: str, formats: str) -> str:
        command = [sys.executable, "-m", "mipo_mlx.cli", "export", str(run_dir), "--to", str(tmp_path / out),
                   "--format", formats]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    printed = export_output("gguf", "gguf")
    assert "gguf: sequence log-probs within" in printed and "PEFT" not in printed
    printed = export_output("peft", "peft")
    assert "PEFT's base_model_name_or_path is" in printed and "; PEFT base: " in printed


def test_card_front_matter_metrics_examples_and_curve(tmp_path):
    run_dir = make_run(tmp_path, "llama", quantized=True, base="gguf")
    export_run(reopen_run(run_dir), tmp_path / "out", ["mlx", "peft"], repo_id="me/tiny-mipo")
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-generation"
    assert front["tags"] == ["mlx", "mipo", "dpo", "lora"] and front["base_model_relation"] == "adapter"
    assert "base_model" not in front  # a local file is not a Hub id
    assert "| adherence/overall | 2 | 0.25 [0, 0.5] | 0.75 [0.5, 1] | +0.5 [0.25, 0.75] | 0.031 |" in card
    assert "- after: Un gelato, grazie." in card
    assert "| 8 | 0.0875 | 4 | 1 |" in card  # last training step of the curve table
    assert 'PeftModel.from_pretrained(base, "me/tiny-mipo")' in card and "adapter_path=" in card
    assert "fused/" not in card.split("## Training curve")[0].split("### PEFT")[1]
    svg = (tmp_path / "out" / "training_curve.svg").read_text()
    assert svg.count("<polyline") == 3 and "![training curve](training_curve.svg)" in card
    assert "rank: 4" in card.split("## Recipe")[1]


def test_card_of_an_embedded_model_run_names_a_base_mlx_lm_can_load(tmp_path):
    run_dir = make_run(tmp_path, "llama")
    recipe = parse_recipe((run_dir / "recipe.yaml").read_text(), "recipe.yaml")
    recipe.model.path = "smollm2-135m"
    text = usage(CardInputs(run_dir=run_dir, recipe=recipe, formats=["mlx", "fused"],
                            base_model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter_config={}))
    assert 'load("HuggingFaceTB/SmolLM2-135M-Instruct", adapter_path="mipo-adapter/mlx")' in text
    assert "--model smollm2-135m" not in text
    assert "Q4_1 GGUF" in text and "the `fused/` folder reproduces the adapted model exactly" in text


def test_export_needs_a_new_folder_and_a_trained_adapter(tmp_path):
    run_dir = make_run(tmp_path, "llama")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        export.run(parse_args(str(run_dir), "--to", str(tmp_path / "taken")))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="add --push REPO_ID"):
        export.run(parse_args(str(run_dir), "--to", str(tmp_path / "o"), "--dry-run"))
    with pytest.raises(UserError, match="add --format fused"):
        export.run(parse_args(str(run_dir), "--to", str(tmp_path / "o"), "--keep-quantized"))
    with pytest.raises(UserError, match="not quantized"):
        export.run(parse_args(str(run_dir), "--to", str(tmp_path / "o"), "--format", "fused", "--keep-quantized"))
    for name in ("adapters.safetensors", "adapter_config.json"):
        (run_dir / "adapters" / name).unlink()
    with pytest.raises(UserError, match="holds no trained adapter"):
        export.run(parse_args(str(run_dir), "--to", str(tmp_path / "o")))
    with pytest.raises(UserError, match="not a run directory"):
        export.run(parse_args(str(tmp_path), "--to", str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_default_formats_come_from_the_recipe(tmp_path):
    run_dir = make_run(tmp_path, "llama")
    assert export.run(parse_args(str(run_dir), "--to", str(tmp_path / "out"))) == 0
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "mlx/adapter_config.json",
                     "mlx/adapters.safetensors", "recipe.yaml", "training_curve.svg"]
    assert mx.load(str(tmp_path / "out" / "mlx" / "adapters.safetensors")).keys() == \
        mx.load(str(run_dir / "adapters" / "adapters.safetensors")).keys()


def files_below(folder, leave_out=()) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in leave_out}


def test_export_and_compare_read_a_run_and_write_only_their_outputs(tmp_path, capsys):
    from mipo_mlx import cli

    run_dir = make_run(tmp_path, "llama")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["eval"].update(max_prompts=2, max_tokens=4, bootstrap_samples=100)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with open(run_dir / "events.jsonl", "a") as file:
        file.write('{"time": 9.0, "event": "met')  # a line a kill cut short: reading the run must keep it
    before = files_below(run_dir)
    # What a killed export to the same folder left beside it goes; nothing else there does.
    (tmp_path / ".out.partial-k1ll3d00").mkdir()
    (tmp_path / ".out.partial-k1ll3d00" / "README.md").write_text("half")

    assert cli.main(["export", str(run_dir), "--to", str(tmp_path / "out"), "--format", "mlx", "peft"]) == 0
    assert files_below(run_dir) == before
    assert not (tmp_path / ".out.partial-k1ll3d00").exists() and (tmp_path / "out" / "README.md").is_file()

    assert cli.main(["compare", str(run_dir)]) == 0
    assert files_below(run_dir, leave_out=("compare",)) == {k: v for k, v in before.items() if not k.startswith("compare")}
    assert (run_dir / "compare" / "metrics.json").read_bytes() != before["compare/metrics.json"]
    assert "== compare" in capsys.readouterr().err  # its progress went to the console instead
