#!/usr/bin/env bash
# The meta-model results of the README at 20,000 rounds and K=5 ("Meta-models: results"), run
# with the training program so that they resume: rerunning the same command continues every
# unfinished run from its last checkpoint (every 500 rounds). Federated, 25 clients per round
# (one cohort), 500 held-out clients evaluated every 5,000 rounds, meta_sgd, seeds 0-2 (SEEDS),
# meta-models rates, conditioned and per_step (META_MODELS). Usage:
#   experiments/results/meta_models/run_long.sh k5|hetero_k5
# Each run's personalization.json lands in ROOT/results/meta_sgd_<meta_model>_seed<seed>/
# (ROOT: experiments/results/meta_models/<setting>_20k unless set).
set -euo pipefail
cd "$(dirname "$0")/../../.."
setting="${1:-}"
case "$setting" in
  k5) task_flags=(--shots=10 --inner_steps=5) ;;
  hetero_k5) task_flags=(--shots=2:20 --label_noise=0:1 --inner_steps=5) ;;
  *) echo "usage: $0 k5|hetero_k5" >&2; exit 2 ;;
esac
root="${ROOT:-experiments/results/meta_models/${setting}_20k}"
for seed in ${SEEDS:-0 1 2}; do
  for meta_model in ${META_MODELS:-rates conditioned per_step}; do
    .venv/bin/python -m experiments.train --task=sinusoid --algorithm=meta_sgd "${task_flags[@]}" \
      --meta_model="$meta_model" --total_rounds=20000 --seed="$seed" --num_eval_clients=500 \
      --rounds_per_eval=5000 --rounds_per_checkpoint=500 --root_output_dir="$root" \
      --experiment_name="meta_sgd_${meta_model}_seed${seed}"
  done
done
