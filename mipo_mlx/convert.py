"""`mipo-mlx convert SRC OUT`: write an mlx-lm model directory from any model source.

    mipo-mlx convert smollm2-135m out/smollm2                   # quantized as in the GGUF
    mipo-mlx convert model.gguf out/f16 --dtype float16         # dequantized
    mipo-mlx convert smollm2-135m out/q8 --quantize 8           # re-quantized
    python -m mlx_lm generate --model out/smollm2 --prompt "What is the capital of France?"

OUT gets config.json, model.safetensors and the tokenizer files with the chat template,
so that mlx-lm loads it unchanged. OUT is written in a temporary directory and renamed
into place at the end: a failure leaves nothing half-written, and an existing OUT is
never overwritten.
"""

from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model

from mipo_mlx.errors import UserError, rekeyed
from mipo_mlx.files import atomic_folder, remove_staging
from mipo_mlx.loading import is_quantized, load_model
from mipo_mlx.preflight import check_model, check_output_folder

DTYPES = ("float16", "bfloat16", "float32")
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)


def convert_model(
    src: str, out: str | Path, *, dtype: str | None = None, quantize: int | None = None, group_size: int = 64
) -> Path:
    """Write SRC as an mlx-lm model directory OUT; see the module docstring."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new output directory", key="OUT")
    loaded = load_model(src, compute="quantized")
    model, config = loaded.model, dict(loaded.config)
    if dtype or quantize:
        if is_quantized(model):
            model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        model.set_dtype(getattr(mx, dtype or "float16"))
    if quantize:
        if any(m.weight.shape[-1] % group_size for _, m in model.named_modules() if hasattr(m, "to_quantized")):
            raise UserError(f"some layers' widths are not a multiple of {group_size}; try --group-size 32", key="--group-size")
        model, config = quantize_model(model, config, group_size, quantize)
    remove_staging(out.parent, out.name)  # what a killed convert to OUT left
    with atomic_folder(out) as staging:
        write_model_dir(staging, model, config, loaded.tokenizer)
    return out


def write_model_dir(directory: Path, model, config: dict, tokenizer) -> None:
    """An mlx-lm model directory: model.safetensors, config.json and the tokenizer files."""
    save_model(directory, model)
    save_config(dict(config), directory / "config.json")
    tokenizer.save_pretrained(directory)


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", help="smollm2-135m, a .gguf file, an mlx-lm model directory or a Hub id.")
    parser.add_argument("out", metavar="OUT", help="New directory to write the mlx-lm model to.")
    parser.add_argument("--dtype", choices=DTYPES, help="Dequantize to this float type.")
    parser.add_argument("--quantize", type=int, choices=QUANTIZE_BITS, metavar="BITS", help="Re-quantize to BITS bits.")
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="Quantization group size.")


def run(args) -> int:
    check_model(args.src, key="SRC")
    check_output_folder(args.out, "OUT")
    try:
        out = convert_model(args.src, args.out, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    except UserError as error:
        raise (rekeyed(error, "SRC") if error.key == "model.path" else error) from None
    print(f"wrote {out}; try: python -m mlx_lm generate --model {out} --prompt 'Hello'")
    return 0
