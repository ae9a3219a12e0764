"""Preflight: every check of a run's inputs that needs no model in memory, before anything is written.

    from mipo_mlx.preflight import preflight
    checked = preflight(recipe, resume=False, stages=["sample", "train", "compare"])   # or a UserError

`mipo-mlx train` and `sample` call it before the run directory is made; `eval`, `info`,
`convert` and `export` call the checks that concern them (check_model, check_output_folder,
check_adapter).
Each mistake is one UserError naming the file, key or flag and the fix. It checks:

- the output folder and the run directory: output_dir is a folder that can be written,
  a run is there exactly when --resume says so (`sample` alone continues either way); a
  run to resume has a saved recipe that reads, differs from this one only in the keys a
  resume may change (rundir.RESUMABLE_CHANGES), has a pairs file whose every line is a
  sampled pair and, for training, a checkpoint that is whole (or none yet): what it
  continues from is Checked.resume;
- every data file of the recipe (data.train and data.test), read to its last line with
  the reader the stages use, and whether its prompts can give the recipe's negatives
  (data.check_negatives), in every round's part with sampling.round_prompts: split: a bad
  held-out line or prompts without the context the negative needs is found now, not after
  the sampling stage;
- the model's files, without loading its weights. An mlx-lm model directory or a Hub id
  (its snapshot in the local cache, downloaded first if it is not there): config.json,
  every model*.safetensors header against its file (dtype, shape and byte range of every
  tensor), the tokenizer files; then the LoRA keys against the modules of the layers that
  get LoRA, as the weights' names give them (model.layers.N.PATH.weight: PATH is linear
  when its weight has two dimensions or more). A .gguf file: its header, metadata and
  tensor table (gguf_file.py), every tensor's type one mipo-mlx imports and its bytes
  inside the file.

It reads the data and the headers, not the weights, and imports no mlx-lm or transformers
(seconds of imports): the quickstart's preflight, imports and all, takes well under a
second of the 5 s it may (`python bench/preflight.py`).
"""

import difflib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mipo_mlx.data import check_negatives, echoes_in, read_prompt_file, round_prompts
from mipo_mlx.errors import UserError, read_user_text, rekeyed
from mipo_mlx.files import safetensors_header
from mipo_mlx.gguf_file import read_gguf_header
from mipo_mlx.model_sources import EMBEDDED_MODELS, GGUF_LAYER_NAMES, cached_snapshot, embedded_model_path
from mipo_mlx.recipe import MOST_LAYERS, is_hub_id, read_yaml
from mipo_mlx.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECIPE_FILE, ResumePoint, no_checkpoint_left, recipe_changes, resume_point, run_dir_of

REDOWNLOAD = "download or convert the model again"
DAMAGED_RUN = "the run directory is damaged: start a new run with --set run_name=NEW"
LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")  # a module's weight in layer N, as mlx-lm names it


@dataclass
class ModelFiles:
    """What check_model read of a model: its config.json (of a GGUF file: its architecture) and the shape of every
    tensor (of a GGUF file: of the layers' tensors, under mlx-lm's names)."""

    config: dict
    shapes: dict[str, list[int]]


@dataclass
class Checked:
    """What preflight read."""

    train_prompts: int
    test_prompts: int | None
    model_config: dict | None  # the model's HF-style config.json ({"model_type"} alone for a .gguf), read without loading
    seconds: float
    resume: ResumePoint | None = None  # where a run that exists stands (None: a new run)


def preflight(recipe, *, resume: bool | None, stages: list[str], run_folder: bool = True) -> Checked:
    """Check everything `stages` (of pipeline.STAGES) of `recipe` will read before any of it is written or loaded.

    `resume`: True, the run must exist (--resume); False, it must not; None, either (`sample`
    continues a run or starts one). run_folder False: the run directory is not checked (a
    rank other than 0, which never reads it: distributed.py).
    """
    started = time.perf_counter()
    resumed = check_run_folder(recipe, resume, stages) if run_folder else None
    data = recipe.data
    train, _ = read_prompt_file(data.train, data.format, data.on_bad_line, key="data.train")
    test = None
    if data.test:
        test, _ = read_prompt_file(data.test, data.format, data.on_bad_line, key="data.test")
    elif "compare" in stages:
        raise UserError("train compares the model before and after on held-out prompts; set data.test to a JSONL "
                        "file or a bundled set, or run only `mipo-mlx sample`", key="data.test")
    model = check_model(recipe.model.path, key="model.path", revision=recipe.model.revision)
    judge = recipe.eval.judge_model
    if "compare" in stages and judge and judge != recipe.model.path:
        check_model(judge, key="eval.judge_model")
    check_lora_keys(model, recipe.lora)
    if "sample" in stages:
        check_round_prompts(train[: data.max_prompts] if data.max_prompts else train, recipe)
    return Checked(len(train), len(test) if test else None, model.config,
                   time.perf_counter() - started, resumed)


