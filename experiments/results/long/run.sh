#!/usr/bin/env bash
# The 60,000-round sinusoid runs of the README's results table (quality protocol: 1 inner step at
# 0.01, Adam 1e-3, 25 clients per round, 500 held-out clients). Rerunning resumes each run from
# its last checkpoint (kept under experiments/results/long/checkpoints/). --meta_model=rates: mfl's
# rows (and checkpoints) are of its learned rates alone, its default then.
set -euo pipefail
cd "$(dirname "$0")/../../.."
for shots in 10 5; do
  for algorithm in ${ALGORITHMS:-meta_sgd mfl maml}; do
    .venv/bin/python -m experiments.train --task=sinusoid --algorithm="$algorithm" --shots="$shots" \
      --total_rounds=60000 --num_eval_clients=500 --rounds_per_eval=10000 \
      --rounds_per_checkpoint=500 --checkpoints_to_keep=1 --rounds_per_log=1000 \
      --rounds_per_call="${ROUNDS_PER_CALL:-0}" --meta_model=rates \
      --root_output_dir=experiments/results/long --experiment_name="sinusoid_${shots}shot_${algorithm}"
  done
done
