#!/usr/bin/env bash
# sft.sh: supervised fine-tuning with stock LLaMA-Factory, the dataset's SID tokens injected.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash sft.sh CONFIG.yaml [key=value ...]

Runs `llamafactory-cli ${SFT_CMD:-train} CONFIG.yaml add_tokens=<SID tokens> key=value ...` from the
repository root. Paths: CONFIG.yaml and path overrides (output_dir, model_name_or_path,
dataset_dir, deepspeed, ...) may be relative to the directory you run from; relative paths
inside the YAML are relative to the repository root (the yamls `preprocess build` writes hold
absolute paths).

Before training it checks the config (model folder, registered datasets) and records the
fingerprint of the run's inputs in output_dir/mimigenrec_inputs.json. With the build yamls
(overwrite_output_dir: false) a re-run resumes from the last checkpoint, and is refused when
the checkpoints were trained on other inputs (data, base model, tokens).

add_tokens: read from the new_tokens.json of the preprocessed directory that the config's
`dataset` (and `eval_dataset`) belong to, via `dataset_dir`/dataset_info.json
(file_name O/sft/<split>.json -> O/new_tokens.json). Skipped when the YAML or an override
already sets add_tokens. The tokens are added as normal (non-special) tokens and
LLaMA-Factory resizes the embeddings.

Overrides: any LLaMA-Factory argument, e.g. num_train_epochs=1 learning_rate=1e-4
output_dir=runs/sft/x report_to=none bf16=false eval_strategy=no. LLaMA-Factory reads them
as YAML 1.1 (OmegaConf), where no/yes/on/off/y/n are booleans; sft.sh quotes such values
(eval_strategy=no is passed as eval_strategy='no'), so only true/false are booleans there.
Inside CONFIG.yaml LLaMA-Factory's YAML 1.1 reading applies: write save_strategy: 'no'.

Environment:
  VENV             virtualenv to activate (default: <repo>/.venv when it exists; system = none)
  NPROC_PER_NODE   processes (GPUs) per node (default 1); >1 launches torchrun
  NNODES           number of nodes (default 1)
  NODE_RANK        rank of this node (default 0)
  MASTER_ADDR      address of node 0 (default 127.0.0.1)
  MASTER_PORT      port on node 0 (default: a free port)
  DEEPSPEED        DeepSpeed config, e.g. examples/deepspeed/ds_z2.json (adds deepspeed=...).
                   Any DeepSpeed config (env, YAML or override) forces torchrun;
                   ZeRO-2 also runs on CPU with NPROC_PER_NODE=1
  FORCE_TORCHRUN   1 forces torchrun even for one process (set automatically as above)
  SFT_CMD          llamafactory-cli subcommand: train (default) or export (LoRA merge:
                   examples/merge/lora_merge.yaml, which needs the same add_tokens as training;
                   afterwards a tied lm_head trained apart from embed_tokens is untied)
  DRY_RUN          1 prints the command instead of running it

Examples:
  bash sft.sh examples/sft/tiny_full.yaml
  SFT_CMD=export bash sft.sh examples/merge/lora_merge.yaml
  NPROC_PER_NODE=8 DEEPSPEED=examples/deepspeed/ds_z2.json bash sft.sh examples/sft/amazon_full.yaml
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
    bash sft.sh examples/sft/amazon_full.yaml
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -lt 1 ]] && exit 2 || exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER="$PWD"
CONFIG="$1"; shift
if [[ ! -f "$CONFIG" ]]; then
  echo "error: $CONFIG: config file not found: check the path (relative to the directory you run from)" >&2
  exit 2
fi
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"

# shellcheck source=scripts/activate.sh
source "$ROOT/scripts/activate.sh"
cd "$ROOT"

ARGS=("$@")
if [[ -n "${DEEPSPEED:-}" ]]; then
  ARGS+=("deepspeed=$DEEPSPEED")
fi
# paths in the overrides are relative to the caller's directory: make them absolute once
RESOLVED="$(python -m mimigenrec.launch resolve "$CALLER" "${ARGS[@]}")"
eval "ARGS=($RESOLVED)"
# YAML 1.2 booleans: keep no/yes/on/off/y/n strings (TrainingArguments rejects eval_strategy=False)
for i in "${!ARGS[@]}"; do
  a="${ARGS[$i]}"; v="${a#*=}"
  if [[ "$a" == *=* && "${v,,}" =~ ^(yes|no|on|off|y|n)$ ]]; then ARGS[$i]="${a%%=*}='$v'"; fi
done

# The SID tokens of the dataset(s); empty when the config or an override already sets add_tokens.
TOKENS="$(python -m mimigenrec.sft_config add-tokens "$CONFIG" "${ARGS[@]}")"
if [[ -n "$TOKENS" ]]; then
  ARGS=("add_tokens=$TOKENS" "${ARGS[@]}")
  echo "sft.sh: adding $(awk -F, '{print NF}' <<<"$TOKENS") SID tokens from the dataset's new_tokens.json" >&2
fi

SFT_CMD="${SFT_CMD:-train}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
DS_CONFIG="$(python -m mimigenrec.sft_config get "$CONFIG" deepspeed "${ARGS[@]}")"
if [[ "$SFT_CMD" == "train" && ( "$NPROC_PER_NODE" -gt 1 || "${NNODES:-1}" -gt 1 || -n "$DS_CONFIG" ) ]]; then
  export FORCE_TORCHRUN=1
fi

CMD=(llamafactory-cli "$SFT_CMD" "$CONFIG" "${ARGS[@]}")
if [[ "$SFT_CMD" == "train" && "${DRY_RUN:-0}" != "1" ]]; then
  python -m mimigenrec.sft_config check "$CONFIG" "${ARGS[@]}"
fi
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
if [[ "$SFT_CMD" != "export" ]]; then
  exec "${CMD[@]}"
fi
"${CMD[@]}"
# A tied-embedding backbone's LoRA trains embed_tokens and lm_head as separate copies: keep both.
EXPORT_DIR="$(python -m mimigenrec.sft_config get "$CONFIG" export_dir "${ARGS[@]}")"
python -m mimigenrec.sft_config untie-merged "$EXPORT_DIR"
