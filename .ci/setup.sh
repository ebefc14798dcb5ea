#!/usr/bin/env bash
# Creates the project's virtual environment (.venv), installs torch and the
# Python dependencies, and builds the sven_ext extension in place, CUDA kernels
# included when a CUDA toolkit is found. Safe to run again: an up-to-date build
# is not recompiled.
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
py="$venv/bin/python"

echo "== installing $torch_spec and the Python dependencies"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "$torch_spec" setuptools wheel ninja numpy matplotlib tqdm pytest hypothesis scikit-learn torchvision transformers timm

# The nvcc on PATH may be a wrapper outside the toolkit; point at the toolkit itself.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

echo "== building the sven_ext extension (incremental)"
# --no-build-isolation semantics: this compiles against the torch installed above.
"$py" setup.py --quiet build_ext --inplace
"$py" -c "import sven_ext; print('sven_ext', sven_ext.__version__, '| CUDA kernels compiled:', sven_ext.WITH_CUDA)"
