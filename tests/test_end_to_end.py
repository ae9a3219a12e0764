"""`mipo-mlx train` on the embedded model, offline, end to end (small settings for CI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.max_prompts=8", "sampling.max_tokens=24", "sampling.batch_size=8", "training.batch_size=2",
    "training.max_steps=4", "training.eval_fraction=0.25", "training.save_every=2", "training.learning_rate=1e-4",
    "eval.max_prompts=4", "eval.max_tokens=24", "eval.bootstrap_samples=200",
]


def test_quickstart_runs_offline_and_writes_every_artifact(tmp_path):
    args = [sys.executable, "-m", "mipo_mlx.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
            "--set", f"output_dir={tmp_path}"]
    for override in SMALL:
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "quickstart"
    # Two rounds, each on every other prompt (sampling.round_prompts: split): each of the 8 prompts once; in round 2
    # each also has its echo pair (sampling.echo_from_round).
    rounds = [[json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
              for folder in (run, run / "rounds" / "2")]
    assert [[p["mipo"]["strategy"] for p in pairs] for pairs in rounds] == [["swap_context"] * 4,
                                                                           ["swap_context", "echo"] * 4]
    assert len({p["mipo"]["prompt_id"] for pairs in rounds for p in pairs}) == 8
    assert all(p["mipo"]["model"] == "smollm2-135m" for pairs in rounds for p in pairs)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1] == {**events[-1], "event": "run_finished", "status": "completed"}
    first = next(e for e in events if e["event"] == "metrics" and e["split"] == "train")
    assert abs(first["loss"] - 0.693147) < 1e-4
    metrics = json.loads((run / "compare" / "metrics.json").read_text())
    assert metrics["adherence/overall"]["n"] == 4
    assert "| adherence/overall | 4 |" in result.stdout
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 30
    assert (run / "rounds" / "2" / "adapters" / "adapters.safetensors").exists()
