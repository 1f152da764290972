#!/bin/bash
# Run from anywhere in the repository (it changes to the root); re-running it resumes each stage (--resume).
# variant A: exact BOS + smooth global gate (cosine, 150 steps) + log aux at every site + anchor + distill
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=1
NS=".venv/bin/normscope"
ARGS="remove-ln smollm2-135m --text ../shared/corpus/sherlock_holmes.txt --eval-text ../shared/corpus/peter_pan.txt --exact-bos --taper --ramp-shape cosine --start 10 --ramp-steps 110 --steps 200 --aux-sites all --aux-form log --aux-weight 0.2 --aux-anchor --distill --batch-size 4 --seq-len 128 --eval-max-tokens 8192 --save-every 25 --keep-checkpoints 1 --run-dir runs/A --out runs/A/report"
R=""; [ -d runs/A/ln-free ] && R="--resume"
eval $NS $ARGS --only ln-free $R || exit $?
R=""; [ -d runs/A/control ] && R="--resume"
eval $NS $ARGS --control --only control $R || exit $?
eval $NS $ARGS --control --resume
