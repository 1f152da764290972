"""Benchmark of the sinks pass on the bundled SmolLM2-135M (CPU, fp32).

Every figure is a ratio against a baseline measured in the same run, on the same tokens:

1. speed at T = 64: tokens/s of the full sinks pass (alpha_k from every layer, residual stream and norm-site
   statistics) over tokens/s of a plain forward *with the same attention implementation*: the default path
   (SDPA forward, alpha_k from query-chunked column sums) against a plain SDPA forward, and the eager path against a
   plain eager forward; runs interleaved A B C D E A B C D E so that drift of a shared machine hits all of them.
   The sinks pass reads no logits, so it projects onto the vocabulary at the last position only
   (``logits_to_keep=1``); E, a plain SDPA forward that does the same, isolates the cost of the hooks;
2. T sweep: T = 64, 512, 2048, 4096 with the same tokens per batch (batch = tokens / T), chunked and eager paths,
   each in a fresh process: the pass's peak memory above the loaded model (RSS sampled every 10 ms), its tokens/s,
   and the plain forward's tokens/s in the same process (measured after the pass, interleaved);
3. TransformerLens: ``TransformerBridge.run_with_cache`` computing the same statistics (alpha_1 per head, top-1 and
   median |h| per layer) on the same batches at T = 64, against the default sinks pass: speed and peak memory, fresh
   processes.

    python benchmarks/bench_sinks.py                  # all three
    python benchmarks/bench_sinks.py --quick          # fewer rounds and tokens (the sweep keeps 4,096 per batch)
    python benchmarks/bench_sinks.py --threads 1      # pin torch threads (a machine shared with other jobs)
    python benchmarks/bench_sinks.py --only sweep     # one part: speed, sweep or tl
    python benchmarks/bench_sinks.py --only sweep --fixed-mmap   # memory that follows the live tensors
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
CLOCK = time.perf_counter  # --cpu-time: time.process_time, for a machine whose other jobs take most of the CPU
CPU_FLAG: list[str] = []  # passed on to the child processes
CHILD_ENV: dict[str, str] = {}  # --fixed-mmap: glibc's mmap threshold for the child processes


def _sample(lm, n_tokens: int, seq_len: int = 64, batch_size: int = 8):
    from normscope.core.text import TextOptions, load_text

    book = CORPUS / "sherlock_holmes.txt"
    paths = [book] if book.exists() else None  # the built-in prompts otherwise
    opts = TextOptions(paths=paths, seq_len=seq_len, max_tokens=n_tokens, batch_size=batch_size)
    return load_text(lm.tokenizer, opts, max_positions=lm.info.max_positions, is_causal=lm.info.is_causal)


def _loaded():
    """The bundled model with every weight resident: the loader maps the weights in lazily, so the first pass
    over them would page in ~500 MiB and count it as the measured pass's memory (and time)."""
    import torch

    from normscope.core.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    with torch.no_grad():
        for p in lm.model.parameters():
            float(p.sum())
    return lm


def _plain(lm, sample, impl: str, logits: bool = True) -> float:
    """Tokens/s of a plain forward over ``sample`` with attention implementation ``impl`` (``logits=False``: the
    vocabulary projection at the last position only, as the sinks pass runs it)."""
    import torch

    from normscope.core.attn_chunks import attention_implementation

    extra = {} if logits else {"logits_to_keep": 1}
    with attention_implementation(lm.model, impl), torch.no_grad():
        t0 = CLOCK()
        for b in sample.iter_batches():
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, **extra)
        return sample.n_tokens / (CLOCK() - t0)


def _sinks(lm, sample, attention: str = "auto") -> float:
    from normscope.analyses import sinks

    t0 = CLOCK()
    result = sinks.run(lm, sample, sinks.SinksOptions(attention=attention))
    seconds = CLOCK() - t0
    assert result.payload["attention_path"]["path"] == ("chunked" if attention == "auto" else attention)
    return sample.n_tokens / seconds


def speed(n_tokens: int, rounds: int) -> dict:

    lm = _loaded()
    sample = _sample(lm, n_tokens)
    runs = {"plain_sdpa": lambda: _plain(lm, sample, "sdpa"), "sinks_chunked": lambda: _sinks(lm, sample),
            "plain_eager": lambda: _plain(lm, sample, "eager"), "sinks_eager": lambda: _sinks(lm, sample, "eager"),
            "plain_sdpa_no_logits": lambda: _plain(lm, sample, "sdpa", logits=False)}
    for f in runs.values():  # warm-up
        f()
    tok_s: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            tok_s[k].append(f())
    chunked = [a / b for a, b in zip(tok_s["sinks_chunked"], tok_s["plain_sdpa"], strict=True)]
    eager = [a / b for a, b in zip(tok_s["sinks_eager"], tok_s["plain_eager"], strict=True)]
    return {"tokens": sample.n_tokens, "seq_len": 64, "batch": 8, "rounds": rounds,
            **{f"{k}_tok_s": statistics.median(v) for k, v in tok_s.items()},
            "chunked_over_plain_sdpa": {"median": statistics.median(chunked), "min": min(chunked), "max": max(chunked)},
            "eager_over_plain_eager": {"median": statistics.median(eager), "min": min(eager), "max": max(eager)},
            # the sinks pass needs no logits; against a plain forward that skips them too, its hooks' own cost
            "chunked_over_plain_sdpa_no_logits": statistics.median(
                a / b for a, b in zip(tok_s["sinks_chunked"], tok_s["plain_sdpa_no_logits"], strict=True)),
            "sinks_chunked_over_sinks_eager": statistics.median(
                a / b for a, b in zip(tok_s["sinks_chunked"], tok_s["sinks_eager"], strict=True))}


