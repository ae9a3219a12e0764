"""Start, stop and resume `mipo-mlx train` from the TUI, as a separate process.

    launch = start_training(source_from_recipe(Path("recipes/quickstart.yaml")), resume=False)
    stop_run(state.pid, launch)   # SIGINT: the trainer saves a checkpoint and exits

The run gets its own process group, so a key pressed in the TUI never reaches it and
it keeps going if the TUI quits; it is then watched like any run, through its event
log. Its console output goes to RUN_DIR/console.log.
"""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mipo_mlx.errors import UserError
from mipo_mlx.recipe import load_recipe
from mipo_mlx.rundir import CONSOLE_LOG, RECIPE_FILE, run_dir_of, saved_recipe


@dataclass
class TrainingLaunch:
    """A `mipo-mlx train` process started here."""

    process: subprocess.Popen
    run_dir: Path
    command: list[str]

    def exit_code(self) -> int | None:
        return self.process.poll()


@dataclass
class RunSource:
    """How to (re)start a run: the recipe file and the directory its relative paths use."""

    recipe: Path
    cwd: Path
    run_dir: Path


def source_from_recipe(recipe_path: Path) -> RunSource:
    return RunSource(recipe=recipe_path.resolve(), cwd=Path.cwd(), run_dir=run_dir_of(load_recipe(recipe_path)).resolve())


def source_from_run_dir(run_dir: Path) -> RunSource:
    """A run directory restarts from its saved recipe, in the folder it was started from."""
    run_dir = run_dir.resolve()
    saved = run_dir / RECIPE_FILE
    if not saved.is_file():
        raise UserError(f"no {RECIPE_FILE} here, so the run cannot be resumed; start it from its recipe", file=str(run_dir))
    # output_dir/run_name was relative to the folder `mipo-mlx train` ran in; walk back to it.
    # (Its data paths are relative to that folder too, so they are not checked from here.)
    relative = run_dir_of(saved_recipe(run_dir, check_paths=False))
    if relative.is_absolute():
        return RunSource(recipe=saved, cwd=Path.cwd(), run_dir=run_dir)
    depth = len(relative.parts)
    if tuple(run_dir.parts[-depth:]) != relative.parts:
        raise UserError(
            f"output_dir/run_name ({relative}) does not match the folder; open the TUI on the recipe instead",
            file=str(saved),
        )
    return RunSource(recipe=saved, cwd=run_dir.parents[depth - 1], run_dir=run_dir)


def catch_interrupts() -> None:
    """In the child: take SIGINT as ctrl+c even when the TUI was started with it ignored
    (a background job of a script), so that stopping a run always checkpoints it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python turns the default into KeyboardInterrupt


def start_training(source: RunSource, resume: bool) -> TrainingLaunch:
    command = [sys.executable, "-m", "mipo_mlx.cli", "train", str(source.recipe)]
    if resume:
        command.append("--resume")
    source.run_dir.mkdir(parents=True, exist_ok=True)
    with open(source.run_dir / CONSOLE_LOG, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=source.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=catch_interrupts,
        )
    return TrainingLaunch(process=process, run_dir=source.run_dir, command=command)


def stop_run(pid: int | None, launch: TrainingLaunch | None) -> bool:
    """Interrupt the run like ctrl+c would; True when a signal was sent."""
    if launch is not None and launch.exit_code() is None:
        os.killpg(launch.process.pid, signal.SIGINT)
        return True
    if pid:
        try:
            os.kill(pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return False


def last_console_line(run_dir: Path) -> str:
    """The last line the run printed, to explain an early exit (a recipe error, say)."""
    path = run_dir / CONSOLE_LOG
    if not path.exists():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return lines[-1] if lines else ""
