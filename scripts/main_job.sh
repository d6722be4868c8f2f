#!/usr/bin/env bash
# The main job: set up, preprocess the bundled Amazon data, SFT the tiny model, GRPO it,
# evaluate both beside popularity and SASRec. Every step writes files the next one reads.
#   MAIN_OUT    dataset dir            (default data/Industrial_and_Scientific)
#   MAIN_RUNS   runs dir               (default runs/main)
#   SFT_STEPS   SFT optimizer steps    (default 600)
#   GRPO_STEPS  GRPO steps             (default 20)
#   EVAL_ROWS   test rows evaluated    (default 500; 0 = all)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="${VENV:-$ROOT/.venv}/bin/python"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O="${MAIN_OUT:-data/Industrial_and_Scientific}"
RUNS="${MAIN_RUNS:-runs/main}"
RAW=data/raw/amazon18/Industrial_and_Scientific
step() { printf '\n=== %s ===\n' "$*"; }

step "1/5 preprocess $RAW -> $O"
"$PY" -m preprocess all --source amazon18 --raw_dir "$RAW" --category Industrial_and_Scientific \
  --out_dir "$O" --kcore 0 --split loo --name Industrial_and_Scientific

step "2/5 tiny backbone -> $RUNS/models/tiny"
"$PY" -m mimigenrec.backbones tiny --out "$RUNS/models/tiny" --data_dir "$O" --embed_std 0.02

step "3/5 SFT (llamafactory-cli) -> $RUNS/sft"
bash sft.sh examples/sft/tiny_full.yaml model_name_or_path="$RUNS/models/tiny" \
  output_dir="$RUNS/sft" max_steps="${SFT_STEPS:-600}"

step "4/5 GRPO (TRL, trie-constrained) -> $RUNS/grpo"
bash trl_trainer.sh examples/rl/tiny_sample.yaml model_name_or_path="$RUNS/sft" data_dir="$O" \
  output_dir="$RUNS/grpo" max_steps="${GRPO_STEPS:-20}"

step "5/5 evaluate on test -> $RUNS/eval"
bash evaluate.sh --data_dir "$O" --split test --model sft="$RUNS/sft" --model grpo="$RUNS/grpo" \
  --baseline popularity --baseline sasrec --max_rows "${EVAL_ROWS:-500}" --output_dir "$RUNS/eval"

step "done"
cat <<MSG
dataset (SFT/RL JSON, id2sid.json, new_tokens.json): $O
registered datasets:                                 data/dataset_info.json
tiny backbone:                                       $RUNS/models/tiny
SFT model:                                           $RUNS/sft
GRPO model + reward/NDCG plot:                       $RUNS/grpo
metrics.json + predictions:                          $RUNS/eval
MSG
