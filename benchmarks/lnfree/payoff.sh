#!/bin/bash
# What the LN-free SmolLM2 buys (issue 11, item 5): dla, sinks and compare on the original and on the export of a
# finished variant, on the held-out book with a BOS. Usage: bash benchmarks/lnfree/payoff.sh C   (after variant.sh C)
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
V=${1:?give the variant whose export to read: C, D, E or F}
EXPORT="runs/$V/ln-free-model"
[ -f "$EXPORT/bos_prefix.safetensors" ] || { echo "no exact-BOS export in $EXPORT; finish variant.sh $V first" >&2; exit 2; }
TEXT=(--text ../shared/corpus/peter_pan.txt --bos yes --seq-len 128 --max-tokens 4096 --batch-size 4 --force)
OUT="runs/$V/payoff"
set -x
.venv/bin/normscope dla smollm2-135m "${TEXT[@]}" --out "$OUT/original" || exit $?
.venv/bin/normscope dla "$EXPORT" "${TEXT[@]}" --out "$OUT/ln-free" || exit $?
.venv/bin/normscope sinks smollm2-135m "${TEXT[@]}" --out "$OUT/original" || exit $?
.venv/bin/normscope sinks "$EXPORT" "${TEXT[@]}" --out "$OUT/ln-free" || exit $?
.venv/bin/normscope compare smollm2-135m "$EXPORT" "${TEXT[@]}" --only sinks,depth --depth-skip-layers none \
  --out "$OUT/compare" || exit $?
