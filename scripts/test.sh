#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${VENV:-$ROOT/.venv}/bin/python"
# DeepSpeed compiles its CPU communication op on first use (minutes, once per machine);
# do it here so the ZeRO-2 SFT test runs instead of skipping.
"$PY" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >/dev/null 2>&1 \
  && export MIMIGENREC_TEST_DEEPSPEED=1 || echo "[test] DeepSpeed CPU op did not build; the ZeRO-2 test will skip"
exec "$PY" -m pytest -q -rs --durations=15 "$@" tests
