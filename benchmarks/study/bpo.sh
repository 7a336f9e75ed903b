#!/usr/bin/env bash
# #19 study: one RL run from an annealed checkpoint (benchmarks/study/bpo.yaml: BPO 4 + 4 forced
# rollouts, 8 prompts per step, constant lr), then its evals.
#   benchmarks/study/bpo.sh RUN FROM_CHECKPOINT DATA LR [KEY=VALUE ...]
# e.g. b13: bpo.sh runs/b13 runs/m3/checkpoints/sft DATA 3e-5 rl.rewards.length_cost=0.7 \
#           rl.std_normalize=false rl.bpo.decision_weighting=importance
set -euo pipefail
RUN=$1 FROM=$2 DATA=$3 LR=$4
shift 4
autothink train --config "$(dirname "$0")/bpo.yaml" train.init_from="$FROM" \
  data.train_path="$DATA" "stages=[{name: bpo, kind: rl, steps: ${STEPS:-160}, lr: $LR}]" \
  logging.run_dir="$RUN" logging.tensorboard=false "$@"
"$(dirname "$0")/evals.sh" "$RUN" "$DATA"
