"""Broken inputs: every case of tests/broken_inputs/cases.yaml, run through the real CLI.

Each case puts its files (recipes and data files of tests/broken_inputs/, a damaged tiny
model directory or GGUF file, a run directory started with a recipe) in a fresh folder, runs `python -m mipo_mlx.cli ...` there and checks
what the README promises for any mistake: exit status 2, exactly one line on stderr and
nothing on stdout, no traceback, and every file that was there byte-identical with no new
folder left behind. Preflight catches them all before a model is loaded.
"""

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mipo_mlx.recipe import dump_recipe, load_recipe
from mipo_mlx.rundir import RECIPE_FILE, run_dir_of

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "broken_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))


def mipo_mlx(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    # No Hub, and no token of the person running the tests: the push cases must not depend on one.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "mipo_mlx.cli", *args], cwd=cwd, capture_output=True, timeout=600,
                          env=env)


def damage_model(model: Path, damage: dict) -> None:
    """Apply a case's `model:` (or `gguf:`) operations to the files of a folder; truncate to a negative size cuts
    that many bytes off the end."""
    for old, new in damage.get("rename", {}).items():
        (model / old).rename(model / new)
    for name in damage.get("delete", []):
        (model / name).unlink()
    for name, text in damage.get("write", {}).items():
        (model / name).write_text(text, encoding="utf-8")
    for name, size in damage.get("truncate", {}).items():
        with open(model / name, "r+b") as file:
            file.truncate(size if size >= 0 else (model / name).stat().st_size + size)
    for name, (offset, text) in damage.get("patch", {}).items():
        with open(model / name, "r+b") as file:
            file.seek(offset)
            file.write(text.encode())


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama GGUF file (Q4_0 layers) as llama.cpp writes one."""
    from gguf_fixtures import write_tiny_gguf

    path, _ = write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "model.gguf", "llama", "Q4_0")
    return path


def prepare(case: dict, folder: Path, tiny_model: Path, tiny_gguf: Path) -> None:
    files = case.get("files", {})
    if isinstance(files, list):
        files = {Path(source).name: source for source in files}
    for name, source in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CORPUS / source, folder / name)
    if "started" in case:
        with contextlib.chdir(folder):  # the recipe's relative paths, as the command will read them
            recipe = load_recipe(case["started"])
        (folder / run_dir_of(recipe)).mkdir(parents=True)
        (folder / run_dir_of(recipe) / RECIPE_FILE).write_text(dump_recipe(recipe), encoding="utf-8")
    for name, text in case.get("text", {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    for name in case.get("dirs", []):
        (folder / name).mkdir(parents=True)
    if "model" in case:
        shutil.copytree(tiny_model, folder / "model")
        damage_model(folder / "model", case["model"])
    if "gguf" in case:
        shutil.copyfile(tiny_gguf, folder / "model.gguf")
        damage_model(folder, case["gguf"])


def snapshot(folder: Path) -> dict:
    """Every folder and file below `folder` (hidden ones too), files by content."""
    found = {}
    for path in sorted(folder.rglob("*")):
        found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def test_the_corpus_has_every_kind_of_case_and_uses_every_file():
    assert len(CASES) >= 60
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids))
    kinds = {case_id.split("-")[0] for case_id in ids}
    assert {"recipe", "set", "data", "model", "output", "run", "resume", "checkpoint", "eval", "info", "convert",
            "export", "push"} <= kinds
    # Model files: empty, truncated and corrupt, of both formats MLX reads.
    for damaged in ("empty-gguf", "gguf-truncated", "gguf-garbage", "empty-safetensors", "safetensors-header-truncated",
                    "safetensors-header-garbage"):
        assert any(damaged in case_id for case_id in ids), damaged
    used = set()
    for case in CASES:
        files = case.get("files", {})
        used |= set(files if isinstance(files, list) else files.values())
    stored = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file() and p.name != "cases.yaml"}
    assert stored == used, f"unused: {stored - used}, missing: {used - stored}"


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_broken_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, tiny_model_dirs, tiny_gguf):
    folder = tmp_path / "work"
    folder.mkdir()
    prepare(case, folder, tiny_model_dirs[("llama", False)], tiny_gguf)
    before = snapshot(folder)

    result = mipo_mlx(shlex.split(case["run"]), folder, tmp_path / "hf-home")

    stderr = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 2, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mipo-mlx: error: ")
    assert case["expect"] in lines[0]
    assert snapshot(folder) == before
