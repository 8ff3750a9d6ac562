#!/usr/bin/env bash
# The meta-model results of the README ("Meta-models: results"): federated, 25 clients per round
# (one cohort), 500 held-out clients, seeds 0-2 (SEEDS), meta-models rates and conditioned
# (META_MODELS), the setting's algorithm (ALGORITHM overrides it), plain inner SGD
# (CLIENT_OPTIMIZER=momentum for the learned heavy-ball inner loop). Usage:
#   experiments/results/meta_models/run.sh k5|k1|hetero|digits|digits_var [ROUNDS]
# Rows are appended to experiments/results/meta_models/<task>_<setting>.md (and .jsonl).
set -euo pipefail
cd "$(dirname "$0")/../../.."
setting="$1"
task=sinusoid
algorithm=meta_sgd
case "$setting" in
  k5) rounds="${2:-5000}"; task_flags=(--shots=10 --inner_steps=5) ;;
  k1) rounds="${2:-20000}"; task_flags=(--shots=10 --inner_steps=1) ;;
  hetero) rounds="${2:-20000}"; task_flags=(--shots=2:20 --label_noise=0:1 --inner_steps=1) ;;
  digits) task=digits_fewshot; algorithm=mfl; rounds="${2:-1000}"; task_flags=(--shots=5) ;;
  digits_var) task=digits_fewshot; algorithm=mfl; rounds="${2:-1000}"; task_flags=(--shots=1:10) ;;
  *) echo "usage: $0 k5|k1|hetero|digits|digits_var [ROUNDS]" >&2; exit 2 ;;
esac
algorithm="${ALGORITHM:-$algorithm}"
client_optimizer="${CLIENT_OPTIMIZER:-sgd}"
for seed in ${SEEDS:-0 1 2}; do
  for meta_model in ${META_MODELS:-rates conditioned}; do
    .venv/bin/python -m experiments.quality --task="$task" --algorithms="$algorithm" \
      "${task_flags[@]}" --meta_model="$meta_model" \
      --client_optimizer="$client_optimizer" --rounds="$rounds" --seed="$seed" \
      --curve_steps=10 --output="experiments/results/meta_models/${task}_${setting}.md" \
      --tag="seed=${seed} ${task_flags[*]}"
  done
done
