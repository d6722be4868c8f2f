# Sourced by the recipe launchers in this folder (after `set -euo pipefail`): the repository root as
# the working directory, the project's virtualenv, offline Hugging Face, and the stage helpers.
#   run CMD...   print CMD, run it at niceness NICE (default 15; absolute, so a recipe started under
#                nice is not pushed further down) and print its wall / user time
#   has STAGE    whether STAGE is in " $STAGES " (the launcher sets STAGES with spaces around)
#   step TEXT    a stage banner
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/activate.sh
source "$ROOT/scripts/activate.sh"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NICE="${NICE:-15}"
run() { echo "+ $*" >&2; /usr/bin/time -f "[time] %e s wall, %U s user: ${1} ${2:-}" nice -n "$(( NICE > $(nice) ? NICE - $(nice) : 0 ))" "$@"; }
has() { [[ "$STAGES" == *" $1 "* ]]; }
step() { printf '\n=== %s ===\n' "$*"; }
