"""`mipo-mlx export RUN_DIR --to OUT`: a run's adapter as MLX, PEFT, fused and GGUF files, with a model card.

    mipo-mlx export runs/quickstart --to exports/quickstart             # the recipe's export.formats
    mipo-mlx export runs/quickstart --to out --format mlx peft fused gguf
    mipo-mlx export runs/quickstart --to out --push me/smollm2-mipo      # then one commit to the Hub
    mipo-mlx export runs/quickstart --to out --push me/smollm2-mipo --dry-run

OUT is laid out as the Hub repository will be:

    README.md                  model card: recipe, training curve, before/after, how to load
    adapter_model.safetensors  PEFT adapter at the root: PeftModel.from_pretrained(base, REPO_ID)
    adapter_config.json
    mlx/                       mlx-lm adapter: mlx_lm.load(BASE, adapter_path="OUT/mlx")
    fused/                     mlx-lm model with the adapter merged: mlx_lm.load("OUT/fused")
    gguf/model.gguf            the fused model for llama.cpp
    training_curve.svg, recipe.yaml

Fusing merges the adapter into the dequantized base, which reproduces the adapted model.
`--keep-quantized` merges into the quantized base and re-quantizes: smaller, but the
outputs shift, so the log-prob drift is measured on the run's own pairs and printed.

The GGUF of a run whose base is a GGUF file (llama.cpp's Q4_K_M, Q5_0, ...) is that file
with the adapter merged: the matrices the adapter changed are written as floats, in the
fused model's type (the run's compute type, or --dtype: F32, F16 or BF16), and every other
tensor (embeddings, output, norms, biases, rope_freqs) is the source's own bytes in its own
type; the metadata, tokenizer and chat template are the source's, each value with its GGUF
type, general.file_type said anew. Floats, not K-quants again: the merged matrices are no
longer on the source's quantization grid, re-quantizing them moves the outputs, and the
gguf package cannot encode K-quants; llama.cpp's llama-quantize makes a Q4_K_M of the file.
The file is written with the gguf package's GGUFWriter, one tensor at a time, and read back
through mipo-mlx's own loader to measure its drift from the adapted model.

OUT is written in a temporary folder and renamed at the end: never half-written (what a
killed export left beside OUT goes when the next export to OUT starts).

Everything a mistake can be is checked before any work (check_export, and with --push
the repository id and the token: hub.check_push_target); the run directory is only read,
never written: its events go to the console alone.
"""

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.gguf import convert_to_gguf, permute_weights, translate_weight_names
from tokenizers import decoders

from mipo_mlx.chat import encode_answer
from mipo_mlx.console import ConsoleObserver
from mipo_mlx.convert import write_model_dir
from mipo_mlx.errors import UserError
from mipo_mlx.files import atomic_folder, remove_staging
from mipo_mlx.gguf import tensor_bytes
from mipo_mlx.gguf_file import read_gguf_header
from mipo_mlx.model_card import CardInputs, write_card
from mipo_mlx.loading import is_quantized, load_model, load_recipe_model
from mipo_mlx.lora import load_adapter
from mipo_mlx.model_sources import EMBEDDED_MODELS, embedded_model_path
from mipo_mlx.peft_format import peft_adapter, write_peft_adapter
from mipo_mlx.preflight import check_adapter, check_model, check_output_folder
from mipo_mlx.recipe import is_hub_id
from mipo_mlx.rundir import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, PAIRS_FILE, RECIPE_FILE, Run, read_pairs, reopen_run,
)
from mipo_mlx.scoring import answer_logprobs, pad_batch

logger = logging.getLogger("mipo_mlx")
FORMATS = ("mlx", "peft", "fused", "gguf")
FORMAT_DIRS = {"mlx": "mlx", "fused": "fused", "gguf": "gguf"}  # PEFT sits at the root
GGUF_FILE = "model.gguf"
# The transformers checkpoint each embedded model was quantized from (PEFT's base).
EMBEDDED_HF_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
MLX_GGUF_ARCHITECTURES = ("llama", "mistral", "mixtral")  # what mlx_lm.gguf writes
# The GGUF type of each float dtype and llama.cpp's general.file_type for a file of mostly that type.
GGUF_FLOATS = {"float32": (GGMLQuantizationType.F32, 0), "float16": (GGMLQuantizationType.F16, 1),
               "bfloat16": (GGMLQuantizationType.BF16, 32)}
WRITER_KEYS = ("general.architecture", "general.alignment")  # GGUFWriter writes these itself
PROBE_PAIRS, PROBE_TOKENS = 4, 256
PROBE_FALLBACK = ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris.")


