#!/usr/bin/env bash
# The README's "Communication against accuracy" table: fedavg (+ fine-tuning), maml, meta_sgd and
# mfl under --aggregator=mean and --aggregator=compressed (8 bits), same seed and budget. Usage:
#   experiments/results/communication/run.sh digits_fewshot|sinusoid [ROUNDS]
# Writes experiments/results/communication/<task>_<aggregator>/comparison.md (and .png).
# --meta_model=rates: the tables were run with mfl's learned rates alone, its default then.
set -euo pipefail
cd "$(dirname "$0")/../../.."
task="$1"
case "$task" in
  digits_fewshot) rounds="${2:-300}"; flags=(--target=0.9 --rounds_per_eval=20) ;;
  sinusoid) rounds="${2:-2000}"; flags=(--target=0.5 --rounds_per_eval=100) ;;
  *) echo "usage: $0 digits_fewshot|sinusoid [ROUNDS]" >&2; exit 2 ;;
esac
for aggregator in ${AGGREGATORS:-mean compressed}; do
  .venv/bin/python -m experiments.compare --task="$task" \
    --algorithms=fedavg,maml,meta_sgd,mfl --total_rounds="$rounds" --num_eval_clients=100 \
    --aggregator="$aggregator" "${flags[@]}" --meta_model=rates \
    --output_dir="experiments/results/communication/${task}_${aggregator}"
done
