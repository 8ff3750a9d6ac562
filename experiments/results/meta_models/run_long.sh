#!/usr/bin/env bash
# The meta-model results of the README at 20,000 rounds ("Meta-models: rates against
# conditioned"), run with the training program so that they resume: rerunning the same command
# continues every unfinished run from its last checkpoint (every 500 rounds). Federated, 25
# clients per round (one cohort), 500 held-out clients evaluated every 5,000 rounds, seeds 0-2
# (SEEDS), meta-models rates, conditioned and per_step (META_MODELS), algorithm meta_sgd
# (ALGORITHM=mfl for mfl), plain inner SGD (CLIENT_OPTIMIZER=momentum for the learned heavy-ball
# inner loop; those runs' names end in _momentum). Usage:
#   experiments/results/meta_models/run_long.sh k5|hetero_k5|k1|hetero
# Each run's personalization.json lands in
# ROOT/results/<algorithm>_<meta_model>[_momentum]_seed<seed>/ (ROOT:
# experiments/results/meta_models/<setting>_20k unless set).
set -euo pipefail
cd "$(dirname "$0")/../../.."
setting="${1:-}"
case "$setting" in
  k5) task_flags=(--shots=10 --inner_steps=5) ;;
  hetero_k5) task_flags=(--shots=2:20 --label_noise=0:1 --inner_steps=5) ;;
  k1) task_flags=(--shots=10 --inner_steps=1) ;;
  hetero) task_flags=(--shots=2:20 --label_noise=0:1 --inner_steps=1) ;;
  *) echo "usage: $0 k5|hetero_k5|k1|hetero" >&2; exit 2 ;;
esac
algorithm="${ALGORITHM:-meta_sgd}"
client_optimizer="${CLIENT_OPTIMIZER:-sgd}"
case "$client_optimizer" in
  sgd) suffix="" ;;
  momentum) suffix="_momentum" ;;
  *) echo "CLIENT_OPTIMIZER must be sgd or momentum, got '$client_optimizer'" >&2; exit 2 ;;
esac
root="${ROOT:-experiments/results/meta_models/${setting}_20k}"
for seed in ${SEEDS:-0 1 2}; do
  for meta_model in ${META_MODELS:-rates conditioned per_step}; do
    .venv/bin/python -m experiments.train --task=sinusoid --algorithm="$algorithm" \
      "${task_flags[@]}" --meta_model="$meta_model" --client_optimizer="$client_optimizer" \
      --total_rounds=20000 --seed="$seed" --num_eval_clients=500 --rounds_per_eval=5000 \
      --rounds_per_checkpoint=500 --root_output_dir="$root" \
      --experiment_name="${algorithm}_${meta_model}${suffix}_seed${seed}"
  done
done
