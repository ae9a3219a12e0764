"""Preflight: every check of a run's inputs that needs no model in memory, before anything is written.

    from mipo_mlx.preflight import preflight
    checked = preflight(recipe, resume=False, stages=["sample", "train", "compare"])   # or a UserError

`mipo-mlx train` and `sample` call it before the run directory is made; `eval`, `info`
and `convert` call the checks that concern them (check_model, check_output_folder).
Each mistake is one UserError naming the file, key or flag and the fix. It checks:

- the output folder and the run directory: output_dir is a folder that can be written,
  a run is there exactly when --resume says so (`sample` alone continues either way);
- every data file of the recipe (data.train and data.test), read to its last line with
  the reader the stages use, and the pairs planned from it (sampling.plan_pairs): a bad
  held-out line or prompts without the context the negative needs is found now, not
  after the sampling stage;
- the model's files, without loading its weights. An mlx-lm model directory or a Hub id
  (its snapshot in the local cache, downloaded first if it is not there): config.json,
  every model*.safetensors header against its file (dtype, shape and byte range of every
  tensor), the tokenizer files; then the LoRA keys against the modules of mlx-lm's model
  class built from config.json (MLX arrays are lazy: no weight is read or computed). A
  .gguf file is checked for being a file.

It reads the data and the headers, not the weights: the quickstart's checks take 0.05 s;
the mlx-lm import it triggers, which the first stage needs anyway, takes the rest
(`python bench/preflight.py`).
"""

import difflib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mipo_mlx.data import read_prompt_file
from mipo_mlx.errors import UserError, read_user_text, rekeyed
from mipo_mlx.recipe import MOST_LAYERS, is_hub_id, read_yaml
from mipo_mlx.rundir import RECIPE_FILE, run_dir_of

# Bytes per element of each safetensors dtype (the format's own table).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
LARGEST_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors format refuses longer headers
REDOWNLOAD = "download or convert the model again"
DAMAGED_RUN = "the run directory is damaged: start a new run with --set run_name=NEW"


@dataclass
class Checked:
    """What preflight read."""

    train_prompts: int
    test_prompts: int | None
    model_config: dict | None  # the model's HF-style config.json, when read without loading (not yet for a .gguf)
    seconds: float


def preflight(recipe, *, resume: bool | None, stages: list[str]) -> Checked:
    """Check everything `stages` (of pipeline.STAGES) of `recipe` will read before any of it is written or loaded.

    `resume`: True, the run must exist (--resume); False, it must not; None, either (`sample`
    continues a run or starts one).
    """
    started = time.perf_counter()
    check_run_folder(recipe, resume)
    data = recipe.data
    train, _ = read_prompt_file(data.train, data.format, data.on_bad_line, key="data.train")
    test = None
    if data.test:
        test, _ = read_prompt_file(data.test, data.format, data.on_bad_line, key="data.test")
    elif "compare" in stages:
        raise UserError("train compares the model before and after on held-out prompts; set data.test to a JSONL "
                        "file or a bundled set, or run only `mipo-mlx sample`", key="data.test")
    config = check_model(recipe.model.path, key="model.path", revision=recipe.model.revision)
    judge = recipe.eval.judge_model
    if "compare" in stages and judge and judge != recipe.model.path:
        check_model(judge, key="eval.judge_model")
    if config is not None:
        check_lora_keys(config, recipe.lora)
    if "sample" in stages:
        from mipo_mlx.sampling import plan_pairs  # imports mlx-lm: after the checks that need nothing of it

        records = train[: data.max_prompts] if data.max_prompts else train
        plan_pairs(records, recipe.sampling.negative, recipe.sampling.negatives_per_prompt, recipe.seed)
    return Checked(len(train), len(test) if test else None, config, time.perf_counter() - started)


