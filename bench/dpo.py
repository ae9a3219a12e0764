"""Tokens/s and peak memory of our DPO step next to mlx-lm-lora's and TRL's DPO trainers: same model, pairs and batches.

    pip install -e ".[test,bench]"  # trl 1.16.0 into our venv, beside torch and peft: a benchmark dependency only
    pip install --no-deps --target /tmp/mlx-lm-lora mlx-lm-lora==5.10.2   # outside our venv; its DPO
    python bench/dpo.py --mlx-lm-lora /tmp/mlx-lm-lora                     # trainer needs only mlx, mlx-lm, tqdm
    python bench/dpo.py --mlx-lm-lora /tmp/mlx-lm-lora --pairs runs/quickstart/pairs.jsonl --batch-size 4
    python bench/dpo.py --sides mipo-mlx trl

mipo-mlx never imports trl, torch or peft at run time; only the trl side here does.

The model is written once as an mlx-lm model directory in the dtype our loader computes
in here (float32 on the CPU backend, the stored weights on a GPU); each side loads that
directory in its own process (`import mipo_mlx` first in each, so the MLX sides get the
same BLAS), so no side's allocations count in another's peak. All train a LoRA of the
recipe's defaults (rank, scale, dropout, the seven projections) with sigmoid DPO, beta
0.1, AdamW and the recipe's learning rate, on the same batches of the same token ids in
the same order, padded by each trainer's own collation, with the same max sequence length.

- mipo-mlx: one model; Trainer.train_step (one compiled forward and backward: each
  prompt once, then its chosen and rejected answers one after the other in its row;
  gradient clipping, AdamW); the reference log-probs come with the pairs (scored here once,
  before any clock starts, when the pairs have none).
- mlx-lm-lora: train_dpo with the reference model its train.py loads, a second copy
  from the same directory, run forward on every step; policy forwards for chosen and
  rejected apart.
- trl: DPOTrainer on torch's CPU backend with a PEFT LoRA (lora_alpha = scale x rank),
  precompute_ref_log_probs=True (its cheapest reference; that pass, in the trainer's
  constructor, is not timed, as our stored reference is not), float32 throughout
  (bf16=False: DPOConfig defaults to bf16 autocast, on the CPU too), no gradient
  checkpointing (its default; the other sides keep their activations), torch on as many
  threads as OpenBLAS runs MLX's matmuls on. The directory loads in transformers as
  LlamaForCausalLM (printed). Its precomputed reference log-probs are printed against
  ours: the same model on the same tokens gives them within float rounding.

Tokens are all non-padding tokens (prompt and answer) of both sequences of each pair: the
same batches, so the same count on every side. The first pass over the batches
(compilation of every batch shape) is not timed. Peak memory is MLX's peak during
training, the loaded models included, for the MLX sides; max RSS (the whole process,
loading included) is printed beside it, and is what is compared with TRL's (torch's
allocations are not MLX's). torch, installed here for the TRL side, is kept out of the MLX
sides' processes, as in their own installs: transformers would import it (~0.24 GB).
Goals: at least 2x TRL's tokens/s at at most 0.5x its max RSS, and at least 2x
mlx-lm-lora's at at most 0.45x its peak memory.

Fraction of peak: the step's FLOPs (step_flops, from the model's shapes and each batch's
padded shapes: forward and backward of the activations and the LoRA, no weight gradient
for frozen weights, the head's recomputation not counted) over its time, against a
2048^3 fp32 matmul through MLX measured in the same process right after the timed steps;
with the tokens/s the step would reach at that rate throughout. TRL's GFLOP/s are counted
the same way on its shapes (whole sequences, every position through the head).

Measured at e5aa49f on a quiet machine of this kind (Linux x86_64, 2 vCPUs of an AMD EPYC
with AVX-512, OpenBLAS, mlx 0.32.4, mlx-lm-lora 5.10.2, trl 1.16.0, peft 0.22.0, torch
2.13.0+cpu, the embedded model in float32; the defaults: 16 pairs, batch 4, 8 timed steps;
load average 2.6, nothing else running):

    mipo-mlx     243.3 tok/s   1.62 GB MLX peak, 1.87 GB max RSS
    mlx-lm-lora  110.6 tok/s   3.82 GB MLX peak, 3.35 GB max RSS
    TRL           90.2 tok/s   4.60 GB max RSS
    against mlx-lm-lora: 2.20x tok/s, 0.42x peak memory
    against TRL:         2.70x tok/s, 0.41x max RSS
    the step: 0.426 GFLOP per counted token, 103.6 GFLOP/s = 40% of the sgemm rate
    beside it (259.1 GFLOP/s): at that rate throughout, 608 tok/s

TRL's reference log-probs were within 6.9e-3 of ours; the whole run took 5:32. Before
e5aa49f the MLX sides ran with torch imported: at 932aee6, the same day, ours 242.3 tok/s
at 2.17 GB max RSS against TRL's 82.4 tok/s at 4.27 GB (2.94x, 0.51x), and at 64cb5ce
242.6 tok/s at 2.11 GB against 88.0 at 4.47 GB (2.76x, 0.47x): the ratio of max RSS moved
around the goal with TRL's own spread. On an earlier VM of this kind (sgemm ~93 GFLOP/s,
no AVX-512), at 62d6b4e and with other jobs running (load 4.7 and 6.0): 3.66x and 4.68x
TRL at 0.50x its max RSS, 2.06x and 2.56x mlx-lm-lora at 0.45x its peak memory, the step
at 57% and 52% of sgemm. There, with DPOConfig's default bf16 autocast (not the same
model: its log-probs move by up to 0.38), TRL ran at 125.9 tok/s and 3.83 GB beside our
141.4 tok/s and 2.23 GB: 1.12x and 0.58x; the issue's hand measurement (111.7 tok/s, 4.71
GB) ran that default.

The step reaches a smaller share of sgemm on the AVX-512 machine because its matmuls got
2.7x faster there and its elementwise work did not: MLX's CPU exp is scalar on x86-64
(bench/sampling.py's docstring says why and what was tried). An exp of MLX elementwise ops
under mx.compile took a (900, 1536) swiglu from 18.2 to 9.0 ms, but its backward was
slower than lean_swiglu's, and a DPO step of round-2 quickstart pairs did not get faster
(2.83 against 2.90 s): not kept. numpy's exp, as generation uses it (swiglu.host_swiglu),
cannot run under mx.compile; in an uncompiled step (the forward and the backward's sigmoid
in numpy) 32 round-1 quickstart pairs ran at 195.1 against 189.0 tok/s compiled (+3%), at
4.70 against 1.83 GB MLX peak: not kept.

Profile of the step on the earlier VM (perf, 6 steps of the defaults): OpenBLAS's sgemm
~52% of the samples (its packing copies ~8% of them), MLX's scalar exp ~14%
(simd::exp<float, 1> calling libm's fmaf per element: swiglu's sigmoid, forward and
recomputed in lean_swiglu's backward, the head's logsumexp and softmax), OpenBLAS's idle
workers yielding ~10%, malloc and copies ~5%. Left as they are: keeping the sigmoid rather
than recomputing it would buy a few percent of time with (rows, T, intermediate) floats
per layer, and the step is at the 0.5x memory goal already; the head's input gradient
taken in its forward (softmax @ W beside the log-probs) would save one of its three
matmuls, ~6% of the step's FLOPs, in scoring.py's head_logprobs, which inference shares.
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

# torch is in this venv for the TRL side only, and transformers (which mlx-lm imports) imports it whenever it is
# installed: +0.24 GB of RSS in a process that never uses it. The MLX sides run as installed without torch.
if "--side" in sys.argv and sys.argv[sys.argv.index("--side") + 1] != "trl":
    sys.modules["torch"] = None

import mipo_mlx  # before mlx: loads the fast BLAS
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.tuner.lora import LoRALinear

from mipo_mlx.backend import describe_backend
from mipo_mlx.convert import convert_model
from mipo_mlx.data import read_prompts
from mipo_mlx.loading import load_model
from mipo_mlx.lora import apply_lora
from mipo_mlx.recipe import LoraConfig, TrainingConfig
from mipo_mlx.rundir import Pair, read_pairs
from mipo_mlx.trainer import Example, Trainer, build_examples, collate, epoch_order, make_batches

MAX_SEQ_LENGTH = 1024
SGEMM_SIZE = 2048  # a square fp32 matmul large enough for OpenBLAS's best rate on this machine
SEED = 0  # the recipe's default: our trainer's batch order, replayed for mlx-lm-lora
SIDES = {
    "mipo-mlx": "one model; reference log-probs read from the pairs; each prompt once, both answers in one forward",
    "mlx-lm-lora": "policy and reference copy in memory; reference forward every step; chosen and rejected apart",
    "trl": "PEFT LoRA on torch; reference log-probs precomputed (precompute_ref_log_probs); chosen and rejected "
           "in one padded batch",
}


def bundled_pairs(count: int) -> list[Pair]:
    """Pairs on the bundled personalization prompts; the answers are other profiles' texts (length is what counts)."""
    records = read_prompts("bundled:personalization/train")[: count + 1]
    return [Pair(prompt=r.messages(), chosen=r.context, rejected=records[(i + 1) % len(records)].context)
            for i, r in enumerate(records[:count])]