@dataclass
class ExportResult:
    out: Path
    formats: list[str]
    base_model: str  # what PEFT users load (a Hub id when known)
    drift: dict = field(default_factory=dict)  # format -> max |log p(fused) - log p(adapted)| per sequence, nats
    files: list[Path] = field(default_factory=list)


def base_gguf_path(model_path: str) -> Path | None:
    """The GGUF file a run's base was read from, if any (its tokenizer metadata is reused)."""
    if model_path in EMBEDDED_MODELS:
        return embedded_model_path(model_path)
    return Path(model_path).expanduser() if model_path.endswith(".gguf") else None


def default_base_model(model_path: str, config: dict, peft: bool) -> str:
    """The id PEFT users load the base with; writing PEFT files (peft), a quantized or local base gets a warning."""
    if model_path in EMBEDDED_HF_IDS:
        return EMBEDDED_HF_IDS[model_path]
    if peft and (config.get("quantization") or not is_hub_id(model_path) or Path(model_path).exists()):
        logger.warning(
            f"PEFT's base_model_name_or_path is {model_path!r}, which transformers cannot load as a float model; "
            "pass --base-model with the transformers checkpoint it came from (e.g. Qwen/Qwen2.5-1.5B-Instruct)"
        )
    return model_path


def probe_batch(run_dir: Path, tokenizer) -> tuple[mx.array, mx.array]:
    """A few of the run's own pairs (both answers) as scoring input: tokens (B, T), mask (B, T-1)."""
    pairs = read_pairs(run_dir / PAIRS_FILE)[:PROBE_PAIRS] if (run_dir / PAIRS_FILE).is_file() else []
    items = [(p.prompt_messages(), text) for p in pairs for text in (p.chosen_text, p.rejected_text)]
    encoded = [encode_answer(tokenizer, messages, answer) for messages, answer in items or [PROBE_FALLBACK]]
    return pad_batch([ids[:PROBE_TOKENS] for ids, _ in encoded], [start for _, start in encoded], tokenizer.pad_token_id or 0)


def fuse_lora(model, dequantize: bool) -> list[str]:
    """Merge every LoRA layer into its base linear (mlx-lm's LoRALinear.fuse); the merged layers' paths."""
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return [name for name, _ in fused]


def _drift(model, probes, reference: mx.array) -> float:
    return mx.abs(answer_logprobs(model, *probes) - reference).max().item()


