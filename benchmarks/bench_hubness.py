"""Benchmark of the exact k-NN search behind ``normscope hubness`` (CPU, fp32), and of the whole command.

Each measurement is set against a baseline measured in the same run:

1. k-NN: normscope's blocked search (``knn_indices``: a [block_size, N] block at a time) against the naive
   exact search that builds the full N x N distance matrix (``torch.cdist`` + ``topk``), on N points of
   d = 576 (SmolLM2's width) with the heavy-tailed norms of a residual stream. Each method runs in a fresh
   process; reported: seconds and peak RSS above the data itself, as ratios blocked / naive. Both are exact up
   to float32 rounding: the rows whose neighbour set differs from a float64 brute-force search are counted.
2. N = 20,000: the blocked search alone (the naive one would need a 1.6 GB distance matrix), to check the
   issue's claim that 20,000 x 576 fits in a few hundred MB.
3. The command on the bundled SmolLM2: ``hubness.run`` time split into forward passes and k-NN search, and
   the forward passes against a plain forward of the same batches (the capture overhead).

    python benchmarks/bench_hubness.py            # several minutes on 2 cores
    python benchmarks/bench_hubness.py --quick    # smaller N, no SmolLM2 run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"

_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from normscope.analyses.hubness import k_occurrence, knn_indices
torch.set_num_threads({threads})
n, d, k, method = {n}, 576, 10, {method!r}
gen = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen))  # heavy-tailed norms
x[: n // 100, 7] += 2000.0  # a few massive-activation tokens
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if method == "blocked":
    idx = knn_indices(x, k, "euclidean", block_size=1024)
elif method == "float64":
    dist = torch.cdist(x.double(), x.double())
    dist.fill_diagonal_(float("inf"))
    ref = dist.topk(k, largest=False).indices.sort(dim=1).values
    del dist
    rows = lambda i: int((i.sort(dim=1).values != ref).any(dim=1).sum())
    naive = torch.cdist(x, x)
    naive.fill_diagonal_(float("inf"))
    print(json.dumps({{"rows_differing_blocked": rows(knn_indices(x, k, "euclidean")),
                      "rows_differing_naive_fp32": rows(naive.topk(k, largest=False).indices), "n": n}}))
    sys.exit(0)
else:
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    idx = dist.topk(k, largest=False).indices
    del dist
sec = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nk = k_occurrence(idx, n)
print(json.dumps({{"seconds": sec, "peak_mb": (peak - before) / 1024, "nk_hash": int((nk * torch.arange(n)).sum()),
                  "nk_max": int(nk.max())}}))
"""


def child(method: str, n: int, threads: int) -> dict:
    code = _CHILD.format(root=str(ROOT), threads=threads, n=n, method=method)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_knn(sizes: list[int], threads: int) -> list[dict]:
    rows = []
    for n in sizes:
        a, b = child("naive", n, threads), child("blocked", n, threads)
        a2, b2 = child("naive", n, threads), child("blocked", n, threads)  # A B A B: drift hits both
        t_naive, t_blocked = min(a["seconds"], a2["seconds"]), min(b["seconds"], b2["seconds"])
        rows.append({"n": n, "naive_s": t_naive, "blocked_s": t_blocked, "time_ratio": t_blocked / t_naive,
                     "naive_peak_mb": a["peak_mb"], "blocked_peak_mb": b["peak_mb"],
                     "memory_ratio": b["peak_mb"] / max(a["peak_mb"], 1e-9),
                     "same_nk_as_naive": a["nk_hash"] == b["nk_hash"] and a["nk_max"] == b["nk_max"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_command(n_tokens: int) -> dict:
    import torch

    from normscope.analyses import hubness
    from normscope.core.models import load_model
    from normscope.core.text import TextOptions, load_text

    lm = load_model("smollm2-135m", device="cpu")
    book = CORPUS / "sherlock_holmes.txt"
    opts = TextOptions(paths=[book] if book.exists() else None, seq_len=128, max_tokens=n_tokens, batch_size=8,
                       controls=False)
    sample = load_text(lm.tokenizer, opts, max_positions=lm.info.max_positions, is_causal=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in sample.iter_batches():
            lm.model(input_ids=b.input_ids, use_cache=False)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = hubness.run(lm, sample, hubness.HubnessOptions())
    total = time.perf_counter() - t0
    row = {"tokens": res.payload["n_tokens"], "points": res.payload["n_points"], "passes": res.payload["n_passes"],
           "total_s": total, "plain_forward_s": plain, **{k: v for k, v in res.timings.items()},
           "forward_overhead_ratio": res.timings["forward passes"] / plain / res.payload["n_passes"],
           "peak_matrix_mb": res.payload["peak_matrix_mb"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sizes = [2000, 4000] if args.quick else [4000, 8000]
    print("# k-NN: blocked vs full N x N matrix (d = 576, k = 10)")
    bench_knn(sizes, args.threads)
    print("# exactness: rows whose 10-NN set differs from a float64 brute-force search (fp32 near-ties)")
    code = _CHILD.format(root=str(ROOT), threads=args.threads, n=sizes[0], method="float64")
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    if not args.quick:
        print("# k-NN: blocked only at N = 20,000")
        r = child("blocked", 20000, args.threads)
        r["n"] = 20000
        r["naive_would_need_mb"] = 20000 * 20000 * 4 / 2**20
        print(json.dumps(r), flush=True)
        print("# hubness on SmolLM2-135M, default settings")
        bench_command(4096)


if __name__ == "__main__":
    main()
