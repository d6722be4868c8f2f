#!/usr/bin/env bash
# Evaluate models and baselines (HR@K / NDCG@K), sharded over GPUs when there are several.
#
#   ./evaluate.sh --data_dir O --split test --model out/sft [--baseline popularity] --output_dir X [...]
#
# Every argument goes to `python -m mimigenrec.evaluate` (run `./evaluate.sh --help` for all).
# Environment:
#   NPROC        processes to shard rows over (default: visible GPUs, 1 without a GPU);
#                > 1 launches torchrun --nproc_per_node NPROC
#   MASTER_PORT  torchrun rendezvous port (default 29511)
#   PYTHON       interpreter (default: .venv/bin/python next to this script if present, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    # shellcheck disable=SC1091
    source "$ROOT/.venv/bin/activate"
    PYTHON="$ROOT/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
case " $* " in
  *" --help "*|*" -h "*)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    echo
    exec "$PYTHON" -m mimigenrec.evaluate --help ;;
esac
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
if [[ "$NPROC" -gt 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29511}" \
    -m mimigenrec.evaluate "$@"
fi
exec "$PYTHON" -m mimigenrec.evaluate "$@"
