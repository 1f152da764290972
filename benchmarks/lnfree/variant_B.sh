#!/bin/bash
# Run from anywhere in the repository (it changes to the root); re-running it resumes each stage (--resume).
# variant B: A + training guard 4 (exceedance penalised), ramp 65 of 120 steps
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=1
NS=".venv/bin/normscope"
ARGS="remove-ln smollm2-135m --text ../shared/corpus/sherlock_holmes.txt --eval-text ../shared/corpus/peter_pan.txt --exact-bos --taper --ramp-shape cosine --start 8 --ramp-steps 65 --steps 120 --aux-sites all --aux-form log --aux-weight 0.2 --aux-anchor --guard 4 --distill --batch-size 4 --seq-len 128 --eval-max-tokens 8192 --save-every 25 --keep-checkpoints 1 --run-dir runs/B --out runs/B/report"
R=""; [ -d runs/B/ln-free ] && R="--resume"
eval $NS $ARGS --only ln-free $R || exit $?
R=""; [ -d runs/B/control ] && R="--resume"
eval $NS $ARGS --control --only control $R || exit $?
eval $NS $ARGS --control --resume
