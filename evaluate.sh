#!/usr/bin/env bash
# Evaluate models and baselines (HR@K / NDCG@K), sharded over GPUs when there are several.
#
#   ./evaluate.sh --data_dir O --split test --model out/sft [--baseline popularity] --output_dir X [...]
#
# Every argument goes to `python -m mimigenrec.eval.evaluate` (run `./evaluate.sh --help` for all);
# paths are relative to the directory you run it from.
# Environment:
#   NPROC        processes to shard rows over (default: visible GPUs, 1 without a GPU);
#                > 1 launches torchrun --nproc_per_node NPROC
#   MASTER_PORT  torchrun rendezvous port (default 29511)
#   VENV         virtualenv to activate (default: .venv next to this script when it exists; system = none)
#   PYTHON       interpreter (default: python after activation)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/activate.sh
source "$ROOT/scripts/activate.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # importable from any directory, installed or not
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
case " $* " in
  *" --help "*|*" -h "*)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo
    exec "$PYTHON" -m mimigenrec.eval.evaluate --help ;;
esac
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
if [[ "$NPROC" -gt 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29511}" \
    -m mimigenrec.eval.evaluate "$@"
fi
exec "$PYTHON" -m mimigenrec.eval.evaluate "$@"