def check_output_folder(path: str | Path, key: str) -> None:
    """`path` is a folder, or can be made as one, that this process can write in; nothing is left behind."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = f"{existing} is a file" if existing == path else f"{existing} is a file, so {path} cannot be made"
        raise UserError(f"{where}; give a folder", key=key)
    # Permissions, ACLs, read-only mounts and root's exceptions all answer a real attempt alike.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mipo-mlx-write-check-", dir=existing))
    except OSError as error:
        raise UserError(f"cannot write in {existing} ({error.strerror}); choose a folder you can write to",
                        key=key) from None


def check_run_folder(recipe, resume: bool | None) -> None:
    """The run directory OUTPUT_DIR/RUN_NAME, checked against `resume` (see preflight)."""
    check_output_folder(recipe.output_dir, "output_dir")
    run_dir = run_dir_of(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; move it or choose another run_name", key="run_name")
    started = (run_dir / RECIPE_FILE).exists()
    if started and resume is not False:
        # The saved recipe is what the resume compares against: it must still read as one.
        saved = read_yaml(read_user_text(run_dir / RECIPE_FILE, what="recipe", fix=DAMAGED_RUN), str(run_dir / RECIPE_FILE))
        if not isinstance(saved, dict):
            raise UserError(f"not the recipe mipo-mlx wrote; {DAMAGED_RUN}", file=str(run_dir / RECIPE_FILE))
    if resume is True and not started:
        raise UserError(f"there is no run to resume in {run_dir} (no {RECIPE_FILE}); drop --resume to start it, or "
                        "give the run_name of the run to continue", key="--resume")
    if resume is False and started:
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or --set run_name=NEW for a "
                        "new one", key="run_name")


def check_model(spec: str, *, key: str, revision: str | None = None) -> dict | None:
    """Check the model `spec` names without loading its weights; its config.json, when it has one.

    The sources are load_model's (mipo_mlx/loading.py): the embedded name, a .gguf file,
    an mlx-lm model directory, a Hub id. A mistake names `key`, the key or flag that gave `spec`.
    """
    path = Path(spec).expanduser()
    try:
        # Only a bare name can be an embedded model's, which load_model tries first; asking
        # imports mlx-lm (seconds), which a path to a directory or a .gguf file does without.
        if "/" not in spec and os.sep not in spec and not spec.endswith(".gguf"):
            from mipo_mlx.loading import EMBEDDED_MODELS, embedded_model_path

            if spec in EMBEDDED_MODELS:
                return check_gguf(embedded_model_path(spec), key)
        if spec.endswith(".gguf"):
            return check_gguf(path, key)
        if path.is_dir():
            return check_model_directory(path, key)
        if path.exists():
            raise UserError(f"{spec} is a file, not an mlx-lm model directory or a .gguf file", key=key)
        if is_hub_id(spec):
            from mipo_mlx.loading import _hub_snapshot

            return check_model_directory(_hub_snapshot(spec, revision), key)
    except UserError as error:
        raise (rekeyed(error, key) if error.key == "model.path" else error) from None
    raise UserError(f"not found: {spec}; give 'smollm2-135m', a .gguf file, an mlx-lm model directory or a Hub id "
                    "(owner/name)", key=key)


def check_gguf(path: Path, key: str) -> None:
    """A .gguf model is a file (its header and tensor table are read by the GGUF loader)."""
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a .gguf file", key=key)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}", key=key)
    return None


def read_json_file(path: Path, key: str, fix: str):
    """A JSON file of a model, parsed; a mistake names file:line:column."""
    text = read_user_text(path, what="JSON file", fix=fix, key=key)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); {fix}", key=key) from None
    except (ValueError, RecursionError) as error:
        raise UserError(f"{path}: not readable JSON ({error.__class__.__name__}); {fix}", key=key) from None


def check_model_directory(path: Path, key: str) -> dict:
    """config.json, the safetensors weights and the tokenizer files of an mlx-lm model directory; its config."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; give an mlx-lm model directory, a .gguf file or a Hub id", key=key)
    config = read_json_file(path / "config.json", key, REDOWNLOAD)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{path / 'config.json'}: no \"model_type\" (such as \"llama\" or \"qwen2\"); {REDOWNLOAD}",
                        key=key)
    # mlx-lm reads model*.safetensors and nothing else.
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        pytorch = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if pytorch:
            raise UserError(
                f"{path} has PyTorch weights ({', '.join(pytorch[:2])}) but no model*.safetensors, the only weights "
                "MLX reads; save them as safetensors (transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(NEW_DIR)), then give NEW_DIR or convert it with mipo-mlx convert or mlx_lm.convert",
                key=key,
            )
        raise UserError(f"{path} has no model*.safetensors weights; {REDOWNLOAD}", key=key)
    for file in weights:
        check_safetensors(file, key)
    check_tokenizer_files(path, key)
    return config


