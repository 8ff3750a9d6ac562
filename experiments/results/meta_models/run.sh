#!/usr/bin/env bash
# The meta-model results of the README ("Meta-models: results"): federated sinusoid, 25 clients
# per round (one cohort), 500 held-out clients, seeds 0-2. Usage:
#   experiments/results/meta_models/run.sh k5|k1|hetero [ROUNDS]
# Rows are appended to experiments/results/meta_models/sinusoid_<setting>.md (and .jsonl).
set -euo pipefail
cd "$(dirname "$0")/../../.."
setting="$1"
case "$setting" in
  k5) rounds="${2:-5000}"; task_flags=(--shots=10 --inner_steps=5) ;;
  k1) rounds="${2:-20000}"; task_flags=(--shots=10 --inner_steps=1) ;;
  hetero) rounds="${2:-20000}"; task_flags=(--shots=2:20 --label_noise=0:1 --inner_steps=1) ;;
  *) echo "usage: $0 k5|k1|hetero [ROUNDS]" >&2; exit 2 ;;
esac
for seed in ${SEEDS:-0 1 2}; do
  for meta_model in ${META_MODELS:-rates conditioned}; do
    .venv/bin/python -m experiments.quality --task=sinusoid --algorithms=meta_sgd \
      "${task_flags[@]}" --meta_model="$meta_model" --rounds="$rounds" --seed="$seed" \
      --curve_steps=10 --output="experiments/results/meta_models/sinusoid_${setting}.md" \
      --tag="meta_model=${meta_model} seed=${seed} ${task_flags[*]}"
  done
done
