"""Benchmark of ``depth-curse`` and ``grads`` on the bundled SmolLM2-135M (CPU, fp32).

Each measurement is set against a baseline measured in the same run:

1. passes: forward calls of the model (counted with a hook) during ``depth.run`` with only the statistics,
   with K skipped blocks, with the LayerNorm Scaling what-if and the dropped window: expected
   batches x (1 + K + 1 + 1), i.e. every depth statistic shares ONE pass;
2. speed: the statistics pass (every reducer: norms, variances, divisors, relative updates, angles, loss)
   against a plain eager forward on the same batches, and one skip-one-block pass against the same plain
   forward; runs interleaved A B A B so that drift of a shared machine hits both;
3. grads: forward and backward calls per batch, and time of ``grads.measure`` against a plain
   forward + backward of the same loss with no hooks;
4. memory: peak RSS of the run itself (high-water mark reset after loading) in fresh processes running
   depth (statistics only) and grads on N and 4N tokens of the same batch size (flat memory: ratio close to 1);
5. defaults (``--defaults``): the whole ``depth.run`` with the command's defaults on 2,048 tokens of a book at
   T = 64, batch 8 (the text defaults), against the same run with the skip passes over every token
   (``skip_tokens=0``, the earlier default): wall and process CPU time, per phase, and the skip losses of the
   subset against the full ones (how far apart, in standard errors).

    python benchmarks/bench_depth.py            # ~10 minutes on 2 cores
    python benchmarks/bench_depth.py --quick    # smaller token counts
    python benchmarks/bench_depth.py --defaults --threads 1   # only 5.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def _sample(lm, n_tokens: int, seq_len: int = 128, batch_size: int = 4):
    from normscope.core.text import TextOptions, load_text

    book = CORPUS / "sherlock_holmes.txt"
    paths = [book] if book.exists() else None  # the built-in prompts otherwise
    opts = TextOptions(paths=paths, seq_len=seq_len, max_tokens=n_tokens, batch_size=batch_size, controls=False)
    return load_text(lm.tokenizer, opts, max_positions=lm.info.max_positions, is_causal=lm.info.is_causal)


def _load():
    import transformers

    from normscope.core.models import load_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return load_model("smollm2-135m", device="cpu")


def _plain_forward(lm, batches) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    return time.perf_counter() - t0


def _plain_backward(lm, batches) -> float:
    import torch

    from normscope.core.losses import token_losses

    params = list(lm.model.parameters())
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for b in batches:
            out = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            token_losses(out.logits, b.input_ids, b.attention_mask).mean().backward()
    seconds = time.perf_counter() - t0
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return seconds


def passes(lm, sample) -> dict:
    """Forward calls of the model per configuration of depth.run, and backward calls of grads.measure."""
    from normscope.analyses import depth, grads

    calls = {"forward": 0, "probe": 0}

    def count(m, args, kwargs):  # the 1x4-token probe passes of find_layout / find_norm_sites counted apart
        ids = kwargs.get("input_ids", args[0] if args else None)
        key = "probe" if ids is not None and ids.shape[1] != sample.seq_len else "forward"
        calls[key] += 1

    h = lm.model.register_forward_pre_hook(count, with_kwargs=True)
    out: dict = {"batches": len(sample.batches)}
    try:
        for label, opts in (("statistics only", depth.DepthOptions(skip=False, window=0, lns=False)),
                            ("+ skip 3 blocks", depth.DepthOptions(skip_layers="0,15,29", window=0, lns=False)),
                            ("+ skip 3 + LNS + window", depth.DepthOptions(skip_layers="0,15,29", window=4, lns=True))):
            calls["forward"] = calls["probe"] = 0
            depth.run(lm, sample, opts)
            out[label] = {"forward passes": calls["forward"], "probe passes (1x4 tokens)": calls["probe"]}
        import torch

        n_back = {"n": 0}
        orig = torch.Tensor.backward

        def counting(self, *a, **k):
            n_back["n"] += 1
            return orig(self, *a, **k)

        torch.Tensor.backward = counting  # type: ignore[method-assign]
        try:
            calls["forward"] = calls["probe"] = 0
            grads.measure(lm, sample)
        finally:
            torch.Tensor.backward = orig  # type: ignore[method-assign]
        out["grads"] = {"forward passes": calls["forward"], "backward passes": n_back["n"],
                        "probe passes (1x4 tokens)": calls["probe"]}
    finally:
        h.remove()
    return out


def speed(lm, sample, rounds: int) -> dict:
    from normscope.analyses import depth, grads
    from normscope.core.sites import find_layout, find_norm_sites

    layout = find_layout(lm.model)
    sites = find_norm_sites(lm.model, layout)
    batches = list(sample.iter_batches())
    _plain_forward(lm, batches)  # warm-up
    stats, skip, plain, gr, plain_bw = [], [], [], [], []
    for _ in range(rounds):
        a = _plain_forward(lm, batches)
        t0 = time.perf_counter()
        depth._stats_pass(lm.model, layout, sites, batches, "bench", True, None, "bench")
        b = time.perf_counter() - t0
        t0 = time.perf_counter()
        depth._loss_pass(lm.model, layout, sites, batches, [15])
        c = time.perf_counter() - t0
        d = _plain_backward(lm, batches)
        t0 = time.perf_counter()
        grads.measure(lm, sample)
        e = time.perf_counter() - t0
        plain.append(a)
        stats.append(b / a)
        skip.append(c / a)
        plain_bw.append(d)
        gr.append(e / d)
    return {"tokens": sample.n_tokens, "plain_forward_s": statistics.median(plain),
            "stats_pass_over_plain_forward": statistics.median(stats),
            "one_skip_pass_over_plain_forward": statistics.median(skip),
            "plain_forward_backward_s": statistics.median(plain_bw),
            "grads_over_plain_forward_backward": statistics.median(gr),
            "ratios_all": {"stats": stats, "skip": skip, "grads": gr}}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, n_tokens: int) -> None:
    """Run in a fresh process; print one JSON line with the peak RSS of the run itself.

    Loading the model has its own, higher peak, so the kernel's high-water mark is reset after loading
    (``/proc/self/clear_refs`` = 5, Linux) and ``VmHWM`` read after the run.
    """
    from normscope.analyses import depth, grads

    lm = _load()
    sample = _sample(lm, n_tokens)
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if kind == "depth":
        depth.run(lm, sample, depth.DepthOptions(skip=False, window=0, lns=False))
    else:
        grads.measure(lm, sample)
    print(json.dumps({"kind": kind, "tokens": sample.n_tokens, "seconds": time.perf_counter() - t0,
                      "rss_before_run_mib": rss_before, "peak_rss_of_run_mib": _status_mib("VmHWM"),
                      "peak_rss_while_loading_mib": peak_load}))


def _spawn(kind: str, n_tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n_tokens)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def defaults(book: str) -> dict:
    """The command's defaults against the full skip sweep, same process, same sample (section 5)."""
    import numpy as np

    from normscope.analyses import depth
    from normscope.core.text import TextOptions, load_text

    lm = _load()
    path = CORPUS / book
    sample = load_text(lm.tokenizer, TextOptions(paths=[path] if path.exists() else None, max_tokens=2048),
                       max_positions=lm.info.max_positions, is_causal=True)
    out: dict = {"tokens": sample.n_tokens, "text": path.name if path.exists() else "built-in prompts"}
    runs = {}
    configs = (("default", depth.DepthOptions()), ("skip over every token", depth.DepthOptions(skip_tokens=0)))
    for label, opts in configs:
        t0, c0 = time.perf_counter(), time.process_time()
        r = depth.run(lm, sample, opts)
        runs[label] = r
        out[label] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "phases_wall_s": {k: round(v, 2) for k, v in r.timings.items()},
                      "skip_scope": {k: v for k, v in (r.payload["skip_scope"] or {}).items()
                                     if k != "sequence_indices"}}
        print(json.dumps({label: out[label]}), flush=True)
    a, b = (runs[k].tables["blocks"] for k in ("default", "skip over every token"))
    z = (a["skip_delta_loss"] - b["skip_delta_loss"]) / a["skip_delta_loss_se"]
    out["cpu_ratio_default_over_full"] = out["default"]["cpu_s"] / out["skip over every token"]["cpu_s"]
    out["wall_ratio_default_over_full"] = out["default"]["wall_s"] / out["skip over every token"]["wall_s"]
    out["subset_vs_full"] = {"median_abs_z": float(np.median(np.abs(z))), "max_abs_z": float(np.abs(z).max()),
                             "spearman_rank_corr": float(a["skip_delta_loss"].rank().corr(b["skip_delta_loss"].rank())),
                             "costliest_block": [int(a.loc[a["skip_delta_loss"].idxmax(), "block"]),
                                                 int(b.loc[b["skip_delta_loss"].idxmax(), "block"])]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--defaults", action="store_true", help="only section 5: the defaults against the full sweep")
    ap.add_argument("--book", default="peter_pan.txt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.defaults:
        print(json.dumps(defaults(args.book), indent=1))
        return
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    lm = _load()
    n = 1024 if args.quick else 2048
    sample = _sample(lm, n)
    print("== forward / backward passes (counted with hooks)")
    print(json.dumps(passes(lm, sample), indent=1))
    print("== speed against plain passes on the same batches (interleaved)")
    print(json.dumps(speed(lm, sample, 2 if args.quick else 3), indent=1))
    small, big = (512, 2048) if args.quick else (1024, 4096)
    for kind in ("depth", "grads"):
        print(f"== memory: peak RSS of {kind}, {small} vs {big} tokens (fresh processes)")
        a, b = _spawn(kind, small), _spawn(kind, big)
        grow_a = a["peak_rss_of_run_mib"] - a["rss_before_run_mib"]
        grow_b = b["peak_rss_of_run_mib"] - b["rss_before_run_mib"]
        print(json.dumps({"small": a, "big": b, "peak_ratio_big_to_small": b["peak_rss_of_run_mib"] /
                          a["peak_rss_of_run_mib"], "run_growth_mib_small": grow_a, "run_growth_mib_big": grow_b},
                         indent=1))


if __name__ == "__main__":
    main()