def _tensor_problem(info, data_bytes: int) -> str | None:
    """What is wrong with one safetensors header entry, or None."""
    if not isinstance(info, dict):
        return "has no dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    natural = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if dtype not in SAFETENSORS_DTYPES:
        return f"has an unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(natural(d) for d in shape):
        return f"has a malformed shape {str(shape)[:40]}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(natural(o) for o in offsets) or offsets[0] > offsets[1]:
        return f"has malformed data_offsets {str(offsets)[:40]}"
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != needed:
        return f"spans {offsets[1] - offsets[0]} bytes, but {dtype} of shape {shape} needs {needed}"
    if offsets[1] > data_bytes:
        return f"ends at byte {offsets[1]} of the tensor data, but the file holds {data_bytes}"
    return None


def check_safetensors(path: Path, key: str) -> None:
    """The header of a safetensors file (8-byte length, JSON) and every tensor's byte range, against the file's size."""
    size = path.stat().st_size
    damaged = f"the file is truncated or damaged; {REDOWNLOAD}"
    with path.open("rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, LARGEST_SAFETENSORS_HEADER):
            raise UserError(f"{path}: {size} bytes, too few for the header its first 8 bytes announce; {damaged}",
                            key=key)
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the header is not a safetensors JSON header; {damaged}", key=key)
    data_bytes = size - 8 - length
    for name, info in header.items():
        problem = None if name == "__metadata__" else _tensor_problem(info, data_bytes)
        if problem:
            raise UserError(f"{path}: tensor {name[:80]!r} {problem}; {damaged}", key=key)


def check_tokenizer_files(path: Path, key: str) -> None:
    """The files transformers' AutoTokenizer builds a tokenizer from, and its JSON files readable."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            read_json_file(path / name, key, REDOWNLOAD)
    present = {p.name for p in path.iterdir()}
    if not ({"tokenizer.json", "tokenizer.model", "tiktoken.model"} & present or {"vocab.json", "merges.txt"} <= present
            or any(name.endswith(".tiktoken") for name in present)):
        raise UserError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json and merges.txt); "
                        "copy the tokenizer files from the model's original repository", key=key)


def check_lora_keys(config: dict, lora) -> None:
    """Every lora.keys entry names a linear module of the layers that get LoRA, in mlx-lm's class for `config`.

    The model is built from its config alone: MLX arrays are lazy, so no weight is read or computed.
    """
    kind = config["model_type"]
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and not 0 < layers <= MOST_LAYERS:  # building that many would not end
        raise UserError(f"its config.json gives num_hidden_layers {layers}, not a model's (1 to {MOST_LAYERS}); "
                        f"{REDOWNLOAD}", key="model.path")
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    from mipo_mlx.lora import num_lora_layers

    try:
        model_class, args_class = _get_classes(config)
    except ValueError:
        raise UserError(f"model_type {kind!r} is not an architecture mlx-lm knows; use a Llama or Qwen model",
                        key="model.path") from None
    try:
        model = model_class(args_class.from_dict(config))
    except Exception as error:  # a config.json missing a setting or holding a wrong one fails in many ways
        reason = " ".join(str(error).split())[:120]
        raise UserError(f"its config.json does not describe a {kind} model mlx-lm can build "
                        f"({error.__class__.__name__}: {reason}); {REDOWNLOAD}", key="model.path") from None
    modules = {}
    for layer in model.layers[len(model.layers) - num_lora_layers(model, lora.num_layers):]:
        for name, module in layer.named_modules():
            modules.setdefault(name, module)
    linear = [name for name, module in modules.items() if isinstance(module, (nn.Linear, nn.QuantizedLinear))]
    for index, entry in enumerate(lora.keys):
        if entry in linear:
            continue
        found = modules.get(entry)
        problem = (f"{entry!r} is not a linear module (it is {type(found).__name__})" if found is not None
                   else f"{entry!r} is no module of a {kind} layer")
        close = difflib.get_close_matches(entry, linear, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the linear modules of a layer: {', '.join(sorted(linear))}"
        raise UserError(f"{problem}; {hint}", key=f"lora.keys[{index}]")
