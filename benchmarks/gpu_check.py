"""Helpers of ``benchmarks/gpu_check.sh``: run normscope's commands in one process per dtype, each under a time
budget, and compare their headline numbers with the CPU float32 reference (``benchmarks/gpu_reference.json``).

Subcommands (the shell script calls them; each is usable alone):

* ``texts DIR``: remove-ln's training and held-out text, written from the built-in prompt set (even and odd
  documents), so the GPU run trains on the very tokens the reference trained on, with no file beside the repo;
* ``steps LOG --device D --dtype T --work DIR [--tiny] [--model M] [--budget S]``: a plain forward pass (tokens/s,
  the baseline), then ``sinks --ablate``, ``depth-curse --skip-layers`` (three blocks), ``dla`` and a 20-step
  ``remove-ln``, each through the CLI in this process under a ``signal.alarm`` budget; one JSON line per step
  in LOG (exit code, error, wall and compute seconds, peak GPU memory from ``torch.cuda.max_memory_allocated``).
  A failing or overrunning step is recorded and the next one runs;
* ``reference --work DIR --out FILE``: the headline numbers of a finished float32 run, a few KB;
* ``collect --work DIR --reference FILE --out FILE``: every figure's agreement with the reference, the tokens/s
  of each step against the plain forward, and the peak memory, as one JSON.

Agreement of a curve (a per-layer column) is max |x - ref| / max |ref|, the README's "share of the column's
scale"; of a number, |x - ref| / |ref|; a label (the top sink head, the massive dims) agrees or not.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STEPS = ("forward", "sinks", "depth", "dla", "remove-ln")
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # largest agreement counted as "ok" per dtype
SKIP_BLOCKS = {"real": "5,15,25", "tiny": "0,1,-1"}
# figures compared per step: ("h", headline) or ("p", key, ...) a number or label; ("c", table, column) a curve
FIGURES: dict[str, dict[str, tuple[str, ...]]] = {
    "sinks": {"loss": ("p", "loss"), "sink_rate": ("p", "sink_rate"), "max_massive_value": ("h", "max_massive_value"),
              "top_sink_head": ("h", "top_sink_head"), "massive_dims": ("h", "massive_dims"),
              "alpha1_mean": ("c", "layers", "alpha1_mean"), "top1_abs": ("c", "layers", "top1_abs"),
              "layer_sink_rate": ("c", "layers", "sink_rate"),
              "divisor_ratio_first_to_rest": ("c", "sites", "divisor_ratio_first_to_rest"),
              "ablation_loss": ("c", "ablations", "loss")},
    "depth": {"loss": ("p", "loss"), "lns_loss": ("p", "lns", "loss"), "growth_exponent": ("c", "growth", "exponent"),
              "norm_rest": ("c", "layers", "norm_rest"), "var_rest": ("c", "layers", "var_rest"),
              "skip_loss": ("c", "blocks", "skip_loss"), "rel_update": ("c", "blocks", "rel_update")},
    "dla": {"nmae_all": ("p", "nmae", "all"), "nmae_heads": ("p", "nmae", "heads"), "nmae_mlp": ("p", "nmae", "mlp"),
            "nmae_position_0": ("p", "nmae", "position_0"), "ce": ("p", "ce"), "backend": ("h", "backend"),
            "most_misleading": ("h", "most misleading component"),
            "layer_nmae_all": ("c", "layers", "nmae_all"), "layer_nmae_heads": ("c", "layers", "nmae_heads")},
    "remove-ln": {"ce": ("c", "ce", "mean"), "sites_removed": ("h", "sites_removed"),
                  "train_loss": ("c", "history", "loss"), "grad_norm": ("c", "history", "grad_norm")},
}


class StepTimeout(BaseException):
    """Raised by the alarm when a step outruns its budget (a BaseException, so no ``except Exception`` eats it)."""


def settings(tiny: bool) -> dict[str, Any]:
    """The token budget of every step: modest real settings, and a tiny mode for the CPU test."""
    if tiny:
        return {"max_tokens": 128, "seq_len": 32, "batch_size": 4, "skip_layers": SKIP_BLOCKS["tiny"],
                "rl_steps": 8, "rl_batch": 2, "rl_seq_len": 32, "rl_eval_tokens": 128, "rl_start": 2, "rl_ramp": 4,
                "rl_extra": []}
    return {"max_tokens": 2048, "seq_len": 64, "batch_size": 8, "skip_layers": SKIP_BLOCKS["real"],
            "rl_steps": 20, "rl_batch": 2, "rl_seq_len": 128, "rl_eval_tokens": 2048, "rl_start": 4, "rl_ramp": 12,
            # all 61 sites in 20 steps run away (held-out CE inf, a failed step): the last ten blocks, the BOS
            # exact and a gentler learning rate give a finished run whose numbers the GPU can be held to
            "rl_extra": ["--exact-bos", "--sites", "blocks.2[0-9].*", "--lr", "5e-5"]}


def write_texts(folder: Path) -> tuple[Path, Path]:
    """Even built-in documents to train.txt, odd ones to eval.txt (blank-line separated), written atomically."""
    from normscope.core.io import atomic_write_text

    docs = json.loads((Path(__file__).resolve().parents[1] / "normscope/data/prompts.json").read_text())["documents"]
    texts = [d["text"] if isinstance(d, dict) else str(d) for d in docs]
    folder.mkdir(parents=True, exist_ok=True)
    train, held = folder / "train.txt", folder / "eval.txt"
    atomic_write_text(train, "\n\n".join(texts[0::2]) + "\n")
    atomic_write_text(held, "\n\n".join(texts[1::2]) + "\n")
    return train, held


def command_args(step: str, s: dict[str, Any], model: str, device: str, dtype: str, work: Path) -> list[str]:
    """The normscope command line of one step."""
    out = ["--out", str(work / step), "--force", "--quiet", "--device", device, "--dtype", dtype]
    text = ["--max-tokens", str(s["max_tokens"]), "--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"])]
    if step == "sinks":
        return ["sinks", model, "--ablate", *text, *out]
    if step == "depth":
        return ["depth-curse", model, "--skip-layers", s["skip_layers"], *text, *out]
    if step == "dla":
        return ["dla", model, *text, *out]
    train, held = write_texts(work / "texts")
    return ["remove-ln", model, "--text", str(train), "--eval-text", str(held), "--steps", str(s["rl_steps"]),
            "--taper", "--start", str(s["rl_start"]), "--ramp-steps", str(s["rl_ramp"]),
            "--batch-size", str(s["rl_batch"]), "--seq-len", str(s["rl_seq_len"]),
            "--max-tokens", str(s["rl_steps"] * s["rl_batch"] * s["rl_seq_len"]),
            "--eval-max-tokens", str(s["rl_eval_tokens"]), "--save-every", "0", "--no-export", "--no-log-sites",
            "--run-dir", str(work / "remove-ln-run"), *s.get("rl_extra", []), *out]


def _cuda() -> Any:
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def run_cli(args: list[str]) -> dict[str, Any]:
    """One normscope command in this process: its exit code, the seconds between the model on the device and the
    report write (``compute_s``), and the error it printed."""
    import io

    import normscope.core.models as models
    import normscope.report as report
    from normscope.cli import app

    marks: dict[str, float] = {}
    load, write = models.load_model, report.write_report

    def timed_load(*a: Any, **k: Any) -> Any:
        lm = load(*a, **k)
        marks.setdefault("loaded", time.perf_counter())
        return lm

    def timed_write(*a: Any, **k: Any) -> Any:
        marks.setdefault("writing", time.perf_counter())
        return write(*a, **k)

    err = io.StringIO()
    models.load_model, report.write_report = timed_load, timed_write  # type: ignore[assignment]
    rc: Any = 0
    try:
        with contextlib.redirect_stderr(err):
            try:
                rc = app(args=args, standalone_mode=False)
            except SystemExit as exc:
                rc = exc.code
    finally:
        models.load_model, report.write_report = load, write  # type: ignore[assignment]
    code = rc if isinstance(rc, int) else (0 if rc is None else 1)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return {"rc": code, "error": lines[-1][:400] if code and lines else None,
            "compute_s": marks["writing"] - marks["loaded"] if len(marks) == 2 else None}


def plain_forward(model: str, device: str, dtype: str, s: dict[str, Any]) -> dict[str, Any]:
    """The baseline: the same tokens through the bare model (no hooks), timed over five passes after two warm-up
    passes on a GPU (one of each on a CPU, where the reference needs only the tokens' fingerprint)."""
    import torch

    from normscope.core.models import load_model
    from normscope.core.options import TextOptions
    from normscope.core.text import load_text

    lm = load_model(model, dtype=dtype, device=device)
    sample = load_text(lm.tokenizer, TextOptions(max_tokens=s["max_tokens"], seq_len=s["seq_len"],
                                                 batch_size=s["batch_size"]),
                       max_positions=lm.info.max_positions, is_causal=lm.info.is_causal)
    digest = hashlib.sha256()
    batches = []
    for b in sample.iter_batches():
        digest.update(b.input_ids.to(torch.int64).numpy().tobytes())
        batches.append((b.input_ids.to(device), b.attention_mask.to(device)))  # [batch, pos] each
    n_tok = sum(int(m.sum()) for _, m in batches)
    cuda = _cuda() if device.startswith("cuda") else None
    warmup, repeats = (2, 5) if cuda else (1, 1)
    with torch.inference_mode():
        for _ in range(warmup):
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask)
        if cuda:
            cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask)
        if cuda:
            cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"rc": 0, "tokens": n_tok, "tokens_per_s": n_tok * repeats / seconds, "token_sha256": digest.hexdigest(),
            "dtype_loaded": lm.info.dtype, "device_loaded": lm.info.device}


