#!/usr/bin/env bash
# The main job: set up, preprocess the bundled Amazon data, SFT the tiny model (one checkpoint per
# epoch, the best on valid kept), GRPO it (constrained beam rollouts, a step kept only if it clearly beats the start on valid),
# evaluate both beside popularity and SASRec. Every step writes files the next one reads.
# The default recipe at a smaller size (4x128 model, fewer epochs and steps) so it runs in
# minutes on 2 CPU cores; bench/quality.py runs the full-size recipe.
#   MAIN_OUT     dataset dir                        (default data/Industrial_and_Scientific)
#   MAIN_RUNS    runs dir                           (default runs/main)
#   SFT_EPOCHS   SFT epochs                         (default 3)
#   GRPO_STEPS   GRPO steps                         (default 100)
#   SELECT_ROWS  valid rows choosing checkpoints    (default 500)
#   EVAL_ROWS    test rows evaluated                (default 500; 0 = all)
# A re-run retrains SFT and GRPO from scratch (their output dirs are replaced), so changed settings
# never mix with an earlier run's checkpoints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck source=examples/recipes/common.sh
source examples/recipes/common.sh   # the venv (python below is its interpreter), offline Hugging Face, step()
O="${MAIN_OUT:-data/Industrial_and_Scientific}"
RUNS="${MAIN_RUNS:-runs/main}"
RAW=data/raw/amazon18/Industrial_and_Scientific
NAME=Industrial_and_Scientific
SELECT_ROWS="${SELECT_ROWS:-500}"

step "1/6 preprocess $RAW -> $O"
python -m preprocess all --source amazon18 --raw_dir "$RAW" --category "$NAME" \
  --out_dir "$O" --kcore 0 --split loo --name "$NAME" --tasks sid_seq --sid_method rqvae

step "2/6 tiny backbone (4 layers x 128, from scratch) -> $RUNS/models/tiny"
rm -rf "$RUNS/models/tiny" "$RUNS/sft" "$RUNS/grpo"
python -m mimigenrec.models.backbones tiny --out "$RUNS/models/tiny" --data_dir "$O" --hidden_size 128 --num_layers 4 \
  --vocab_size 256 --embed_std 0.02 --add_sid_tokens

step "3/6 SFT (llamafactory-cli, one checkpoint per epoch) -> $RUNS/sft"
bash sft.sh examples/sft/tiny_full.yaml model_name_or_path="$RUNS/models/tiny" output_dir="$RUNS/sft" \
  dataset_dir="$O" dataset="${NAME}_sft_train" eval_dataset="${NAME}_sft_valid" \
  num_train_epochs="${SFT_EPOCHS:-3}" learning_rate=3e-3

step "4/6 keep the SFT epoch with the best valid NDCG@10 -> $RUNS/sft"
python -m mimigenrec.eval.select_checkpoint --data_dir "$O" --run_dir "$RUNS/sft" --max_rows "$SELECT_ROWS"

# the recipe's GRPO with the one SFT model as its own teacher: teacher_kl is then a KL anchor to SFT, and
# 0.5 cf_logp distils SASRec into it, on half the users' valid prompts (labels removed); the watch scores
# the other half's valid rows
step "5/6 GRPO (TRL, 16 constrained beams per prompt, label-free prompts, a step kept only if it beats step 0 by 2 s.e. on held-out users) -> $RUNS/grpo"
bash trl_trainer.sh examples/rl/tiny_teacher.yaml model_name_or_path="$RUNS/sft" data_dir="$O" \
  output_dir="$RUNS/grpo" max_steps="${GRPO_STEPS:-100}" eval_every_steps=25 eval_rows="$SELECT_ROWS" \
  "teachers=[$RUNS/sft]"

step "6/6 evaluate on test -> $RUNS/eval"
bash evaluate.sh --data_dir "$O" --split test --model sft="$RUNS/sft" --model grpo="$RUNS/grpo" \
  --baseline popularity --baseline sasrec --max_rows "${EVAL_ROWS:-500}" --output_dir "$RUNS/eval" --overwrite
python -m mimigenrec.eval.compare "$RUNS/eval" sft grpo --metric ndcg@10

step "done"
cat <<MSG
dataset (SFT/RL JSON, id2sid.json, new_tokens.json, dataset_info.json): $O
tiny backbone:                                       $RUNS/models/tiny
SFT model (checkpoint_selection.json says which epoch): $RUNS/sft
GRPO model (selection.json, reward_watch.png):       $RUNS/grpo
metrics.json + predictions:                          $RUNS/eval
MSG
