#!/bin/bash
# The README's swap table as one resumable script: bash benchmarks/swap/table.sh [STEPS] [RAMP]
# Run from anywhere in the repository (it changes to the root). Trains one shared control (norms kept), then each
# target in turn on the same data and optimizer settings as remove-ln's variants; every stage resumes (--resume)
# if its folder already holds checkpoints, and a finished control is reused by every target.
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=1
STEPS=${1:-200}
RAMP=${2:-100}
RUN=runs/swap-table
ARGS=(smollm2-135m --text ../shared/corpus/sherlock_holmes.txt --eval-text ../shared/corpus/peter_pan.txt
      --batch-size 4 --seq-len 128 --eval-max-tokens 8192 --steps "$STEPS" --ramp-steps "$RAMP" --exact-bos
      --save-every 25 --keep-checkpoints 1 --run-dir "$RUN" --out "$RUN/report" --force)
for TO in dyt derf seednorm; do
  R=(); [ -d "$RUN/$TO" ] && R=(--resume)
  .venv/bin/normscope swap "${ARGS[@]}" --to "$TO" --control "${R[@]}" || exit $?
done
.venv/bin/python - "$RUN/report" <<'PY'
import json, sys, pathlib
print("| target | steps | held-out CE | gap vs control | untrained CE | time |")
print("|---|---|---|---|---|---|")
for to in ("dyt", "derf", "seednorm"):
    p = pathlib.Path(sys.argv[1]) / f"swap-{to}.json"
    if p.exists():
        d = json.loads(p.read_text()); h = d["headlines"]
        print(f"| {to} | {h['steps']} | {h['ce_swapped']:.4f} | {h['gap_vs_control']:+.4f} | "
              f"{h['ce_swapped_untrained']:.2f} | {d['train_seconds'] / 60:.0f} min |")
PY
