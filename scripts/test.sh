#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${VENV:-$ROOT/.venv}/bin/python"
# DeepSpeed compiles its CPU communication op on first use (minutes, once per machine);
# do it here so the ZeRO-2 SFT test runs instead of skipping. torch guards that build with a
# lock file that a killed build leaves behind, and every later DeepSpeed start then waits on it
# forever: clear a lock older than 20 minutes, and give the build a time limit.
lock=$("$PY" -c 'from torch.utils.cpp_extension import _get_build_directory as d; print(d("deepspeed_shm_comm", False) + "/lock")' 2>/dev/null || true)
if [ -n "$lock" ] && [ -n "$(find "$lock" -mmin +20 2>/dev/null)" ]; then
  echo "[test] removing a stale torch-extension lock left by a killed build: $lock"; rm -f "$lock"
fi
timeout 1200 "$PY" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >/dev/null 2>&1 \
  && export MIMIGENREC_TEST_DEEPSPEED=1 || echo "[test] DeepSpeed CPU op did not build; the ZeRO-2 test will skip"
exec "$PY" -m pytest -q -rs --durations=15 "$@" tests
