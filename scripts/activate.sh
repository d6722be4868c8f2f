# Sourced by sft.sh, trl_trainer.sh and evaluate.sh (after they set ROOT): activates the project's
# virtualenv, $VENV (default $ROOT/.venv, as scripts/setup.sh creates it), when it exists.
# VENV=system keeps whatever python is on PATH.
VENV="${VENV:-$ROOT/.venv}"
if [[ "$VENV" != system && -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
