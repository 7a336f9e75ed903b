#!/usr/bin/env bash
# #19 study: a run's evals on the 1000 test questions: greedy auto/long/short (RUN/eval) and
# auto sampled at temperature 1 (RUN/eval_t1: the policy's P(think) per level), then its row.
#   benchmarks/study/evals.sh RUN DATA
set -euo pipefail
RUN=$1 DATA=$2
autothink eval --model "$RUN" --data "$DATA" --modes auto,long,short --out "$RUN/eval"
autothink eval --model "$RUN" --data "$DATA" --modes auto --temperature 1.0 --out "$RUN/eval_t1"
python "$(dirname "$0")/row.py" "$RUN"
