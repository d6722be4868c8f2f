#!/usr/bin/env bash
# MLLMRec-R1 recipe: candidate ranking with reasoning, end to end.
#
#   bash examples/recipes/mllmrec_r1.sh                       # bundled Amazon data, CPU-sized defaults
#   DATASET=ml100k bash examples/recipes/mllmrec_r1.sh        # MovieLens-100k, fetched at run time
#   COT_MODE=think COT_PROB=0.1 bash examples/recipes/mllmrec_r1.sh
#   STAGES="build sft grpo eval" COT_PROB=0.05 OUT=runs/recipes/p005 bash examples/recipes/mllmrec_r1.sh
#
# Stages (STAGES, space-separated, in this order):
#   data     source stage only (amazon18 bundled / movielens --fetch_ml100k): titles are all cand_rank needs
#   caption  item images -> captions (only with CAPTION_MODEL or CAPTION_URL; a vision-language model)
#   cot      pseudo-CoT draft -> refinement by a real LLM (SmolLM2-135M-Instruct, HF backend, or any
#            OpenAI-compatible endpoint such as the llama.cpp server: COT_URL) -> likelihood-judge filter
#   build    cand_rank SFT/RL rows, 1 target + NEG negatives per row (one seeded list per row, recorded
#            in build_stats.json and ranked again by evaluation), CoT in COT_PROB of the rows whose CoT
#            was kept, in COT_MODE reference (CoT shown in the prompt) or think (<think>CoT</think> target)
#   sft      tiny backbone (or BACKBONE=DIR) -> llamafactory-cli through sft.sh
#   grpo     TRL GRPO through trl_trainer.sh: candidate_choice + 0.3 x format (MLLMRec-R1's +1 hit /
#            0.3 valid miss / -1 bad format); reference mode: trie-constrained rollouts over the row's
#            candidates; think mode: free-form <think>...</think>[ITEM_n] rollouts
#   eval     the SFT and GRPO models beside popularity and SASRec on the SAME lists: build's 9-negative
#            lists, then 99 fresh negatives per row; HR@1/3/5, NDCG@3/5; paired bootstrap of GRPO - SFT
#
# Environment (defaults in brackets):
#   DATASET [amazon] amazon | ml100k        OUT [runs/recipes/mllmrec_r1/$DATASET]
#   DATA [$OUT/data]  the dataset folder (share one between runs: same candidate lists, cached SASRec)
#   COT_ROWS [200]    first N train rows that get CoT (CPU-sized; 0 = all)
#   COT_MODEL [runs/models/smollm2]  HF folder of the CoT LLM and of the likelihood judge (imported from
#                     GGUF with python -m mimigenrec.models.gguf_import when missing)
#   COT_URL []        OpenAI-compatible endpoint instead of the HF backend (e.g. http://127.0.0.1:8080/v1)
#   COT_THRESHOLD [0.5]  judge score a CoT needs to be kept
#   COT_PROB [0.1]    COT_MODE [reference]    NEG [9]    SEED [42]
#   BACKBONE [tiny]   tiny = a 2x64 from-scratch Qwen2 (python -m mimigenrec.models.backbones tiny), or a model DIR
#   SFT_STEPS [400]   SFT_LR [2e-3]   SFT_BS [16]
#   GRPO_STEPS [40]   GRPO_CONFIG [examples/rl/cand_rank_tiny.yaml, or cand_rank_think.yaml in think mode]
#   GRPO_ARGS []      more key=value overrides for trl_trainer.sh (e.g. "eval_rows=100 learning_rate=5e-5")
#   EVAL_ROWS [300]   test rows evaluated (seeded subset; 0 = all)     THINK_EVAL [auto: on in think mode]
#   SASREC_EPOCHS [50]
# Every command runs under nice; set NICE=0 on a machine of your own.
set -euo pipefail
# shellcheck source=examples/recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # ROOT (cwd), venv, offline HF, run / has / step, NICE
DATASET="${DATASET:-amazon}"
OUT="${OUT:-runs/recipes/mllmrec_r1/$DATASET}"
O="${DATA:-$OUT/data}"
STAGES=" ${STAGES:-data cot build sft grpo eval} "
COT_ROWS="${COT_ROWS:-200}"
COT_MODEL="${COT_MODEL:-runs/models/smollm2}"
COT_PROB="${COT_PROB:-0.1}"
COT_MODE="${COT_MODE:-reference}"
NEG="${NEG:-9}"
SEED="${SEED:-42}"
BACKBONE="${BACKBONE:-tiny}"
EVAL_ROWS="${EVAL_ROWS:-300}"
if [[ "$COT_MODE" == think ]]; then
  GRPO_CONFIG="${GRPO_CONFIG:-examples/rl/cand_rank_think.yaml}"
  THINK_EVAL="${THINK_EVAL:-1}"
else
  GRPO_CONFIG="${GRPO_CONFIG:-examples/rl/cand_rank_tiny.yaml}"
  THINK_EVAL="${THINK_EVAL:-0}"
fi
mkdir -p "$OUT"

