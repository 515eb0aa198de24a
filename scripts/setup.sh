#!/usr/bin/env bash
# Set up ./.venv with torch and qlora (editable, with test tools). Safe to run again; does nothing when done.
#
# torch comes first and separately: a bare `torch` requirement pulls the multi-GB CUDA build. Without an
# NVIDIA GPU we ask for torch==2.13.0, which on this project's machines resolves to the local CPU wheel;
# elsewhere point QLORA_TORCH_INDEX at PyTorch's CPU index (https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.qlora-installed
if [[ -f $stamp && $stamp -nt pyproject.toml ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${pip[@]}" "torch>=2.6,<2.14"
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch"
    "${pip[@]}" "torch==2.13.0" ${QLORA_TORCH_INDEX:+--index-url "$QLORA_TORCH_INDEX"}
  fi
fi
echo "setup: installing qlora and its dependencies into .venv"
"${pip[@]}" -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, bitsandbytes, peft, transformers, accelerate, hydra, datasets" \
  || { echo "setup: the install is incomplete; see the pip output above" >&2; exit 1; }
touch "$stamp"