def prepare(args, work: Path) -> str:
    """The shared model directory and the tokenized pairs with their reference log-probs; the dtype."""
    compute = load_model(args.model).compute
    # Written in the dtype our loader computes in here, so that mlx-lm loads the same weights.
    convert_model(args.model, work / "model", dtype=None if compute == "quantized" else compute)
    loaded = load_model(str(work / "model"))
    apply_lora(loaded.model, LoraConfig())
    pairs = read_pairs(Path(args.pairs)) if args.pairs else bundled_pairs(args.count)
    examples = build_examples(pairs, loaded.model, loaded.tokenizer, MAX_SEQ_LENGTH)
    # mlx-lm-lora only makes full batches.
    examples = examples[: len(examples) // args.batch_size * args.batch_size]
    if not examples:
        sys.exit(f"fewer than --batch-size {args.batch_size} usable pairs")
    (work / "examples.json").write_text(json.dumps([vars(e) for e in examples]))
    (work / "shape.json").write_text(json.dumps(model_shape(loaded.model)))
    return compute


def read_examples(work: Path) -> list[Example]:
    return [Example(e["prompt_id"], tuple(e["chosen"]), tuple(e["rejected"]), e["ref_chosen"], e["ref_rejected"])
            for e in json.loads((work / "examples.json").read_text())]


def step_batches(examples: list[Example], batch_size: int, steps: int) -> list[list[int]]:
    """The pair indices of each step, as our trainer takes them (grad_accumulation 1)."""
    batches = make_batches(examples, batch_size, whole_groups=False)
    return [batches[epoch_order(len(batches), SEED, s // len(batches))[s % len(batches)]] for s in range(steps)]


def warmup_steps(examples: list[Example], batch_size: int) -> int:
    """One pass over the batches: every batch shape compiled before the clock starts."""
    return len(make_batches(examples, batch_size, whole_groups=False))


def blas_threads() -> int:
    """The threads MLX's matmuls run on: OpenBLAS's own count when mipo_mlx loaded it, else one per CPU."""
    try:
        return ctypes.CDLL(describe_backend()["blas"]).openblas_get_num_threads()
    except (OSError, AttributeError):
        return os.cpu_count()


def sgemm_gflops(seconds: float = 2.0) -> float:
    """This machine's fp32 matmul rate through MLX (and so through the BLAS mipo_mlx loaded): the peak we compare to."""
    a, b = (mx.random.normal((SGEMM_SIZE, SGEMM_SIZE)) for _ in range(2))
    mx.eval(a @ b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mx.eval(a @ b)
        count += 1
    return 2 * SGEMM_SIZE**3 * count / (time.perf_counter() - start) / 1e9


def model_shape(model) -> dict:
    """What the FLOP count needs: the matmuls of every layer, attention widths and the vocabulary head."""
    frozen = lora = 0  # sum of in*out over frozen linears; sum of r*(in+out) over LoRA factors
    for layer in model.layers:
        for _, module in layer.named_modules():
            if isinstance(module, LoRALinear):
                (inputs, rank), outputs = module.lora_a.shape, module.lora_b.shape[1]
                lora += rank * (inputs + outputs)
            elif isinstance(module, nn.QuantizedLinear):
                frozen += module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits
            elif isinstance(module, nn.Linear):
                frozen += module.weight.size
    a = model.args
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    return {"frozen": frozen, "lora": lora, "attention": len(model.layers) * a.num_attention_heads * head_dim,
            "head": a.hidden_size * a.vocab_size}


def step_flops(shape: dict, blocks: list[tuple[int, int, int]], head_positions: int) -> float:
    """FLOPs of a forward and backward: blocks of (rows, queries, keys) through the body, the head on head_positions.

    Frozen weights: forward and the activations' gradient (2 + 2 per weight and position),
    no weight gradient. LoRA: forward, activations' and factors' gradients (2 + 2 + 2).
    Attention scores and their weighted sum over every (query, key) pair the matmuls
    compute, masked or not (4 per head dimension forward, 8 backward). The head as the
    model's math has it (2 + 2): a backward that recomputes it (ours) is not counted.
    """
    positions = sum(rows * queries for rows, queries, _ in blocks)
    pairs = sum(rows * queries * keys for rows, queries, keys in blocks)
    return ((4 * shape["frozen"] + 6 * shape["lora"]) * positions + 12 * shape["attention"] * pairs
            + 4 * shape["head"] * head_positions)


def our_blocks(batch: tuple) -> tuple[list[tuple[int, int, int]], int]:
    """step_flops' blocks and head positions for one of our collated batches."""
    if len(batch) == 6:  # each distinct prompt once, then its distinct answers in its row (scoring.pair_token_logprobs)
        (prompts, prompt), answers = batch[0].shape, batch[2].shape[1]
        return [(prompts, prompt, prompt), (prompts, answers, prompt + answers)], prompts * answers
    (rows, width), scored = batch[0].shape, batch[1].shape[1]  # whole sequences, the head on the last targets
    return [(rows, width - 1, width - 1)], rows * scored


def bench_ours(args, work: Path, examples: list[Example]) -> dict:
    loaded = load_model(str(work / "model"))
    apply_lora(loaded.model, LoraConfig())
    training = TrainingConfig(batch_size=args.batch_size, epochs=1000, max_seq_length=MAX_SEQ_LENGTH)
    trainer = Trainer(loaded.model, loaded.tokenizer, examples, [], training, seed=SEED)
    loaded.model.train()
    warmup = warmup_steps(examples, args.batch_size)
    mx.reset_peak_memory()
    for _ in range(warmup):
        trainer.train_step()
    shape = json.loads((work / "shape.json").read_text())
    flops = 0.0
    for indices in step_batches(examples, args.batch_size, warmup + args.steps)[warmup:]:
        flops += step_flops(shape, *our_blocks(collate(examples, indices, trainer.pad_id, trainer.shared_prompts)[0]))
    start, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += trainer.train_step()["tokens"]
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory() / 1e9
    # Measured right after the timed steps, in the same process: under the same load as they ran.
    return {"tokens": tokens, "seconds": seconds, "peak_gb": peak, "version": mipo_mlx.__version__, "flops": flops,
            "sgemm_gflops": sgemm_gflops()}


def bench_mlx_lm_lora(args, work: Path, examples: list[Example]) -> dict:
    import mlx_lm_lora
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora.trainer import dpo_trainer

    model, _ = load(str(work / "model"))
    reference, _ = load(str(work / "model"))  # what its train.py does for DPO: a second copy
    reference.freeze()
    apply_lora(model, LoraConfig())
    dataset = [{"chosen": e.chosen[0], "rejected": e.rejected[0],
                "chosen_prompt_length": e.chosen[1], "rejected_prompt_length": e.rejected[1]} for e in examples]
    warmup = warmup_steps(examples, args.batch_size)
    iters = warmup + args.steps
    plan = iter(step_batches(examples, args.batch_size, iters))
    real_batches = dpo_trainer.iterate_dpo_batches
    tokens_per_step, report_times = [], []

    def planned_batches(dataset, batch_size, max_seq_length, train=False):
        # Its trainer asks for a fresh iterator every step; each gives our next batch, padded its way.
        indices = next(plan)
        tokens_per_step.append(sum(len(dataset[i][side]) for i in indices for side in ("chosen", "rejected")))
        yield from real_batches([dataset[i] for i in indices], batch_size, max_seq_length)

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            report_times.append(time.perf_counter())

    training = TrainingConfig()
    with tempfile.TemporaryDirectory() as directory:
        dpo_args = dpo_trainer.DPOTrainingArgs(
            batch_size=args.batch_size, iters=iters, steps_per_report=1, steps_per_save=iters + 1,
            adapter_file=str(Path(directory) / "adapters.safetensors"), max_seq_length=MAX_SEQ_LENGTH,
            beta=training.beta, loss_type="sigmoid",
        )
        info = mx.device_info()
        # The CPU backend reports no GPU working set; its trainer reads one for mx.set_wired_limit.
        info.setdefault("max_recommended_working_set_size", 0)
        optimizer = optim.AdamW(learning_rate=training.learning_rate, betas=list(training.adam_betas))
        mx.reset_peak_memory()
        with mock.patch.object(dpo_trainer, "iterate_dpo_batches", planned_batches), \
                mock.patch.object(mx, "device_info", lambda: info):
            dpo_trainer.train_dpo(model, reference, optimizer, dataset, args=dpo_args,
                                  training_callback=Clock(), loss_type="sigmoid")
    return {"tokens": sum(tokens_per_step[warmup:]), "seconds": report_times[-1] - report_times[warmup - 1],
            "peak_gb": mx.get_peak_memory() / 1e9, "version": mlx_lm_lora.__version__}


def bench_trl(args, work: Path, examples: list[Example]) -> dict:
    import datasets
    import peft
    import torch
    import trl
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    threads = blas_threads()
    torch.set_num_threads(threads)  # as many as OpenBLAS runs MLX's matmuls on
    # TRL's default is gradient checkpointing; ours (and mlx-lm-lora's run here) keep the activations.
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    lora, training = LoraConfig(), TrainingConfig()
    warmup = warmup_steps(examples, args.batch_size)
    plan = step_batches(examples, args.batch_size, warmup + args.steps)
    # Our token ids in our batch order: its own tokenization is skipped, and its sampler reads the rows in order.
    rows = [{"prompt_ids": examples[i].prompt, "chosen_ids": examples[i].chosen[0][examples[i].chosen[1]:],
             "rejected_ids": examples[i].rejected[0][examples[i].rejected[1]:]} for batch in plan for i in batch]
    tokens_per_step = [sum(len(examples[i].chosen[0]) + len(examples[i].rejected[0]) for i in b) for b in plan]
    # Its collation: chosen and rejected whole, right-padded to the batch's longest; logits at every position.
    widths = [max(len(getattr(examples[i], side)[0]) for i in b for side in ("chosen", "rejected")) for b in plan]
    step_times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter())

    config = trl.DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=len(plan),
        learning_rate=training.learning_rate, adam_beta1=training.adam_betas[0], adam_beta2=training.adam_betas[1],
        max_grad_norm=training.max_grad_norm, beta=training.beta, loss_type=["sigmoid"], max_length=MAX_SEQ_LENGTH,
        precompute_ref_log_probs=True, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        bf16=False,  # DPOConfig's default is bf16 autocast, on the CPU too: the same float32 math as ours instead
        dataloader_num_workers=0, remove_unused_columns=False, seed=SEED,
    )
    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.scale * lora.rank, lora_dropout=lora.dropout,
                                 target_modules=[key.split(".")[-1] for key in lora.keys], task_type="CAUSAL_LM")
    with mock.patch.object(trl.DPOTrainer, "_prepare_dataset", lambda self, dataset, *a, **k: dataset), \
            mock.patch.object(trl.DPOTrainer, "_get_train_sampler",
                              lambda self, *a, **k: torch.utils.data.SequentialSampler(self.train_dataset)):
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
        # Its precomputed reference against ours (scored by MLX when the pairs were prepared): the same model and tokens.
        ref_error = max(abs(row[f"ref_{side}_logps"] - getattr(examples[i], f"ref_{side}"))
                        for row, i in zip(trainer.train_dataset, (i for b in plan for i in b)) for side in ("chosen", "rejected"))
        trainer.train()
    shape = json.loads((work / "shape.json").read_text())
    flops = sum(step_flops(shape, [(2 * args.batch_size, width, width)], 2 * args.batch_size * (width - 1))
                for width in widths[warmup:])
    return {"tokens": sum(tokens_per_step[warmup:]), "seconds": step_times[-1] - step_times[warmup - 1],
            "peak_gb": None, "flops": flops, "ref_error": ref_error, "blas": "MKL" if torch.backends.mkl.is_available() else "torch's",
            "version": f"trl {trl.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
                       f"{type(model).__name__} in {model.dtype}, {threads} threads"}


def run_side(args) -> None:
    """One side, in this process; the result goes to WORK/SIDE.json."""
    if args.mlx_lm_lora:
        sys.path.append(args.mlx_lm_lora)  # after our site-packages: it must not shadow our mlx or mlx-lm
    work = Path(args.work)
    examples = read_examples(work)
    result = {"mipo-mlx": bench_ours, "mlx-lm-lora": bench_mlx_lm_lora, "trl": bench_trl}[args.side](args, work, examples)
    result = {"blas": describe_backend()["blas"], **result,
              "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    (work / f"{args.side}.json").write_text(json.dumps(result))


def spawn_side(args, work: Path, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--work", str(work), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps)] + (["--mlx-lm-lora", args.mlx_lm_lora] if args.mlx_lm_lora else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((work / f"{side}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="Any model mipo-mlx loads (default: the embedded one).")
    parser.add_argument("--pairs", help="A pairs.jsonl (default: pairs built from the bundled personalization prompts).")
    parser.add_argument("--count", type=int, default=16, help="Pairs to build when --pairs is not given.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="Timed steps, after one untimed pass over the batches.")
    parser.add_argument("--mlx-lm-lora", help="Folder holding the mlx_lm_lora package, if not installed here.")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="Which trainers to run.")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        compute = prepare(args, work)
        examples = read_examples(work)
        results = {side: spawn_side(args, work, side) for side in args.sides}
    backend = describe_backend()
    print(f"model {args.model} ({compute} on {backend['backend']}), {len(examples)} pairs, "
          f"batch {args.batch_size}, max length {MAX_SEQ_LENGTH}, {args.steps} timed steps after "
          f"{warmup_steps(examples, args.batch_size)}; {os.cpu_count()} CPUs, mlx {backend['mlx']}, load {os.getloadavg()[0]:.1f}")
    for side, r in results.items():
        peak = f"peak memory {r['peak_gb']:.2f} GB" if r["peak_gb"] is not None else "peak memory (MLX) n/a"
        rate = f"{r['flops'] / r['seconds'] / 1e9:6.1f} GFLOP/s   " if "flops" in r else ""
        print(f"{side + ':':13} {r['tokens'] / r['seconds']:8.1f} tok/s   {rate}{peak}   max RSS {r['max_rss_gb']:.2f} GB   "
              f"BLAS {r['blas']}\n{'':14}{r['version']}: {SIDES[side]}")
    if "mipo-mlx" in results:
        r = results["mipo-mlx"]
        achieved, peak_rate = r["flops"] / r["seconds"] / 1e9, r["sgemm_gflops"]
        print(f"mipo-mlx step: {r['flops'] / r['tokens'] / 1e9:.3f} GFLOP per token counted, {achieved:.1f} GFLOP/s = "
              f"{achieved / peak_rate:.0%} of this machine's sgemm ({peak_rate:.1f} GFLOP/s, {SGEMM_SIZE}^3 fp32 through "
              f"MLX, right after); at that rate throughout: {r['tokens'] * peak_rate * 1e9 / r['flops']:.0f} tok/s")
    if "trl" in results:
        print(f"TRL's precomputed reference log-probs against ours: at most {results['trl']['ref_error']:.1e} apart")
    speed = lambda side: (results["mipo-mlx"]["tokens"] / results["mipo-mlx"]["seconds"]) / (
        results[side]["tokens"] / results[side]["seconds"])
    if "mipo-mlx" in results and "mlx-lm-lora" in results:
        memory = results["mipo-mlx"]["peak_gb"] / results["mlx-lm-lora"]["peak_gb"]
        print(f"against mlx-lm-lora: speed {speed('mlx-lm-lora'):.2f}x (goal: at least 2x), "
              f"peak memory {memory:.2f}x (goal: at most 0.45x)")
    if "mipo-mlx" in results and "trl" in results:
        # torch's allocations are not MLX's: the whole process's max RSS on both sides, loading included.
        memory = results["mipo-mlx"]["max_rss_gb"] / results["trl"]["max_rss_gb"]
        print(f"against TRL: speed {speed('trl'):.2f}x (goal: at least 2x), max RSS {memory:.2f}x (goal: at most 0.5x)")


if __name__ == "__main__":
    main()
