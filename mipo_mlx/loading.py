"""One loader for every model source, and the compute policy for its weights.

    loaded = load_model("smollm2-135m")                      # the embedded model
    loaded = load_model("mlx-community/Qwen2.5-1.5B-Instruct-4bit")
    loaded = load_model("path/to/model.gguf", compute="quantized")
    loaded = load_recipe_model(recipe.model)                  # path, compute and revision of a recipe
    loaded.model, loaded.tokenizer                            # mlx-lm model and TokenizerWrapper

A model is the embedded short name, a `.gguf` file (Llama or Qwen2), an mlx-lm model
directory, or a Hub id read through mlx-lm (from the local cache when offline).

Compute policy: `auto` keeps quantized weights on Metal and CUDA (QLoRA) and dequantizes
them to float32 on MLX's CPU backend, where quantized matmul is ~30x slower than an
optimized BLAS on float32.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, dequantize_model, load_model as mlx_lm_load_model, load_tokenizer

from mipo_mlx.errors import UserError
from mipo_mlx.gguf import load_gguf
from mipo_mlx.model_sources import EMBEDDED_MODELS, embedded_model_path
from mipo_mlx.preflight import check_gguf
from mipo_mlx.recipe import is_hub_id

logger = logging.getLogger("mipo_mlx")
COMPUTE_CHOICES = ("auto", "quantized", "float32", "float16", "bfloat16")
_told_about_dequantizing = False


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict  # HF-style config of the source, with "quantization" when the source is quantized
    source: str  # what was loaded: the embedded name, a path or a Hub id
    compute: str  # "quantized", "float32", "float16" or "bfloat16": the weights as they are now


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A Hub model's local snapshot: from the cache first (no network), else downloaded by mlx-lm."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, _download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS, local_files_only=True))
    except (FileNotFoundError, HFValidationError):
        pass
    try:
        return _download(repo_id, revision=revision)
    except GatedRepoError:
        problem = "is gated on the Hub; accept its terms on huggingface.co, run `hf auth login`, then retry"
    except RepositoryNotFoundError:
        problem = "is not on the Hub (or is private); check the id, or run `hf auth login` for a private model"
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} of {repo_id} does not exist on the Hub", key="model.revision") from None
    except HFValidationError:
        problem = "is not a valid Hub id (owner/name)"
    except Exception:  # offline, DNS, proxy, timeouts, Hub down: all mean "not reachable"
        problem = (
            f"is neither in the local Hugging Face cache ({constants.HF_HUB_CACHE}) nor reachable; download it on a "
            f"connected machine with `hf download {repo_id}` and copy the cache, or give a local path"
        )
    raise UserError(f"{repo_id} {problem}", key="model.path")


def _load_directory(path: Path) -> tuple[nn.Module, TokenizerWrapper, dict]:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; give an mlx-lm model directory, a .gguf file or a Hub id", key="model.path")
    declared = json.loads((path / "config.json").read_text(encoding="utf-8"))  # preflight's check_model read it
    kind = declared.get("model_type")
    try:
        _get_classes(declared)
    except ValueError:
        raise UserError(f"model_type {kind!r} is not an architecture mlx-lm knows; use a Llama or Qwen model",
                        key="model.path") from None
    try:
        model, config = mlx_lm_load_model(path)
    except ValueError as error:
        raise UserError(f"{path}: {' '.join(str(error).split())}", key="model.path") from None
    except Exception as error:  # a config.json missing a setting or holding a wrong one fails in many ways
        reason = " ".join(str(error).split())[:120]
        raise UserError(f"{path / 'config.json'} does not describe a {kind} model mlx-lm can build "
                        f"({error.__class__.__name__}: {reason}); download or convert the model again",
                        key="model.path") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def resolve_compute(requested: str, model: nn.Module) -> str:
    """What `auto` means here: on a GPU (Metal, CUDA) the weights as stored, on the CPU backend float32."""
    if requested not in COMPUTE_CHOICES:
        raise UserError(f"expected one of {', '.join(COMPUTE_CHOICES)}, got {requested!r}", key="model.compute")
    if requested != "auto":
        return requested
    return weights_kind(model) if mx.default_device() == mx.gpu else "float32"


def apply_compute(model: nn.Module, compute: str) -> nn.Module:
    """Dequantize and cast the weights for `compute` ("quantized" leaves quantized layers as they are)."""
    if compute == "quantized":
        return model
    if is_quantized(model):
        model = dequantize_model(model)
    # Every float parameter (norms and biases too) gets the one compute dtype.
    model.set_dtype(getattr(mx, compute))
    mx.eval(model.parameters())
    return model


def _say_once_why_cpu_dequantizes() -> None:
    global _told_about_dequantizing
    if not _told_about_dequantizing:
        logger.info(
            "CPU backend: dequantized the weights to float32 (quantized matmul is ~30x slower than "
            "float32 with a fast BLAS on the CPU); set model.compute: quantized to keep them quantized"
        )
        _told_about_dequantizing = True


def load_model(spec: str, *, compute: str = "auto", revision: str | None = None) -> LoadedModel:
    """Load a model from any source the project accepts; see the module docstring."""
    if spec in EMBEDDED_MODELS:
        model, tokenizer, config = load_gguf(embedded_model_path(spec))
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        check_gguf(path, key="model.path")  # a damaged file crashes MLX's reader: read its header in Python first
        model, tokenizer, config = load_gguf(path)
    elif Path(spec).expanduser().exists():
        model, tokenizer, config = _load_directory(Path(spec).expanduser())
    elif is_hub_id(spec):
        model, tokenizer, config = _load_directory(hub_snapshot(spec, revision))
    else:
        raise UserError(
            f"not found: {spec}; give 'smollm2-135m', a .gguf file, an mlx-lm model directory or a Hub id (owner/name)",
            key="model.path",
        )
    chosen = resolve_compute(compute, model)
    if compute == "auto" and chosen == "float32" and is_quantized(model):
        _say_once_why_cpu_dequantizes()
    model = apply_compute(model, chosen)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=spec, compute=weights_kind(model))


def load_recipe_model(model, compute: str | None = None) -> LoadedModel:
    """The model a recipe's `model` section names (recipe.ModelConfig); `compute` overrides model.compute."""
    return load_model(model.path, compute=compute or model.compute, revision=model.revision)


def weights_kind(model: nn.Module) -> str:
    """"quantized" when any layer is, else the float dtype of the weights."""
    if is_quantized(model):
        return "quantized"
    return str(model.model.norm.weight.dtype).removeprefix("mlx.core.")
