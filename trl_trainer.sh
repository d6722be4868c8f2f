#!/usr/bin/env bash
# GRPO with trie-constrained rollouts through accelerate. See --help.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./trl_trainer.sh CONFIG.yaml [key=value ...]

Runs GRPO (mimigenrec.rl.train_grpo: a TRL GRPOTrainer whose rollouts are trie-constrained valid
items) under `accelerate launch`, from the repository root. Paths: CONFIG, ACCELERATE_CONFIG
and path overrides (model_name_or_path, data_dir, output_dir, resume_from_checkpoint,
rewards=[path/to/file.py:fn]) may be relative to the directory you run from; relative paths
inside CONFIG are relative to the repository root. Before launching it checks the model folder,
the RL data, the reward names and the model's SID tokens, and stops with one line naming the
problem. Activates .venv if the repository has one.

  CONFIG        YAML config, e.g. examples/rl/tiny_sample.yaml, examples/rl/tiny_beam.yaml,
                examples/rl/smollm2_sample.yaml. Any trl GRPOConfig field plus mimigenrec's own:
                model_name_or_path, data_dir, train_split, eval_split, max_train_rows, rewards,
                reward_weights, retrieval_top_k, rollout_mode (sample|beam), constrained,
                use_lora, lora_r, lora_alpha, lora_dropout, lora_target_modules,
                lora_modules_to_save, eval_every_steps, eval_rows, eval_num_beams, eval_k, select_best,
                trainer (grpo | recpo: RecPO on an item-head folder, examples/head/recpo_tiny.yaml), recpo.
                `python -m mimigenrec.rl.train_grpo --help` describes each.
  key=value     override a config field; the value is parsed as YAML
                (max_steps=3, rewards=[rule,format], reward_weights=[1.0,0.2], use_lora=true,
                resume_from_checkpoint=runs/rl/x/checkpoint-2 or resume_from_checkpoint=true).

Environment:
  ACCELERATE_CONFIG   accelerate config file (default examples/accelerate/cpu.yaml). Shipped:
                      cpu.yaml, single_gpu.yaml, multi_gpu.yaml, multi_node.yaml,
                      ds_z2.yaml (DeepSpeed ZeRO-2), ds_z3.yaml (DeepSpeed ZeRO-3).
  NUM_PROCESSES       total processes over all machines (accelerate --num_processes)
  NUM_MACHINES        number of machines (--num_machines)
  MACHINE_RANK        rank of this machine, 0 = main (--machine_rank)
  MAIN_PROCESS_IP     address of machine 0 (--main_process_ip)
  MAIN_PROCESS_PORT   port on machine 0 (--main_process_port)
  VENV                virtualenv to activate (default <repo>/.venv when it exists; system = none)
  PYTHON              interpreter used when `accelerate` is not on PATH (default python)

Examples:
  ./trl_trainer.sh examples/rl/tiny_sample.yaml max_steps=3
  ./trl_trainer.sh examples/head/recpo_tiny.yaml model_name_or_path=runs/head/tiny_warmup max_steps=3
  ACCELERATE_CONFIG=examples/accelerate/single_gpu.yaml ./trl_trainer.sh examples/rl/smollm2_sample.yaml
  ACCELERATE_CONFIG=examples/accelerate/ds_z3.yaml NUM_PROCESSES=8 ./trl_trainer.sh examples/rl/smollm2_sample.yaml
  # two machines x 8 GPUs, run on each with its MACHINE_RANK:
  ACCELERATE_CONFIG=examples/accelerate/multi_node.yaml NUM_MACHINES=2 NUM_PROCESSES=16 MACHINE_RANK=0 \
    MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 ./trl_trainer.sh examples/rl/smollm2_sample.yaml
USAGE
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0 || exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER="$PWD"
CONFIG="$1"
shift
if [[ ! -f "$CONFIG" ]]; then
  echo "error: $CONFIG: config file not found: check the path (relative to the directory you run from)" >&2
  exit 2
fi
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
ACCEL_CFG="${ACCELERATE_CONFIG:-$ROOT/examples/accelerate/cpu.yaml}"
[[ "$ACCEL_CFG" == /* || ! -f "$ACCEL_CFG" ]] || ACCEL_CFG="$CALLER/$ACCEL_CFG"
cd "$ROOT"
if [[ ! -f "$ACCEL_CFG" ]]; then
  echo "error: $ACCEL_CFG: accelerate config not found: see examples/accelerate/" >&2
  exit 2
fi
# shellcheck source=scripts/activate.sh
source "$ROOT/scripts/activate.sh"
PY="${PYTHON:-python}"

# paths in the overrides are relative to the caller's directory: make them absolute once
RESOLVED="$("$PY" -m mimigenrec.launch resolve "$CALLER" "$@")"
eval "set -- $RESOLVED"
# one clear line instead of tracebacks from every accelerate process
"$PY" -m mimigenrec.launch check-rl "$CONFIG" "$@"
launch=(--config_file "$ACCEL_CFG")
[[ -n "${NUM_PROCESSES:-}" ]] && launch+=(--num_processes "$NUM_PROCESSES")
[[ -n "${NUM_MACHINES:-}" ]] && launch+=(--num_machines "$NUM_MACHINES")
[[ -n "${MACHINE_RANK:-}" ]] && launch+=(--machine_rank "$MACHINE_RANK")
[[ -n "${MAIN_PROCESS_IP:-}" ]] && launch+=(--main_process_ip "$MAIN_PROCESS_IP")
[[ -n "${MAIN_PROCESS_PORT:-}" ]] && launch+=(--main_process_port "$MAIN_PROCESS_PORT")

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if command -v accelerate >/dev/null 2>&1; then
  exec accelerate launch "${launch[@]}" -m mimigenrec.rl.train_grpo "$CONFIG" "$@"
else
  exec "$PY" -m accelerate.commands.launch "${launch[@]}" -m mimigenrec.rl.train_grpo "$CONFIG" "$@"
fi