def run_steps(log: Path, model: str, device: str, dtype: str, work: Path, tiny: bool, budget: int,
              only: list[str], deadline: float | None = None) -> None:
    """Every step in turn, each under ``budget`` seconds and none past ``deadline`` (a time.time()); one JSON line
    per step appended to ``log``."""
    s = settings(tiny)
    work.mkdir(parents=True, exist_ok=True)

    def on_alarm(signum: int, frame: Any) -> None:
        raise StepTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    for step in only or STEPS:
        left = budget if deadline is None else min(budget, int(deadline - time.time()))
        row: dict[str, Any] = {"step": step, "device": device, "dtype": dtype, "budget_s": left}
        if deadline is not None and deadline - time.time() < 5:  # a small --budget alone still runs the step
            row.update(rc=124, error="not run: the check's deadline had passed", wall_s=0.0)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            continue
        if step != "forward":
            row["command"] = "normscope " + " ".join(command_args(step, s, model, device, dtype, work))
        cuda = _cuda() if device.startswith("cuda") else None
        if cuda:
            cuda.reset_peak_memory_stats()
            row["allocated_at_start_bytes"] = cuda.memory_allocated()
        t0 = time.perf_counter()
        signal.alarm(left)
        try:
            if step == "forward":
                row.update(plain_forward(model, device, dtype, s))
            else:
                row.update(run_cli(command_args(step, s, model, device, dtype, work)))
        except StepTimeout:
            row.update(rc=124, error=f"timed out after its budget of {left} s")
        except Exception as exc:  # a step's failure is recorded, the next step still runs
            row.update(rc=1, error=f"{type(exc).__name__}: {exc}"[:400], traceback=traceback.format_exc()[-2000:])
        finally:
            signal.alarm(0)
        row["wall_s"] = time.perf_counter() - t0
        if cuda:
            row["peak_gpu_bytes"] = cuda.max_memory_allocated()
            row["peak_gpu_reserved_bytes"] = cuda.max_memory_reserved()
        gc.collect()
        if cuda:
            cuda.empty_cache()
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[gpu_check] {dtype} {step}: rc {row['rc']} in {row['wall_s']:.1f} s"
              + (f" ({row['error']})" if row.get("error") else ""), file=sys.stderr, flush=True)


