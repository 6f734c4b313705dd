#!/usr/bin/env bash
# Prepare .venv for `make demo` / `make test` on first use.
#
# The venv sees the system's site-packages, so a machine that already has torch (a GPU machine
# with its own CUDA build) keeps it. Otherwise: on a machine without an NVIDIA GPU install the
# CPU build of torch (pinned version, or from TORCH_INDEX_URL when given), never a CUDA build;
# with a GPU, the default torch build.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
cpu_torch=${CPU_TORCH_VERSION:-2.13.0}

[ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch"
    "${pip[@]}" torch
else
    echo "setup: no GPU, installing the CPU build torch==$cpu_torch"
    "${pip[@]}" "torch==$cpu_torch" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# torch is now satisfied, so the extras' own torch requirements pull nothing more.
"${pip[@]}" -e ".[dev]"