def check_round_prompts(train: list, recipe) -> None:
    """Whether every round's prompts (all of them, or its part of sampling.round_prompts: split) give its negatives."""
    rounds, mode, negative = recipe.training.rounds, recipe.sampling.round_prompts, recipe.sampling.negative
    if mode != "split" or rounds == 1:
        check_negatives(train, negative, echoes_in(recipe.sampling, rounds))
        return
    fix = "set fewer training.rounds or sampling.round_prompts: all"
    if len(train) < rounds:
        raise UserError(f"split gives each of {rounds} rounds its part of {len(train)} training prompts, and round "
                        f"{rounds} none; {fix}", key="sampling.round_prompts")
    for number in range(1, rounds + 1):
        part = round_prompts(train, number, rounds, mode)
        try:
            check_negatives(part, negative, echoes_in(recipe.sampling, number))
        except UserError as error:
            raise UserError(f"split gives round {number} of {rounds} {len(part)} of the {len(train)} training prompts, "
                            f"and {error.message}; {fix}", key="sampling.round_prompts") from None


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


def check_run_folder(recipe, resume: bool | None, stages: list[str]) -> ResumePoint | None:
    """The run directory OUTPUT_DIR/RUN_NAME, checked against `resume` (see preflight); where a run there stands."""
    check_output_folder(recipe.output_dir, "output_dir")
    run_dir = run_dir_of(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; move it or choose another run_name", key="run_name")
    started = (run_dir / RECIPE_FILE).exists()
    if resume is True and not started:
        raise UserError(f"there is no run to resume in {run_dir} (no {RECIPE_FILE}); drop --resume to start it, or "
                        "give the run_name of the run to continue", key="--resume")
    if resume is False and started:
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or --set run_name=NEW for a "
                        "new one", key="run_name")
    if not started:
        return None
    # The saved recipe is what the resume compares against: it must still read as one.
    saved = read_yaml(read_user_text(run_dir / RECIPE_FILE, what="recipe", fix=DAMAGED_RUN), str(run_dir / RECIPE_FILE))
    if not isinstance(saved, dict):
        raise UserError(f"not the recipe mipo-mlx wrote; {DAMAGED_RUN}", file=str(run_dir / RECIPE_FILE))
    recipe_changes(run_dir / RECIPE_FILE, recipe)
    point = resume_point(run_dir)
    if "train" in stages and point.damaged and point.checkpoint is None:
        raise no_checkpoint_left(run_dir, point.damaged)
    return point


def check_model(spec: str, *, key: str, revision: str | None = None) -> ModelFiles:
    """Check the model `spec` names without loading its weights; what was read of it.

    The sources are load_model's (mipo_mlx/loading.py): the embedded name, a .gguf file,
    an mlx-lm model directory, a Hub id. A mistake names `key`, the key or flag that gave `spec`.
    """
    path = Path(spec).expanduser()
    try:
        if spec in EMBEDDED_MODELS:
            return check_gguf(embedded_model_path(spec), key)
        if spec.endswith(".gguf"):
            return check_gguf(path, key)
        if path.is_dir():
            return check_model_directory(path, key)
        if path.exists():
            raise UserError(f"{spec} is a file, not an mlx-lm model directory or a .gguf file", key=key)
        if is_hub_id(spec):
            snapshot = cached_snapshot(spec, revision)
            if snapshot is None:  # not cached: downloading goes through mlx-lm, and takes longer than importing it
                from mipo_mlx.loading import hub_snapshot

                snapshot = hub_snapshot(spec, revision)
            return check_model_directory(snapshot, key)
    except UserError as error:
        raise (rekeyed(error, key) if error.key == "model.path" else error) from None
    raise UserError(f"not found: {spec}; give 'smollm2-135m', a .gguf file, an mlx-lm model directory or a Hub id "
                    "(owner/name)", key=key)


