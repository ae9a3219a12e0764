"""What imports what: the core never imports Textual; the run directory module and the TUI never
import MLX; the stages import none of each other (they meet through the run directory's files).

    .venv/bin/python -m pytest tests/test_import_hygiene.py -q
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "mipo_mlx"
STAGES = ("mipo_mlx.sampling", "mipo_mlx.trainer", "mipo_mlx.compare", "mipo_mlx.export")

CHECK = """
import importlib, pkgutil, sys
import mipo_mlx
names = sorted(m.name for m in pkgutil.walk_packages(mipo_mlx.__path__, "mipo_mlx."))
for name in names:
    importlib.import_module(name)
print(len(names))
print(sorted(m for m in sys.modules if m == "textual" or m.startswith("textual.")))
"""


def loaded_after_import(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_no_mipo_mlx_module_imports_textual():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count, textual_modules = result.stdout.strip().splitlines()
    assert int(count) >= 8  # every core module was imported, not an empty package
    assert textual_modules == "[]"


@pytest.mark.parametrize("module", ["mipo_mlx.rundir", "mipo_mlx_tui.app"])
def test_the_run_directory_and_the_tui_load_no_mlx(module):
    loaded = loaded_after_import(module)
    assert "mipo_mlx.rundir" in loaded
    assert not {m for m in loaded if m == "mlx" or m.startswith(("mlx.", "mlx_lm"))}


def imported_names(module: str) -> set[str]:
    """Every module named by an import statement anywhere in `module`'s source, functions included."""
    tree = ast.parse((CORE / f"{module.split('.')[-1]}.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    others = set(STAGES) - {stage}
    assert imported_names(stage) & others == set()
    assert loaded_after_import(stage) & others == set()
