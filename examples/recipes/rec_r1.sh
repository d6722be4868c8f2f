#!/usr/bin/env bash
# Rec-R1 recipe: query generation with a retrieval reward, end to end.
#
#   bash examples/recipes/rec_r1.sh                         # bundled Amazon data, SmolLM2-135M-Instruct, CPU-sized
#   DATASET=ml100k GRPO_STEPS=200 bash examples/recipes/rec_r1.sh
#
# Stages (STAGES, in this order):
#   data   source stage (amazon18 bundled / movielens --fetch_ml100k) + build --tasks query: the prompt
#          shows the user's history titles and asks for a short search query (optionally after
#          <think>); RL rows carry the target item (extra_info.target) for the reward
#   zero   evaluate the model zero-shot: its greedy query, parsed by mimigenrec.prompts.parse_query, ranks
#          the catalogue with BM25 (the retrieval_ndcg reward's index, built once); HR@10/50 and NDCG@10 of
#          the target, beside query_last (the last history title as the query) and query_history (every
#          history title)
#   grpo   TRL GRPO (examples/rl/query_smollm2.yaml): retrieval_ndcg + 0.1 x query_format, free-form rollouts
#   eval   the GRPO model on the same rows; paired bootstrap of GRPO - zero-shot
#
# Environment (defaults in brackets):
#   DATASET [amazon]  OUT [runs/recipes/rec_r1/$DATASET]  MODEL [runs/models/smollm2] (imported from GGUF if missing)
#   GRPO_STEPS [20]   GRPO_CONFIG [examples/rl/query_smollm2.yaml]   EVAL_ROWS [200]   MAX_NEW_TOKENS [48]
#   NICE [15]
set -euo pipefail
# shellcheck source=examples/recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # ROOT (cwd), venv, offline HF, run / has / step, NICE
DATASET="${DATASET:-amazon}"
OUT="${OUT:-runs/recipes/rec_r1/$DATASET}"
O="$OUT/data"
STAGES=" ${STAGES:-data zero grpo eval} "
MODEL="${MODEL:-runs/models/smollm2}"
EVAL_ROWS="${EVAL_ROWS:-200}"
mkdir -p "$OUT"
common=(--data_dir "$O" --split test --task query --ks 1,10,50 --max_rows "$EVAL_ROWS" --seed 0
        --max_new_tokens "${MAX_NEW_TOKENS:-48}" --batch_size 8 --quiet)

if has data; then
  step "data: $DATASET -> $O (query task)"
  if [[ "$DATASET" == amazon ]]; then
    run python -m preprocess amazon18 --raw_dir data/raw/amazon18/Industrial_and_Scientific \
      --category Industrial_and_Scientific --out_dir "$O" --kcore 0 --split loo
  elif [[ "$DATASET" == ml100k ]]; then
    run python -m preprocess movielens --fetch_ml100k --out_dir "$O" --split loo
  else
    echo "error: DATASET=$DATASET: choose amazon or ml100k" >&2; exit 2
  fi
  run python -m preprocess build --out_dir "$O" --name "recr1_$(basename "$OUT")" \
    --tasks query --eval_tasks query --rl_tasks query --sft_model "$MODEL"
fi
if [[ ! -f "$MODEL/config.json" ]]; then
  run python -m mimigenrec.models.gguf_import --model smollm2 --out "$MODEL"
fi

if has zero; then
  step "zero-shot: $MODEL beside query_last and query_history"
  run bash evaluate.sh "${common[@]}" --model zero_shot="$MODEL" --output_dir "$OUT/eval"
fi

if has grpo; then
  step "grpo: ${GRPO_CONFIG:-examples/rl/query_smollm2.yaml} -> $OUT/grpo"
  rm -rf "$OUT/grpo"
  run bash trl_trainer.sh "${GRPO_CONFIG:-examples/rl/query_smollm2.yaml}" model_name_or_path="$MODEL" \
    data_dir="$O" output_dir="$OUT/grpo" max_steps="${GRPO_STEPS:-20}"
fi

if has eval; then
  step "eval: zero-shot and GRPO on the same rows"
  run bash evaluate.sh "${common[@]}" --model zero_shot="$MODEL" --model grpo="$OUT/grpo" --output_dir "$OUT/eval"
  python -m mimigenrec.eval.compare "$OUT/eval" zero_shot grpo --metric ndcg@10
  python -m mimigenrec.eval.compare "$OUT/eval" zero_shot grpo --metric hr@50
fi
echo "[recipe] outputs under $OUT (data/, grpo/, eval/)"