def check_gguf(path: Path, key: str) -> ModelFiles:
    """A .gguf model file whose header, metadata and tensor table read, every tensor's type imported and within the file.

    Read in Python (gguf_file.read_gguf_header) before anything reads the tensors. What is
    read: the architecture as config's model_type and the layers' tensors under mlx-lm's
    names (for check_lora_keys).
    """
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a .gguf file", key=key)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}", key=key)
    try:
        header = read_gguf_header(path)
    except UserError as error:
        raise UserError(f"{path}: {error.message}", key=key) from None
    shapes = {}
    for name, tensor in header.tensors.items():
        parts = name.split(".")  # blk.N.KIND.weight
        if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in GGUF_LAYER_NAMES:
            shapes[f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.weight"] = list(tensor.shape)
    return ModelFiles({"model_type": str(header.metadata.get("general.architecture", "GGUF"))}, shapes)


def read_json_file(path: Path, key: str, fix: str):
    """A JSON file of a model, parsed; a mistake names file:line:column."""
    text = read_user_text(path, what="JSON file", fix=fix, key=key)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); {fix}", key=key) from None
    except (ValueError, RecursionError) as error:
        raise UserError(f"{path}: not readable JSON ({error.__class__.__name__}); {fix}", key=key) from None


def check_model_directory(path: Path, key: str) -> ModelFiles:
    """config.json, the safetensors weights and the tokenizer files of an mlx-lm model directory."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; give an mlx-lm model directory, a .gguf file or a Hub id", key=key)
    config = read_json_file(path / "config.json", key, REDOWNLOAD)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{path / 'config.json'}: no \"model_type\" (such as \"llama\" or \"qwen2\"); {REDOWNLOAD}",
                        key=key)
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and not 0 < layers <= MOST_LAYERS:  # mlx-lm would build them all
        raise UserError(f"its config.json gives num_hidden_layers {layers}, not a model's (1 to {MOST_LAYERS}); "
                        f"{REDOWNLOAD}", key=key)
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
    shapes = {}
    for file in weights:
        shapes.update({name: info["shape"] for name, info in check_safetensors(file, key).items()})
    check_tokenizer_files(path, key)
    return ModelFiles(config, shapes)


def check_safetensors(path: Path, key: str) -> dict:
    """The header of a safetensors file and every tensor's byte range, against the file's size (files.safetensors_header)."""
    try:
        return safetensors_header(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: {error}; the file is truncated or damaged; {REDOWNLOAD}", key=key) from None


def check_adapter(directory: Path, key: str, fix: str) -> None:
    """An adapter directory's two files read: the safetensors header against the file, the config a JSON object."""
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise UserError(f"{directory} has no {path.name}; {fix}", key=key)
    try:
        safetensors_header(weights)
    except (OSError, ValueError) as error:
        raise UserError(f"{weights}: {error}; {fix}", key=key) from None
    if not isinstance(read_json_file(config, key, fix), dict):
        raise UserError(f"{config}: not an adapter config; {fix}", key=key)


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


def check_lora_keys(model: ModelFiles, lora) -> None:
    """Every lora.keys entry names a linear module of the layers that get LoRA (the last lora.num_layers).

    The modules are those the weights name, model.layers.N.PATH.weight, as mlx-lm's model has
    them: PATH is linear when its weight has two dimensions or more (quantized weights too).
    Weights named otherwise are left to mlx-lm, which says what it does not find when it loads them.
    """
    kind = model.config["model_type"]
    layers: dict[int, dict[str, int]] = {}  # layer -> {module path: dimensions of its weight}
    for name, shape in model.shapes.items():
        match = LAYER_WEIGHT.fullmatch(name)
        if match:
            layers.setdefault(int(match[1]), {})[match[2]] = len(shape)
    if not layers:
        return
    count = max(layers) + 1
    first = 0 if lora.num_layers == -1 else max(count - lora.num_layers, 0)
    modules: dict[str, int] = {}
    for index in sorted(layers):
        if index >= first:
            for path, dims in layers[index].items():
                modules.setdefault(path, dims)
    linear = sorted(path for path, dims in modules.items() if dims >= 2)
    for index, entry in enumerate(lora.keys):
        if entry in linear:
            continue
        inside = [path for path in linear if path.startswith(f"{entry}.")]
        if entry in modules:
            problem = f"{entry!r} is not a linear module (its weight is a vector: a norm)"
        elif inside:
            problem = f"{entry!r} is not a linear module but holds {len(inside)} ({', '.join(inside)})"
        else:
            problem = f"{entry!r} is no module of a {kind} layer"
        close = difflib.get_close_matches(entry, linear, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the linear modules of a layer: {', '.join(linear)}"
        raise UserError(f"{problem}; {hint}", key=f"lora.keys[{index}]")
