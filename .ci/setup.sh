#!/usr/bin/env bash
# Creates the project's virtual environment (.venv), installs torch, and installs
# sven_ext into it in editable mode with its runtime, test and benchmark
# dependencies (pyproject.toml), compiling the extension in place against that
# torch. `import sven_ext` then works from any directory and runs this source
# tree. Safe to run again: objects that are up to date are not recompiled.
#
#   SVEN_EXT_VENV    where the environment goes (default: .venv)
#   SVEN_EXT_TORCH   the torch to install (default: torch==2.14.1, a CUDA 13.0 build;
#                    torch==2.13.0 is a CPU-only build that skips the CUDA kernels)
#   plus the build switches of setup.py (SVEN_EXT_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, ...)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${SVEN_EXT_VENV:-.venv}"
torch_spec="${SVEN_EXT_TORCH:-torch==2.14.1}"

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$(cd "$venv" && pwd)/bin/python"

echo "== installing $torch_spec and the build tools"
"$py" -m pip install --quiet --upgrade pip
# numpy too: torch warns when setup.py imports it without numpy.
"$py" -m pip install --quiet "$torch_spec" numpy setuptools wheel ninja

# The nvcc on PATH may be a wrapper outside the toolkit; point at the toolkit itself.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

echo "== building sven_ext and installing it into $venv (editable, incremental)"
# --no-build-isolation: compile against the torch installed above.
"$py" -m pip install --quiet --no-build-isolation -e ".[test,bench]"
(cd / && "$py" -c "import sven_ext; print('sven_ext', sven_ext.__version__, '| CUDA kernels compiled:', sven_ext.WITH_CUDA)")