if has data; then
  step "data: $DATASET -> $O"
  if [[ "$DATASET" == amazon ]]; then
    run python -m preprocess amazon18 --raw_dir data/raw/amazon18/Industrial_and_Scientific \
      --category Industrial_and_Scientific --out_dir "$O" --kcore 0 --split loo
  elif [[ "$DATASET" == ml100k ]]; then
    run python -m preprocess movielens --fetch_ml100k --out_dir "$O" --split loo
  else
    echo "error: DATASET=$DATASET: choose amazon or ml100k" >&2; exit 2
  fi
fi

if has caption; then
  if [[ -n "${CAPTION_URL:-}" ]]; then
    step "caption: $CAPTION_URL"
    run python -m preprocess caption --out_dir "$O" --backend http --base_url "$CAPTION_URL" --api_model "${CAPTION_API_MODEL:-default}"
  elif [[ -n "${CAPTION_MODEL:-}" ]]; then
    step "caption: $CAPTION_MODEL"
    run python -m preprocess caption --out_dir "$O" --backend hf --model "$CAPTION_MODEL"
  else
    echo "[recipe] caption: no CAPTION_MODEL / CAPTION_URL (a vision-language model): skipped" >&2
  fi
fi

if has cot; then
  step "cot: first $COT_ROWS train rows, refinement + likelihood judge"
  if [[ ! -f "$COT_MODEL/config.json" ]]; then
    run python -m mimigenrec.models.gguf_import --model smollm2 --out "$COT_MODEL"
  fi
  limit=(); [[ "$COT_ROWS" != 0 ]] && limit=(--limit "$COT_ROWS")
  if [[ -n "${COT_URL:-}" ]]; then
    backend=(--backend http --base_url "$COT_URL" --api_model "${COT_API_MODEL:-default}")
  else
    backend=(--backend hf --model "$COT_MODEL")
  fi
  run python -m preprocess cot --out_dir "$O" --split train "${limit[@]}" "${backend[@]}" \
    --judge likelihood --judge_model "$COT_MODEL" --threshold "${COT_THRESHOLD:-0.5}" --batch_size 8
fi

if has build; then
  step "build: cand_rank, $NEG negatives, cot_prob $COT_PROB ($COT_MODE)"
  run python -m preprocess build --out_dir "$O" --name "mllmrec_$(basename "$OUT")" \
    --tasks cand_rank --eval_tasks cand_rank --rl_tasks cand_rank --cot_tasks cand_rank \
    --num_negatives "$NEG" --cot_prob "$COT_PROB" --cot_mode "$COT_MODE" --seed "$SEED" \
    --sft_model "$OUT/backbone"
fi

if has sft; then
  step "sft: $BACKBONE -> $OUT/sft"
  if [[ "$BACKBONE" == tiny ]]; then
    rm -rf "$OUT/backbone"
    run python -m mimigenrec.models.backbones tiny --out "$OUT/backbone" --data_dir "$O" --embed_std 0.02
    MODEL="$OUT/backbone"
  else
    MODEL="$BACKBONE"
  fi
  rm -rf "$OUT/sft"
  run bash sft.sh "$O/sft_full.yaml" model_name_or_path="$MODEL" output_dir="$OUT/sft" \
    max_steps="${SFT_STEPS:-400}" learning_rate="${SFT_LR:-2e-3}" per_device_train_batch_size="${SFT_BS:-16}" \
    save_steps=100000 overwrite_output_dir=true logging_steps=20
fi

if has grpo; then
  step "grpo: $GRPO_CONFIG -> $OUT/grpo"
  rm -rf "$OUT/grpo"
  run bash trl_trainer.sh "$GRPO_CONFIG" model_name_or_path="$OUT/sft" data_dir="$O" output_dir="$OUT/grpo" \
    max_steps="${GRPO_STEPS:-40}" ${GRPO_ARGS:-}
fi

if has eval; then
  think=(); [[ "$THINK_EVAL" == 1 ]] && think=(--think --max_new_tokens "${MAX_NEW_TOKENS:-160}")
  models=(--model sft="$OUT/sft"); [[ -f "$OUT/grpo/config.json" ]] && models+=(--model grpo="$OUT/grpo")
  common=(--data_dir "$O" --split test --task cand_rank "${models[@]}" --baseline popularity --baseline sasrec
          --sasrec_epochs "${SASREC_EPOCHS:-50}" --ks 1,3,5 --max_rows "$EVAL_ROWS" --seed 0 --quiet "${think[@]}")
  step "eval: build's $NEG-negative lists (the ones SFT and GRPO saw)"
  run bash evaluate.sh "${common[@]}" --output_dir "$OUT/eval_n$NEG"
  step "eval: 99 fresh negatives per row, the same lists for every method"
  run bash evaluate.sh "${common[@]}" --candidates sample --num_negatives 99 --output_dir "$OUT/eval_n99"
  if [[ -f "$OUT/grpo/config.json" ]]; then
    for d in "$OUT/eval_n$NEG" "$OUT/eval_n99"; do
      python -m mimigenrec.eval.compare "$d" sft grpo --metric hr@1
      python -m mimigenrec.eval.compare "$d" sft grpo --metric ndcg@3
    done
  fi
fi
echo "[recipe] outputs under $OUT (data/, sft/, grpo/ with reward_watch.png, eval_n$NEG/, eval_n99/)"
