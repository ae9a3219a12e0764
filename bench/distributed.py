"""Speed-up of one run on 2 ranks (mlx.launch, ring backend over 127.0.0.1) over the same run in 1 process.

    python bench/distributed.py [--prompts 16] [--steps 4] [--ranks 2]

Runs `mipo-mlx train recipes/quickstart.yaml` (the embedded SmolLM2-135M) on a few prompts
with short answers, once in one process and once under `mlx.launch -n RANKS`, and prints
each stage's seconds (from the event logs' stage_finished events) and the ratio. It also
checks that the two pairs files are byte for byte the same (the point of the design; the
speed is for the record).

Measured on the 2-core Linux VM, CPU backend, 16 prompts, 4 steps, load average 14 (other
engineers' jobs and a test run shared the cores: the timings are noisy):

    stage                    1 process     2 ranks  speed-up
    sample                      228.0s      230.0s     0.99x
    train                       234.4s      220.5s     1.06x
    compare                     354.8s      383.5s     0.93x
    wall (with start-up)        846.2s      878.9s     0.96x
    pairs files byte for byte the same: True

On two cores two ranks share the cores one process already uses, so there is no gain here;
on two Macs each rank has its own GPU and memory.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mipo_mlx  # noqa: F401  (before mlx: loads the fast BLAS)
from mipo_mlx.events import read_events
from mipo_mlx.rundir import EVENTS_FILE, PAIRS_FILE

ROOT = Path(__file__).resolve().parent.parent
STAGE_NAMES = ("sample", "train", "compare")


def run(folder: Path, name: str, ranks: int, overrides: list[str]) -> dict:
    """Seconds of each stage and in all, for `mipo-mlx train` on `ranks` ranks."""
    command = [sys.executable, "-m", "mipo_mlx.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
               *(part for key in [f"output_dir={folder}", f"run_name={name}", *overrides] for part in ("--set", key))]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--", *command]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    events, _ = read_events(folder / name / EVENTS_FILE)
    seconds = {e["stage"]: e["seconds"] for e in events if e["event"] == "stage_finished"}
    if set(seconds) != set(STAGE_NAMES):
        sys.exit(f"the {ranks}-rank run did not finish every stage; see {folder / name / EVENTS_FILE}")
    return {**seconds, "wall (with start-up)": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    overrides = [f"data.max_prompts={args.prompts}", "sampling.max_tokens=48", f"training.max_steps={args.steps}",
                 "training.eval_every=1000", "training.probe_prompts=0", "eval.max_prompts=8", "eval.max_tokens=48"]
    with tempfile.TemporaryDirectory() as runs:
        folder = Path(runs)
        one = run(folder, "one", 1, overrides)
        many = run(folder, "many", args.ranks, overrides)
        same = (folder / "one" / PAIRS_FILE).read_bytes() == (folder / "many" / PAIRS_FILE).read_bytes()
    print(f"{args.prompts} prompts, {args.steps} steps, os.cpu_count() = {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'stage':<22}{'1 process':>12}{f'{args.ranks} ranks':>12}{'speed-up':>10}")
    for stage in one:
        print(f"{stage:<22}{one[stage]:>11.1f}s{many[stage]:>11.1f}s{one[stage] / many[stage]:>9.2f}x")
    print(f"pairs files byte for byte the same: {same}")


if __name__ == "__main__":
    main()
