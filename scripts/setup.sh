#!/usr/bin/env bash
# One-step install: creates $VENV (default .venv in the repo root) and installs
# mimigenrec with its pinned dependencies. Idempotent: a finished install is
# detected by a stamp file and skipped.
#   EXTRAS  pip extras to install (default "dev")
#   VENV    virtual-env directory (default <repo>/.venv); VENV=system uses the current python
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-dev}"
PY="${PYTHON:-python3}"

if [[ "$VENV" != system ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
fi
STAMP="$($PY -c 'import sys;print(sys.prefix)')/.mimigenrec-$EXTRAS-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [[ -f "$STAMP" ]]; then echo "[setup] up to date ($PY)"; exit 0; fi

PIP=("$PY" -m pip install --disable-pip-version-check)
"${PIP[@]}" -q --upgrade pip setuptools wheel

# torch: keep an existing CUDA build; otherwise install the pinned CPU build.
if "$PY" -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "[setup] keeping CUDA torch $("$PY" -c 'import torch;print(torch.__version__)')"
  HAS_CUDA=1
else
  TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
  "${PIP[@]}" "torch==$TORCH_VERSION"
  HAS_CUDA=0
  # Keep that torch: without the constraint, llamafactory's torchvision requirement
  # would pull a multi-GB CUDA torch.
  CONSTRAINT="$(mktemp)"; echo "torch==$TORCH_VERSION" > "$CONSTRAINT"
  PIP+=(-c "$CONSTRAINT")
fi

"${PIP[@]}" -e "$ROOT[$EXTRAS]"

# Pitfall (DESIGN §4): PyPI torchvision/torchaudio are CUDA-linked and fail to
# import beside a CPU torch. Nothing here needs torchvision; llamafactory imports
# torchaudio at top level, and torchaudio's Python part imports fine without its
# compiled extension. Only on CPU machines.
if [[ "$HAS_CUDA" == 0 ]]; then
  if "$PY" -c 'import torchvision' 2>/dev/null; then :; else
    "$PY" -m pip uninstall -y -q torchvision 2>/dev/null || true
  fi
  if ! "$PY" -c 'import torchaudio' 2>/dev/null; then
    "$PY" -m pip uninstall -y -q torchaudio 2>/dev/null || true
    "${PIP[@]}" -q --no-deps "torchaudio==${TORCHAUDIO_VERSION:-2.9.1}"
    SITE="$("$PY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
    rm -f "$SITE"/torchaudio/lib/*.so "$SITE"/torchaudio/_torchaudio*.so 2>/dev/null || true
  fi
fi
"$PY" -c 'import torch, trl, transformers, llamafactory; print("[setup] ok: torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__, "llamafactory", llamafactory.__version__)'
touch "$STAMP"