class RssSampler:
    """Peak resident memory while a block runs, sampled from /proc every 10 ms (``ru_maxrss`` cannot see a
    pass whose peak stays under the peak of loading the model)."""

    def __init__(self) -> None:
        self.peak = self.start = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tl_pass(lm, sample):
    """Boot TransformerLens' bridge on the loaded model; return the pass computing the same statistics
    (alpha_1 per head, top-1 and median |h| per layer) from ``run_with_cache``."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("smollm2-135m", hf_model=lm.model, tokenizer=lm.tokenizer,
                                                 device="cpu")
    n_layers = lm.info.n_layers

    def run() -> None:
        alpha_sum = torch.zeros(n_layers, lm.info.n_heads, dtype=torch.float64)
        top1 = torch.zeros(n_layers, dtype=torch.float64)
        med = torch.zeros(n_layers, dtype=torch.float64)
        with torch.no_grad():
            for b in sample.iter_batches():
                _, cache = bridge.run_with_cache(b.input_ids)
                t = b.input_ids.shape[1]
                nq = (t - torch.arange(t)).float()
                for layer in range(n_layers):
                    pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
                    alpha_sum[layer] += (pat.float().sum(2) / nq)[:, :, 0].double().sum(0)
                    h = cache[f"blocks.{layer}.hook_resid_post"].float().abs().flatten(1)  # [batch, pos*d]
                    top1[layer] += h.max(1).values.double().sum()
                    med[layer] += h.median(1).values.double().sum()
                del cache

    return run


def child(kind: str, n_tokens: int, seq_len: int = 64, batch: int = 8, rounds: int = 2) -> None:
    """Run in a fresh process; print one JSON line with the measured pass's tokens/s, peak RSS over the whole
    process, and the peak during the pass above the resident memory just before it (the bridge's boot excluded).
    ``kind``: ``chunked`` or ``eager`` (the sinks pass on that path) or ``tl``. For the sinks kinds, the plain
    forward with the same attention implementation follows, interleaved with more sinks passes, for the speed ratio
    (after the memory measurement, so that its peak does not hide the pass's)."""

    lm = _loaded()
    sample = _sample(lm, n_tokens, seq_len, batch)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    attention = "auto" if kind == "chunked" else kind
    if kind != "tl":  # the code the pass runs is imported first, as booting the bridge imports TransformerLens
        import plotly.graph_objects  # noqa: F401

        import normscope.analyses.sinks.analysis  # noqa: F401
        import normscope.analyses.sinks.report  # noqa: F401
    measured = (lambda: _sinks(lm, sample, attention)) if kind != "tl" else _tl_pass(lm, sample)
    with RssSampler() as sampler:
        t0 = CLOCK()
        measured()
        seconds = CLOCK() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"kind": kind, "tokens": sample.n_tokens, "seq_len": seq_len, "batch": batch,
           "tok_s": sample.n_tokens / seconds, "peak_rss_mib": rss, "rss_after_load_mib": rss_loaded,
           "pass_rss_before_mib": sampler.start, "pass_peak_rss_mib": sampler.peak,
           "pass_growth_mib": sampler.peak - sampler.start}
    if kind != "tl" and rounds:
        impl = "sdpa" if kind == "chunked" else "eager"
        ratios = []
        for _ in range(rounds):
            plain = _plain(lm, sample, impl)
            ratios.append(_sinks(lm, sample, attention) / plain)
        out["sinks_over_plain"] = statistics.median(ratios)
        out["sinks_over_plain_all"] = ratios
    print(json.dumps(out))


def _spawn(kind: str, n_tokens: int, threads: int, seq_len: int = 64, batch: int = 8, rounds: int = 2) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(n_tokens), str(seq_len), str(batch), str(rounds),
           "--threads", str(threads), *CPU_FLAG]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **CHILD_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])


