#!/bin/bash
# Run from the worktree root; re-running the script resumes each stage (--resume) where it stopped.
# variant A: exact BOS + smooth global gate (cosine, 150 steps) + log aux at every site + anchor + distill
cd /work/wt-lnfree
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-lnfree
NS="/work/main/.venv/bin/python -c 'from normscope.cli import app; app()'"
ARGS="remove-ln smollm2-135m --text /work/shared/corpus/sherlock_holmes.txt --eval-text /work/shared/corpus/peter_pan.txt --exact-bos --taper --ramp-shape cosine --start 10 --ramp-steps 110 --steps 200 --aux-sites all --aux-form log --aux-weight 0.2 --aux-anchor --distill --batch-size 4 --seq-len 128 --eval-max-tokens 8192 --save-every 25 --keep-checkpoints 1 --run-dir runs/A --out runs/A/report"
R=""; [ -d runs/A/ln-free ] && R="--resume"
eval $NS $ARGS --only ln-free $R || exit $?
R=""; [ -d runs/A/control ] && R="--resume"
eval $NS $ARGS --control --only control $R || exit $?
eval $NS $ARGS --control --resume
