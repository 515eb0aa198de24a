#!/usr/bin/env bash
# Set up ./.venv with torch and qlora (editable, with test tools). Safe to run again; does nothing when done.
#
# torch comes first and separately: a bare `torch` requirement pulls the multi-GB CUDA build. Without an
# NVIDIA GPU we ask for torch==2.13.0, which on this project's machines resolves to the local CPU wheel;
# elsewhere point QLORA_TORCH_INDEX at PyTorch's CPU index (https://download.pytorch.org/whl/cpu).
#
# Everything else is installed at the versions in constraints.txt: the ones the test suite last passed with
# (pyproject.toml keeps the ranges qlora supports). `make test-latest` sets up .venv-latest with the newest
# versions the ranges allow instead (QLORA_VENV=.venv-latest QLORA_CONSTRAINTS=), and `make lock` writes
# constraints.txt from .venv after a passing run.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${QLORA_VENV:-.venv}
constraints=${QLORA_CONSTRAINTS-constraints.txt}
stamp=$venv/.qlora-installed
if [[ -f $stamp && $stamp -nt pyproject.toml && ( -z $constraints || $stamp -nt $constraints ) ]]; then
  exit 0
fi
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${pip[@]}" "torch>=2.6,<2.14"
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch"
    "${pip[@]}" "torch==2.13.0" ${QLORA_TORCH_INDEX:+--index-url "$QLORA_TORCH_INDEX"}
  fi
fi
echo "setup: installing qlora and its dependencies into $venv${constraints:+ (versions from $constraints)}"
"${pip[@]}" -e '.[dev]' ${constraints:+--constraint "$constraints"} 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, bitsandbytes, peft, transformers, accelerate, hydra, datasets" \
  || { echo "setup: the install is incomplete; see the pip output above" >&2; exit 1; }
touch "$stamp"
