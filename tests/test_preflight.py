"""Preflight: what passes it, what it reads, and that a failed start leaves nothing behind.

The mistakes themselves, one line each, are the corpus of tests/test_broken_inputs.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mipo_mlx.errors import UserError
from mipo_mlx.gguf_file import TENSOR_TYPES, read_gguf_header
from mipo_mlx.model_sources import embedded_model_path
from mipo_mlx.pipeline import STAGES
from mipo_mlx.preflight import (check_gguf, check_lora_keys, check_model, check_output_folder, check_safetensors,
                                preflight)
from mipo_mlx.recipe import LoraConfig, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"id": f"p{i}", "prompt": question, "context": context}
    for i, (question, context) in enumerate([
        ("What should I cook tonight?", "I am vegetarian."),
        ("How do I relax after work?", "I work night shifts."),
        ("Which book should I read?", "I like short science fiction."),
        ("What should I pack for a trip?", "Use bullet points."),
    ])
]
TINY_RUN = ["sampling.max_tokens=4", "sampling.batch_size=4", "training.max_steps=1", "training.batch_size=2",
            "training.eval_fraction=0.0", "eval.max_prompts=2", "eval.max_tokens=4", "eval.bootstrap_samples=100"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def recipe_text(model, train, test, output_dir, **sections) -> str:
    text = f"model: {{path: {model}}}\ndata: {{train: {train}, test: {test}}}\noutput_dir: {output_dir}\nrun_name: run\n"
    return text + "".join(f"{key}: {value}\n" for key, value in sections.items())


def test_quickstart_preflight_reads_every_prompt_and_writes_nothing(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={tmp_path / 'runs'}"])
    checked = preflight(recipe, resume=False, stages=list(STAGES))
    assert (checked.train_prompts, checked.test_prompts) == (144, 48)
    assert list(tmp_path.iterdir()) == []


def test_a_model_directory_passes_and_its_config_and_lora_keys_are_read(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", PROMPTS)
    recipe = parse_recipe(recipe_text(tiny_model_dir, train, train, tmp_path / "runs"), "r.yaml")
    checked = preflight(recipe, resume=None, stages=list(STAGES))
    assert checked.model_config["model_type"] == json.loads((tiny_model_dir / "config.json").read_text())["model_type"]
    assert checked.model_config["num_hidden_layers"] == 2
    assert not (tmp_path / "runs").exists()


def test_lora_keys_are_checked_in_the_layers_that_get_lora(tiny_model_dirs):
    model = check_model(str(tiny_model_dirs[("qwen2", True)]), key="model.path")  # quantized: the same modules
    check_lora_keys(model, LoraConfig(keys=["self_attn.q_proj", "mlp.down_proj"], num_layers=1))
    with pytest.raises(UserError, match=r"lora.keys\[0\]: 'mlp.up' is no module of a qwen2 layer; did you mean "
                                        r"'mlp.up_proj'\?"):
        check_lora_keys(model, LoraConfig(keys=["mlp.up"]))
    with pytest.raises(UserError, match=r"'self_attn' is not a linear module but holds 4 \(self_attn.k_proj, "
                                        r"self_attn.o_proj, self_attn.q_proj, self_attn.v_proj\)"):
        check_lora_keys(model, LoraConfig(keys=["self_attn"]))
    with pytest.raises(UserError, match=r"lora.keys\[1\]: 'post_attention_layernorm' is not a linear module"):
        check_lora_keys(model, LoraConfig(keys=["mlp.up_proj", "post_attention_layernorm"]))


def test_the_lora_key_check_sees_the_modules_mlx_lm_wraps(tiny_model_dirs):
    """The modules the weights' names give are those mlx-lm's LoRA conversion finds, for every tiny variant."""
    from mipo_mlx.lora import apply_lora, lora_layers
    from mipo_mlx.loading import load_model

    for (arch, quantized), path in tiny_model_dirs.items():
        model = check_model(str(path), key="model.path")
        keys = sorted({name.split(".", 3)[3].rsplit(".", 1)[0] for name, shape in model.shapes.items()
                       if name.startswith("model.layers.") and name.endswith(".weight") and len(shape) >= 2})
        check_lora_keys(model, LoraConfig(keys=keys))
        loaded = load_model(str(path), compute="quantized")
        apply_lora(loaded.model, LoraConfig(keys=keys))
        assert len(lora_layers(loaded.model)) == len(keys) * model.config["num_hidden_layers"], (arch, quantized)


def test_every_tensor_of_a_safetensors_file_is_checked_against_its_size(tmp_path, tiny_model_dirs):
    source = tiny_model_dirs[("llama", True)] / "model.safetensors"
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    check_safetensors(source, "model.path")

    def rewritten(change) -> Path:
        changed = json.loads(json.dumps(header))
        change(changed)
        raw = json.dumps(changed).encode()
        path = tmp_path / "model.safetensors"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])
        return path

    name = next(n for n in header if n != "__metadata__")
    for change, problem in [
        (lambda h: h[name].update(dtype="F12"), "unknown dtype 'F12'"),
        (lambda h: h[name].update(shape=[-1, 4]), "malformed shape"),
        (lambda h: h[name].update(shape=h[name]["shape"] + [2]), "bytes, but"),
        (lambda h: h[name].update(data_offsets=[10, 5]), "malformed data_offsets"),
    ]:
        with pytest.raises(UserError, match=problem):
            check_safetensors(rewritten(change), "model.path")


def test_a_gguf_header_reads_as_gguf_py_reads_it():
    import gguf

    path = embedded_model_path("smollm2-135m")
    header, reference = read_gguf_header(path), gguf.GGUFReader(path)
    assert {name: (t.type_name, t.shape[::-1], t.offset, t.nbytes) for name, t in header.tensors.items()} == {
        t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
        for t in reference.tensors}
    assert set(header.metadata) == {name for name in reference.fields if not name.startswith("GGUF.")}
    # Each value's type as gguf-py reads it: [kind], or [ARRAY, item kind] for an array.
    assert {key: [kind for kind in types if kind is not None] for key, types in header.value_types.items()} == {
        key: list(reference.fields[key].types) for key in header.metadata}
    assert header.metadata["general.architecture"] == "llama"
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152
    types = [gguf.constants.GGMLQuantizationType(number) for number in TENSOR_TYPES]
    assert TENSOR_TYPES == {t.value: (t.name, *gguf.constants.GGML_QUANT_SIZES[t]) for t in types}


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    from gguf_fixtures import write_tiny_gguf

    path, _ = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", "llama", "Q4_0")
    return path.read_bytes()


def test_a_gguf_file_cut_anywhere_is_one_user_error(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_gguf_bytes)
    check_gguf(path, "model.path")
    for cut in [0, 3, 23, 24, 25, *range(32, len(tiny_gguf_bytes), 97), len(tiny_gguf_bytes) - 1]:
        path.write_bytes(tiny_gguf_bytes[:cut])
        with pytest.raises(UserError, match=r"m\.gguf: cannot read this GGUF file.*download it again"):
            check_gguf(path, "model.path")


def test_a_damaged_gguf_that_passes_preflight_loads_or_is_one_user_error(tmp_path, tiny_gguf_bytes):
    """Bytes of the header and tensor table overwritten at random: what preflight lets through, the loader
    loads or refuses with a UserError (one line for the user), never another exception or a signal."""
    import random

    rng, passed = random.Random(0), []
    header_end = 9216  # where the tiny file's tensor data starts
    for index in range(120):
        damaged = bytearray(tiny_gguf_bytes)
        for _ in range(rng.choice([1, 2, 8])):
            damaged[rng.randrange(8, header_end)] = rng.randrange(256)
        path = tmp_path / f"{index}.gguf"
        path.write_bytes(bytes(damaged))
        try:
            check_gguf(path, "model.path")
        except UserError:
            continue
        passed.append(str(path))
    assert 10 < len(passed) < 120  # some damage is caught, some is only in values
    code = ("import sys\nfrom mipo_mlx.errors import UserError\nfrom mipo_mlx.loading import load_model\n"
            "for path in sys.argv[1:]:\n    try:\n        load_model(path, compute='quantized')\n"
            "    except UserError:\n        pass\n")
    loaded = subprocess.run([sys.executable, "-c", code, *passed], capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-2000:]


def test_output_folder_check_leaves_no_trace(tmp_path):
    check_output_folder(tmp_path / "a" / "b", "output_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="output_dir: .*file is a file, so .*file/runs cannot be made; give a folder"):
        check_output_folder(tmp_path / "file" / "runs", "output_dir")


def test_model_sources_name_the_key_or_flag_that_gave_them(tmp_path):
    with pytest.raises(UserError, match=r"^MODEL: not found: ./nope; give 'smollm2-135m'"):
        check_model("./nope", key="MODEL")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"^--judge-model: .*notes.txt is a file, not an mlx-lm model directory"):
        check_model(str(tmp_path / "notes.txt"), key="--judge-model")
    embedded = check_model("smollm2-135m", key="model.path")  # a GGUF file: its architecture and layer tensors
    assert embedded.config == {"model_type": "llama"} and len(embedded.shapes) == 30 * 9
    assert embedded.shapes["model.layers.29.self_attn.q_proj.weight"] == [576, 576]


def test_lora_keys_of_a_gguf_model_are_checked_before_it_loads():
    embedded = check_model("smollm2-135m", key="model.path")
    check_lora_keys(embedded, LoraConfig())
    with pytest.raises(UserError, match=r"^lora.keys\[0\]: 'self_attn.q_prj' is no module of a llama layer; did you "
                                        r"mean 'self_attn.q_proj'\?"):
        check_lora_keys(embedded, LoraConfig(keys=["self_attn.q_prj"]))
    with pytest.raises(UserError, match=r"'input_layernorm' is not a linear module"):
        check_lora_keys(embedded, LoraConfig(keys=["input_layernorm"]))


def test_preflight_imports_no_mlx_lm_or_transformers(tmp_path):
    """What keeps a mistake to seconds: the checks themselves need neither (importing them takes seconds)."""
    code = ("import sys; from mipo_mlx.pipeline import STAGES; from mipo_mlx.preflight import preflight; "
            "from mipo_mlx.recipe import load_recipe; "
            f"preflight(load_recipe({str(ROOT / 'recipes' / 'quickstart.yaml')!r}, ['output_dir={tmp_path}']), "
            "resume=False, stages=list(STAGES)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx_lm', 'transformers', 'torch')))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def test_a_failed_start_leaves_nothing_and_the_same_command_then_runs(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs[("llama", False)]
    train = write_jsonl(tmp_path / "train.jsonl", PROMPTS)
    test = write_jsonl(tmp_path / "test.jsonl", [PROMPTS[0], '{"prompt": "Tea?", "context": }'])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(model, train, test, tmp_path / "runs", sampling="{negative: drop_context}"))
    command = [sys.executable, "-m", "mipo_mlx.cli", "train", str(recipe)]
    for override in TINY_RUN:
        command += ["--set", override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    failed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()]
    assert f"data.test: {test}:2: not valid JSON" in failed.stderr
    assert not (tmp_path / "runs").exists()

    write_jsonl(test, PROMPTS[:2])
    fixed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (tmp_path / "runs" / "run" / "adapters" / "adapters.safetensors").is_file()
    assert (tmp_path / "runs" / "run" / "compare" / "metrics.json").is_file()
