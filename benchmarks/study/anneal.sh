#!/usr/bin/env bash
# #19 study: one annealing run (SFT on the digits-depth task), then its three-mode eval.
#   benchmarks/study/anneal.sh RUN DATA STEPS [KEY=VALUE ...]
# e.g. m2: anneal.sh runs/m2 DATA 1500 data.think_ratio=0.45
#      m3: anneal.sh runs/m3 DATA 300 train.init_from=runs/m2/checkpoints/sft optim.lr=3e-4 \
#          optim.min_lr=3e-5 'data.think_ratio_by_difficulty={1: 0.2, 2: 0.3, 3: 0.4, 4: 0.45, 5: 0.48}'
set -euo pipefail
RUN=$1 DATA=$2 STEPS=$3
shift 3
autothink train --config tiny_cpu data.train_path="$DATA" train.steps="$STEPS" \
  logging.run_dir="$RUN" logging.tensorboard=false "$@"
"$(dirname "$0")/evals.sh" "$RUN" "$DATA"
