"""Benchmark of the sinks pass on the bundled SmolLM2-135M (CPU, fp32).

Three measurements, each against a baseline measured in the same run:

1. speed: tokens/s of the full sinks pass (hooks on every attention pattern, residual stream and norm
   site, all reducers) over tokens/s of the plain eager forward on the same batches, runs interleaved
   A B A B so that drift of a shared machine hits both;
2. memory: peak RSS of a fresh process running the sinks pass on 8k tokens versus 64k tokens (flat memory
   means the two are within 10%);
3. TransformerLens: ``TransformerBridge.run_with_cache`` computing the same statistics (alpha_1 per head,
   top-1 and median |h| per layer) on the same batches: speed and peak RSS in a fresh process.

    python benchmarks/bench_sinks.py            # all three, ~10 minutes on 2 cores
    python benchmarks/bench_sinks.py --quick    # smaller token counts
    python benchmarks/bench_sinks.py --threads 1   # pin torch threads (a machine shared with other jobs)
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

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def _sample(lm, n_tokens: int, seq_len: int = 64, batch_size: int = 8):
    from normscope.core.text import TextOptions, load_text

    book = CORPUS / "sherlock_holmes.txt"
    paths = [book] if book.exists() else None  # the built-in prompts otherwise
    opts = TextOptions(paths=paths, seq_len=seq_len, max_tokens=n_tokens, batch_size=batch_size)
    return load_text(lm.tokenizer, opts, max_positions=lm.info.max_positions, is_causal=lm.info.is_causal)


def _plain(lm, sample) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for b in sample.iter_batches():
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    return sample.n_tokens / (time.perf_counter() - t0)


def _sinks(lm, sample) -> float:
    from normscope.analyses import sinks

    t0 = time.perf_counter()
    sinks.run(lm, sample)
    return sample.n_tokens / (time.perf_counter() - t0)


def speed(n_tokens: int, rounds: int) -> dict:
    from normscope.core.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    sample = _sample(lm, n_tokens)
    _plain(lm, sample)  # warm-up
    ratios, plain, hooked = [], [], []
    for _ in range(rounds):
        a = _plain(lm, sample)
        b = _sinks(lm, sample)
        plain.append(a)
        hooked.append(b)
        ratios.append(b / a)
    return {"tokens": sample.n_tokens, "plain_tok_s": statistics.median(plain),
            "sinks_tok_s": statistics.median(hooked), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


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


def child(kind: str, n_tokens: int) -> None:
    """Run in a fresh process; print one JSON line with tokens/s, peak RSS over the whole process, and the
    peak during the measured pass above the resident memory just before it (the bridge's boot excluded)."""
    from normscope.analyses import sinks
    from normscope.core.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    sample = _sample(lm, n_tokens)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measured = (lambda: sinks.run(lm, sample)) if kind == "sinks" else _tl_pass(lm, sample)
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        measured()
        seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "tokens": sample.n_tokens, "tok_s": sample.n_tokens / seconds,
                      "peak_rss_mib": rss, "rss_after_load_mib": rss_loaded,
                      "pass_rss_before_mib": sampler.start, "pass_peak_rss_mib": sampler.peak,
                      "pass_growth_mib": sampler.peak - sampler.start}))


def _spawn(kind: str, n_tokens: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n_tokens), "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-speed", action="store_true", help="only the memory and TransformerLens parts")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    small, big = (2048, 16384) if args.quick else (8192, 65536)
    print(f"machine: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if not args.skip_speed:
        print("== speed: sinks pass vs plain eager forward (same process, interleaved)")
        print(json.dumps(speed(4096 if args.quick else 8192, 2 if args.quick else 3), indent=1))
    print(f"== memory: peak RSS, {small} vs {big} tokens (fresh processes)")
    m_small, m_big = _spawn("sinks", small, args.threads), _spawn("sinks", big, args.threads)
    print(json.dumps({"small": m_small, "big": m_big,
                      "ratio_big_to_small": m_big["peak_rss_mib"] / m_small["peak_rss_mib"],
                      "pass_peak_ratio_big_to_small": m_big["pass_peak_rss_mib"] / m_small["pass_peak_rss_mib"]},
                     indent=1))
    print(f"== TransformerLens run_with_cache vs normscope sinks, {small} tokens (fresh processes)")
    tl = _spawn("tl", small, args.threads)
    print(json.dumps({"normscope": m_small, "transformer_lens": tl,
                      "speed_ratio_normscope_to_tl": m_small["tok_s"] / tl["tok_s"],
                      "rss_ratio_normscope_to_tl": m_small["peak_rss_mib"] / tl["peak_rss_mib"],
                      "pass_growth_mib": {"normscope": m_small["pass_growth_mib"],
                                          "transformer_lens": tl["pass_growth_mib"]}}, indent=1))


if __name__ == "__main__":
    main()