# ---- figures, the reference and the comparison ------------------------------------------------------------
def _result_json(work: Path, step: str) -> dict[str, Any] | None:
    path = work / step / f"{step}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.7g}") if math.isfinite(v) else None
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def figures(work: Path, step: str) -> dict[str, Any] | None:
    """The compared figures of one finished step (numbers rounded to 7 significant digits), or None."""
    data = _result_json(work, step)
    if data is None:
        return None
    out: dict[str, Any] = {}
    for name, where in FIGURES[step].items():
        if where[0] in ("h", "p"):
            v: Any = data.get("headlines", {}) if where[0] == "h" else data
            for key in where[1:]:
                v = v.get(key) if isinstance(v, dict) else None
            out[name] = _round(v)
        else:
            rows = data.get(where[1]) or []
            out[name] = _round([r.get(where[2]) if isinstance(r.get(where[2]), (int, float)) else None for r in rows])
    return out


def agreement(value: Any, ref: Any) -> dict[str, Any]:
    """How far ``value`` is from ``ref``: a relative number for numbers and curves, equality for labels."""
    if isinstance(ref, list) and ref and all(x is None or isinstance(x, (int, float)) for x in ref):
        if not isinstance(value, list) or len(value) != len(ref):
            return {"kind": "curve", "agreement": None, "note": f"length {len(value or [])} against {len(ref)}"}
        pairs = [(float(a), float(b)) for a, b in zip(value, ref, strict=True) if a is not None and b is not None]
        missing = sum((a is None) != (b is None) for a, b in zip(value, ref, strict=True))
        scale = max((abs(b) for _, b in pairs), default=0.0)
        diff = max((abs(a - b) for a, b in pairs), default=0.0)
        return {"kind": "curve", "n": len(pairs), "max_abs_diff": diff, "missing": missing,
                "agreement": diff / scale if scale > 0 else diff}
    if isinstance(ref, (int, float)) and not isinstance(ref, bool) and isinstance(value, (int, float)):
        diff = abs(float(value) - float(ref))
        return {"kind": "number", "value": value, "reference": ref, "max_abs_diff": diff,
                "agreement": diff / abs(ref) if ref else diff}
    return {"kind": "label", "value": value, "reference": ref, "agreement": 0.0 if value == ref else 1.0}