def write_gguf(path: Path, model, config: dict, tokenizer, source_gguf: Path | None, changed: list[str]) -> None:
    """A GGUF of the fused model: the source GGUF with the `changed` layers' weights replaced (module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if source_gguf is None:
        check_mlx_gguf_support(config, tokenizer)
        with tempfile.TemporaryDirectory() as folder:
            # mlx-lm's writer reads the vocabulary from a model folder's tokenizer files.
            tokenizer.save_pretrained(folder)
            convert_to_gguf(Path(folder), dict(tree_flatten(model.parameters())), config, str(path))
        return
    header = read_gguf_header(source_gguf)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # GGUFWriter's notes (endianness, file plan) tell a user nothing
    weights = dict(tree_flatten(model.parameters()))
    replaced = {translate_weight_names(f"{name}.weight"): weights[f"{name}.weight"] for name in changed}
    # The fused layers' own dtype: on a GPU they are float16 while the norms stay float32.
    float_type, file_type = GGUF_FLOATS[str(next(iter(replaced.values())).dtype).removeprefix("mlx.core.")]
    writer = GGUFWriter(str(path), header.metadata["general.architecture"])
    for key, value in header.metadata.items():
        if key not in (*WRITER_KEYS, "general.file_type"):
            kind, item_kind = header.value_types[key]
            writer.add_key_value(key, value, GGUFValueType(kind), None if item_kind is None else GGUFValueType(item_kind))
    writer.add_file_type(file_type)
    for name, tensor in header.tensors.items():
        kind = float_type if name in replaced else GGMLQuantizationType[tensor.type_name]
        block, block_bytes = GGML_QUANT_SIZES[kind]
        byte_shape = (*tensor.shape[:-1], tensor.shape[-1] // block * block_bytes)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), prod(byte_shape), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in header.tensors.items():  # one tensor in memory at a time
        if name in replaced:
            data = quantize(np.array(_llama_cpp_rows(name, replaced[name], config).astype(mx.float32)), float_type)
        else:
            data = tensor_bytes(header.path, tensor)
        writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
    writer.close()


def _llama_cpp_rows(gguf_name: str, weight: mx.array, config: dict) -> mx.array:
    """Llama's Q and K rows in llama.cpp's order (gguf.py undoes it on import); other weights as they are."""
    if config["model_type"] != "llama":
        return weight
    if gguf_name.endswith("attn_q.weight"):
        return permute_weights(weight, config["num_attention_heads"])
    if gguf_name.endswith("attn_k.weight"):
        return permute_weights(weight, config["num_attention_heads"], config["num_key_value_heads"])
    return weight


def check_mlx_gguf_support(config: dict, tokenizer) -> None:
    """mlx-lm's GGUF writer: its architectures, SentencePiece vocabularies only."""
    arch = config["model_type"]
    if arch not in MLX_GGUF_ARCHITECTURES:
        raise UserError(
            f"GGUF export of a {arch!r} model is not supported (mlx-lm writes {', '.join(MLX_GGUF_ARCHITECTURES)}); "
            "export --format fused and convert OUT/fused with llama.cpp's convert_hf_to_gguf.py",
            key="--format gguf",
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(getattr(backend, "decoder", None), decoders.ByteLevel):
        raise UserError(
            "mlx-lm's GGUF writer stores only SentencePiece vocabularies and this model's tokenizer is byte-level "
            "BPE; export --format fused and convert OUT/fused with llama.cpp's convert_hf_to_gguf.py",
            key="--format gguf",
        )


def check_export(run: Run, out: Path, formats: list[str], keep_quantized: bool) -> None:
    """What export_run needs, checked without loading anything: OUT, the flags, the run's adapter and base model."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new folder or remove it", key="--to")
    check_output_folder(out, "--to")
    if keep_quantized and "fused" not in formats:
        raise UserError("it applies to the fused model; add --format fused or drop the flag", key="--keep-quantized")
    adapter_dir = run.final_adapter
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file() or not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"{adapter_dir} holds no trained adapter; finish the run first (mipo-mlx train RECIPE --resume)", key="RUN_DIR"
        )
    check_adapter(adapter_dir, "RUN_DIR", "the run's adapter is damaged; train it again (mipo-mlx train RECIPE --resume)")
    try:
        check_model(run.recipe.model.path, key="model.path", revision=run.recipe.model.revision)
    except UserError as error:
        raise UserError(f"the run's base model: {error.message}", file=str(run.path(RECIPE_FILE)),
                        key=error.key) from None


def export_run(
    run: Run,
    out: str | Path,
    formats: list[str],
    *,
    base_model: str | None = None,
    keep_quantized: bool = False,
    dtype: str | None = None,
    repo_id: str | None = None,
) -> ExportResult:
    """Write the run's adapter in `formats` and a model card to OUT; see the module docstring."""
    out = Path(out)
    check_export(run, out, formats, keep_quantized)
    remove_staging(out.parent, out.name)
    adapter_dir = run.final_adapter
    recipe, started = run.recipe, time.time()
    source_gguf = base_gguf_path(recipe.model.path)
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    run.events.emit("stage_started", stage="export", total=len(formats), unit="formats")
    loaded = load_recipe_model(recipe.model)
    if "gguf" in formats and source_gguf is None:
        check_mlx_gguf_support(loaded.config, loaded.tokenizer)  # before any slow work
    result = ExportResult(out, list(formats),
                          base_model or default_base_model(recipe.model.path, loaded.config, "peft" in formats))
    license_ = read_gguf_header(source_gguf).metadata.get("general.license") if source_gguf else None

    with atomic_folder(out) as staging:
        shutil.copy(run.path(RECIPE_FILE), staging / RECIPE_FILE)
        if "mlx" in formats:
            (staging / FORMAT_DIRS["mlx"]).mkdir()
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                shutil.copy(adapter_dir / name, staging / FORMAT_DIRS["mlx"] / name)
        if "peft" in formats:
            tensors, peft_config = peft_adapter(
                mx.load(str(adapter_dir / ADAPTER_WEIGHTS)), adapter_config, result.base_model,
                loaded.config["num_hidden_layers"],
            )
            write_peft_adapter(staging, tensors, peft_config)
        if "fused" in formats or "gguf" in formats:
            _write_fused(staging, run, loaded, formats, keep_quantized, dtype, source_gguf, result)
        write_card(staging, CardInputs(
            run_dir=run.dir, recipe=recipe, formats=list(formats), base_model=result.base_model,
            adapter_config=adapter_config, drift=result.drift, license=license_, repo_id=repo_id,
        ))
    result.files = sorted(p for p in out.rglob("*") if p.is_file())
    run.events.emit("stage_finished", stage="export", seconds=time.time() - started, formats=list(formats),
                    out=str(out), drift=result.drift)
    run.events.close()
    return result


def _write_fused(staging: Path, run, loaded, formats, keep_quantized: bool, dtype, source_gguf, result) -> None:
    """Merge the adapter into the base for fused/ and gguf/, measuring the drift from the adapted model.

    With keep_quantized it takes loaded's model, and frees it (loaded.model is None after) before the quantized
    base loads.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    float_config = {k: v for k, v in loaded.config.items() if k not in ("quantization", "quantization_config")}
    load_adapter(model, run.final_adapter)
    probes = probe_batch(run.dir, tokenizer)
    reference = answer_logprobs(model, *probes)  # (B,) the adapted model as trained
    mx.eval(reference)
    changed = fuse_lora(model, dequantize=True)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    if "fused" in formats or source_gguf is None:  # the GGUF of a GGUF base is measured as read back, below
        result.drift["fused"] = _drift(model, probes, reference)
    if "gguf" in formats:
        gguf_path = staging / FORMAT_DIRS["gguf"] / GGUF_FILE
        write_gguf(gguf_path, model, float_config, tokenizer, source_gguf, changed)
        if source_gguf is None:
            result.drift["gguf"] = result.drift["fused"]  # mlx-lm's writer: the same weights, norms in float32
        else:  # read back as the run read its base
            result.drift["gguf"] = _drift(load_model(str(gguf_path), compute=run.recipe.model.compute).model,
                                          probes, reference)
    if "fused" not in formats:
        return
    if not keep_quantized:
        write_model_dir(staging / FORMAT_DIRS["fused"], model, float_config, tokenizer)
        return
    # One model at a time: the float one goes before the quantized one loads (export_run's LoadedModel holds it
    # too), and so does its memory, which MLX would keep cached for arrays of its sizes.
    del model
    loaded.model = None
    mx.clear_cache()
    quantized = load_recipe_model(run.recipe.model, compute="quantized")
    if not is_quantized(quantized.model):
        raise UserError("the base model is not quantized, so there is nothing to keep; drop --keep-quantized",
                        key="--keep-quantized")
    load_adapter(quantized.model, run.final_adapter)
    fuse_lora(quantized.model, dequantize=False)
    result.drift["fused"] = _drift(quantized.model, probes, reference)
    write_model_dir(staging / FORMAT_DIRS["fused"], quantized.model, quantized.config, quantized.tokenizer)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A run directory with a trained adapter, e.g. runs/quickstart.")
    parser.add_argument("--to", dest="out", required=True, metavar="OUT", help="New folder to write the export to.")
    parser.add_argument("--format", dest="formats", nargs="+", choices=FORMATS, metavar="FORMAT",
                        help="Any of mlx, peft, fused, gguf (default: the recipe's export.formats).")
    parser.add_argument("--base-model", metavar="HF_ID",
                        help="The transformers model PEFT loads the adapter onto (default: the run's model, "
                             "HuggingFaceTB/SmolLM2-135M-Instruct for smollm2-135m).")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="Fuse into the quantized base and re-quantize: smaller, but outputs shift (measured).")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="Float type of the fused weights and of the GGUF's changed matrices (default: the run's "
                             "compute type).")
    parser.add_argument("--push", metavar="REPO_ID", help="Upload OUT to this Hub repository in one commit.")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                        help="Create the Hub repository as private (default: the recipe's export.private).")
    parser.add_argument("--dry-run", action="store_true", help="With --push: list what would be uploaded, upload nothing.")


def run(args) -> int:
    from mipo_mlx.hub import check_push_target, push_folder

    finished = reopen_run(Path(args.run_dir), observers=[ConsoleObserver()])
    recipe = finished.recipe
    formats = list(dict.fromkeys(args.formats or recipe.export.formats))
    repo_id = args.push or recipe.export.repo_id
    private = recipe.export.private if args.private is None else args.private
    if args.dry_run and not repo_id:
        raise UserError("--dry-run lists what --push would upload; add --push REPO_ID", key="--dry-run")
    if repo_id:
        check_push_target(repo_id, dry_run=args.dry_run)  # export_run checks the rest before any work
    result = export_run(finished, args.out, formats, base_model=args.base_model,
                        keep_quantized=args.keep_quantized, dtype=args.dtype, repo_id=repo_id)
    peft_base = f"; PEFT base: {result.base_model}" if "peft" in result.formats else ""
    print(f"wrote {result.out} ({', '.join(result.formats)}){peft_base}")
    for name, drift in result.drift.items():
        print(f"{name}: sequence log-probs within {drift:.2e} nats of the adapted model")
    if repo_id:
        try:
            push_folder(result.out, repo_id, private=private, dry_run=args.dry_run)
        except UserError as error:
            # The export itself is done: say where, so that fixing the push does not mean exporting again.
            raise UserError(f"{error}; the export is kept in {result.out}") from None
    return 0
