#!/usr/bin/env bash
# The GPU check in one command, run in the project root on a lent GPU machine (docs/benchmarks.md, "GPU check"):
#   scripts/gpu_check.sh [OUT] [--budget SECONDS]     # default OUT: $OUT; budget 360 s
#   scripts/gpu_check.sh --dry-run [OUT]              # the same parts on the CPU, bench.py's tiny workload
# First installs what the machine's image lacks from .whl/ (filled by ../shared/gpu/wheelhouse.sh and carried with
# the checkout), then runs scripts/gpu_check.py: versions, GPU tests, DDP, bench, longest probe, each under a
# deadline. Exit 1 only when a GPU test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
needed="import bitsandbytes, hydra, omegaconf, datasets, peft, transformers, accelerate"
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu-check: installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu-check: installing .whl failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
elif "$py" -c "$needed" 2>/dev/null; then
  echo "gpu-check: no .whl folder; the packages import as installed, so nothing to install"
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
else
  echo "gpu-check: no .whl folder and these do not all import: $needed (run ../shared/gpu/wheelhouse.sh here," \
       "carry .whl); the parts that need them will fail" >&2
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
exec "$py" scripts/gpu_check.py "$@"
