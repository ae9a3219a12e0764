"""The core package never imports Textual, so it runs headless and the TUI stays optional.

    .venv/bin/python -m pytest tests/test_import_hygiene.py -q
"""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import mipo_mlx
names = sorted(m.name for m in pkgutil.walk_packages(mipo_mlx.__path__, "mipo_mlx."))
for name in names:
    importlib.import_module(name)
print(len(names))
print(sorted(m for m in sys.modules if m == "textual" or m.startswith("textual.")))
"""


def test_no_mipo_mlx_module_imports_textual():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count, textual_modules = result.stdout.strip().splitlines()
    assert int(count) >= 8  # every core module was imported, not an empty package
    assert textual_modules == "[]"
