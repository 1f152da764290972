#!/bin/bash
# The full-removal variants of the README's table, as one resumable script: bash benchmarks/lnfree/variant.sh C
# Run from anywhere in the repository (it changes to the root); re-running it resumes each stage (--resume):
# the LN-free run, then the control, then the scoring of both.
#   A: exact BOS + smooth cosine gate over 110 of 200 steps + log aux at every site + anchor + distill
#   B: A + training guard 4, gate over 65 of 120 steps
#   C: B with the gate over 400 of 600 steps
#   D: a warm start from C's finished run (both parts): 240 more steps with every site removed, at a quarter of
#      C's peak learning rate and half its gradient clip (the gate held at 1; C's control continued alike)
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=1
V=${1:?give the variant: A, B, C or D}
case "$V" in
  A) SCHEDULE="--start 10 --ramp-steps 110 --steps 200" ;;
  B) SCHEDULE="--start 8 --ramp-steps 65 --steps 120 --guard 4" ;;
  C) SCHEDULE="--start 10 --ramp-steps 400 --steps 600 --guard 4" ;;
  D) SCHEDULE="--init-from runs/C --steps 240 --lr 5e-5 --grad-clip 0.5 --guard 4" ;;
  *) echo "unknown variant '$V'; give A, B, C or D" >&2; exit 2 ;;
esac
ARGS=(remove-ln smollm2-135m --text ../shared/corpus/sherlock_holmes.txt --eval-text ../shared/corpus/peter_pan.txt
      --exact-bos --taper --ramp-shape cosine $SCHEDULE --aux-sites all --aux-form log --aux-weight 0.2 --aux-anchor
      --distill --batch-size 4 --seq-len 128 --eval-max-tokens 8192 --save-every 25 --keep-checkpoints 1
      --run-dir "runs/$V" --out "runs/$V/report")
R=(); [ -d "runs/$V/ln-free" ] && R=(--resume)
.venv/bin/normscope "${ARGS[@]}" --only ln-free "${R[@]}" || exit $?
R=(); [ -d "runs/$V/control" ] && R=(--resume)
.venv/bin/normscope "${ARGS[@]}" --control --only control "${R[@]}" || exit $?
.venv/bin/normscope "${ARGS[@]}" --control --resume