def _rows(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def make_reference(work: Path, out: Path, model: str, tiny: bool) -> dict[str, Any]:
    """The headline numbers of the float32 run in ``work`` (its steps.jsonl and result folders)."""
    import torch
    import transformers

    from normscope.core.io import atomic_write_text

    rows = {r["step"]: r for r in _rows(work / "steps.jsonl")}
    fwd = rows.get("forward", {})
    ref = {"what": "normscope headline numbers on the CPU in float32 (benchmarks/gpu_check.sh --reference)",
           "model": model, "settings": settings(tiny), "tiny": tiny, "token_sha256": fwd.get("token_sha256"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "figures": {step: figures(work, step) for step in FIGURES},
           "failed": {k: r.get("error") for k, r in rows.items() if r.get("rc")}}
    missing = [k for k, v in ref["figures"].items() if v is None]
    if missing:
        raise SystemExit(f"no reference: the steps {', '.join(missing)} wrote no result (see {work}/steps.jsonl)")
    atomic_write_text(out, json.dumps(ref, indent=1) + "\n")
    return ref


def collect(work: Path, reference: Path | None, out: Path, dtypes: list[str], setup: Path | None) -> dict[str, Any]:
    """The check's one JSON: per dtype and step, exit status, agreement of every figure with the reference,
    tokens/s against the plain forward, peak GPU memory."""
    from normscope.core.io import atomic_write_text

    ref = json.loads(reference.read_text()) if reference is not None and reference.is_file() else None
    report: dict[str, Any] = {"reference": str(reference) if reference else None, "reference_found": ref is not None,
                              "setup": json.loads(setup.read_text()) if setup and setup.is_file() else None,
                              "runs": {}}
    ok = ref is not None
    for dtype in dtypes:
        rows = {r["step"]: r for r in _rows(work / dtype / "steps.jsonl")}
        fwd = rows.get("forward", {})
        base = fwd.get("tokens_per_s")
        run: dict[str, Any] = {"tolerance": TOLERANCE.get(dtype, 5e-2), "steps": {}}
        if ref is not None:
            run["same_tokens_as_reference"] = fwd.get("token_sha256") == ref.get("token_sha256")
        for step in STEPS:
            r = rows.get(step)
            if r is None:
                run["steps"][step] = {"rc": None, "error": "did not report: the process died or ran out of time "
                                      "before this step (see the log)"}
                ok = False
                continue
            entry = {k: r.get(k) for k in ("rc", "error", "wall_s", "compute_s", "peak_gpu_bytes",
                                           "peak_gpu_reserved_bytes", "allocated_at_start_bytes", "command")
                     if r.get(k) is not None}
            ok = ok and r.get("rc") == 0
            data = _result_json(work / dtype, step) if step != "forward" else None
            if step == "forward":
                entry.update(tokens=r.get("tokens"), tokens_per_s=base)
            elif data is not None:
                if step == "remove-ln":  # training tokens over the training steps' own seconds
                    hist = data.get("history") or []
                    secs = sum(h.get("seconds", 0.0) for h in hist)
                    tok = sum(h.get("tokens", 0) for h in hist)
                else:
                    secs, tok = r.get("compute_s"), data.get("meta", {}).get("text", {}).get("n_tokens")
                if secs and tok:
                    entry["tokens"], entry["tokens_per_s"] = tok, tok / secs
                    entry["vs_plain_forward"] = tok / secs / base if base else None
                got = figures(work / dtype, step)
                want = (ref or {}).get("figures", {}).get(step)
                if got is not None and want is not None:
                    agree = {k: agreement(got.get(k), v) for k, v in want.items()}
                    entry["figures"] = agree
                    worst = max((a["agreement"] for a in agree.values() if a.get("agreement") is not None),
                                default=None)
                    entry["worst_agreement"] = worst
                    entry["within_tolerance"] = worst is not None and worst <= run["tolerance"]
            run["steps"][step] = entry
        report["runs"][dtype] = run
    report["all_steps_ran"] = ok
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("texts")
    t.add_argument("folder", type=Path)
    s = sub.add_parser("steps")
    s.add_argument("log", type=Path)
    s.add_argument("--device", default="cuda")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--budget", type=int, default=120)
    s.add_argument("--only", nargs="*", default=[])
    s.add_argument("--deadline", type=float, help="time.time() after which no step starts")
    r = sub.add_parser("reference")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--tiny", action="store_true")
    c = sub.add_parser("collect")
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--reference", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    c.add_argument("--setup", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "texts":
        print(*write_texts(a.folder))
    elif a.cmd == "steps":
        run_steps(a.log, a.model, a.device, a.dtype, a.work, a.tiny, a.budget, a.only, a.deadline)
    elif a.cmd == "reference":
        make_reference(a.work, a.out, a.model, a.tiny)
    else:
        rep = collect(a.work, a.reference, a.out, a.dtypes, a.setup)
        return 0 if rep["all_steps_ran"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