def sweep(tokens: int, threads: int, rounds: int, seq_lens: tuple[int, ...] = (64, 512, 2048, 4096)) -> dict:
    """Chunked and eager sinks passes at each T on the same number of tokens per batch."""
    rows = []
    for seq_len in seq_lens:
        for kind in ("chunked", "eager"):  # interleaved per T
            r = _spawn(kind, tokens, threads, seq_len, tokens // seq_len, rounds)
            rows.append(r)
            print(json.dumps({k: r.get(k) for k in ("kind", "seq_len", "batch", "tok_s", "pass_growth_mib",
                                                    "peak_rss_mib", "sinks_over_plain")}), flush=True)
    by = {(r["kind"], r["seq_len"]): r for r in rows}
    summary: dict[str, Any] = {}
    for seq_len in seq_lens:
        c, e = by[("chunked", seq_len)], by[("eager", seq_len)]
        summary[str(seq_len)] = {"chunked_over_eager_tok_s": c["tok_s"] / e["tok_s"],
                                 "chunked_over_eager_growth": c["pass_growth_mib"] / e["pass_growth_mib"],
                                 "chunked_over_eager_peak_rss": c["peak_rss_mib"] / e["peak_rss_mib"],
                                 "chunked_sinks_over_plain_sdpa": c.get("sinks_over_plain"),
                                 "eager_sinks_over_plain_eager": e.get("sinks_over_plain")}
    if 512 in seq_lens and 4096 in seq_lens:
        for kind in ("chunked", "eager"):
            big, small = by[(kind, 4096)], by[(kind, 512)]
            summary[f"{kind}_growth_4096_over_512"] = big["pass_growth_mib"] / small["pass_growth_mib"]
            summary[f"{kind}_peak_rss_4096_over_512"] = big["peak_rss_mib"] / small["peak_rss_mib"]
    return {"rows": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", choices=("speed", "sweep", "tl"), help="run one part")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time (use with --threads 1 where other jobs hold the CPU)")
    ap.add_argument("--seq-lens", default="64,512,2048,4096", help="the sweep's T values")
    ap.add_argument("--fixed-mmap", action="store_true",
                    help="child processes with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so "
                    "that a freed tensor leaves the resident set and RSS follows the live tensors; without it glibc "
                    "raises the threshold after the first large free and keeps freed memory on its heap, and RSS "
                    "then measures the allocator's history (up to 1 GiB here). Slows allocation: use it for memory, "
                    "not speed")
    ap.add_argument("--sweep-rounds", type=int, default=None, help="plain/sinks rounds per sweep process")
    ap.add_argument("--child", nargs=5, metavar=("KIND", "TOKENS", "T", "BATCH", "ROUNDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        CPU_FLAG.append("--cpu-time")
    if args.fixed_mmap:
        CHILD_ENV["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    if args.child:
        kind, *nums = args.child
        child(kind, *map(int, nums))
        return
    tokens, rounds = (1024, 2) if args.quick else (4096, 3)
    print(f"machine: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f}")
    if args.only in (None, "speed"):
        print(f"== speed at T = 64: sinks pass vs plain forward, same attention implementation ({tokens} tokens, "
              "same process, interleaved)")
        print(json.dumps(speed(tokens, rounds), indent=1), flush=True)
    if args.only in (None, "sweep"):
        print("== T sweep: 4096 tokens per batch (one sequence at T = 4096), fresh processes")
        rounds_sweep = args.sweep_rounds if args.sweep_rounds is not None else (1 if args.quick else 2)
        seq_lens = tuple(int(t) for t in args.seq_lens.split(","))
        print(json.dumps(sweep(4096, args.threads, rounds_sweep, seq_lens)["summary"], indent=1), flush=True)
    if args.only in (None, "tl"):
        print(f"== TransformerLens run_with_cache vs normscope sinks (default path), T = 64, {tokens} tokens, "
              "fresh processes, alternated")
        ns, tl = [], []
        for _ in range(2 if args.quick else 3):
            ns.append(_spawn("chunked", tokens, args.threads, rounds=0))
            tl.append(_spawn("tl", tokens, args.threads))
        print(json.dumps({"normscope_tok_s": [r["tok_s"] for r in ns], "tl_tok_s": [r["tok_s"] for r in tl],
                          "speed_ratio_normscope_to_tl": statistics.median(
                              a["tok_s"] / b["tok_s"] for a, b in zip(ns, tl, strict=True)),
                          "peak_rss_mib": {"normscope": [r["peak_rss_mib"] for r in ns],
                                           "transformer_lens": [r["peak_rss_mib"] for r in tl]},
                          "pass_growth_mib": {"normscope": [r["pass_growth_mib"] for r in ns],
                                              "transformer_lens": [r["pass_growth_mib"] for r in tl]},
                          "peak_rss_ratio_normscope_to_tl": statistics.median(
                              a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(ns, tl, strict=True)),
                          "pass_growth_ratio_normscope_to_tl": statistics.median(
                              a["pass_growth_mib"] / b["pass_growth_mib"] for a, b in zip(ns, tl, strict=True))},
                         indent=1), flush=True)


if __name__ == "__main__":
    main()
