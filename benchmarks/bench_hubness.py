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

4. ``--defaults``: ``hubness.run`` with the command's defaults (6 blocks: 32 points) on 2,048 tokens of a book
   at T = 64, batch 8, against the earlier default points (every third block plus the last: 57 points) in the
   same process: wall and process CPU time, split into forward passes and k-NN searches, and the skewness of
   the points both measure (the same numbers: only which points are measured changed).

    python benchmarks/bench_hubness.py            # several minutes on 2 cores
    python benchmarks/bench_hubness.py --quick    # smaller N, no SmolLM2 run
    python benchmarks/bench_hubness.py --defaults --threads 1
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


def defaults(book: str) -> dict:
    """Section 4: the default points against the earlier default points, same process, same sample."""
    from normscope.analyses import hubness
    from normscope.core.models import load_model
    from normscope.core.text import TextOptions, load_text

    lm = load_model("smollm2-135m", device="cpu")
    path = CORPUS / book
    sample = load_text(lm.tokenizer, TextOptions(paths=[path] if path.exists() else None, max_tokens=2048),
                       max_positions=lm.info.max_positions, is_causal=True)
    out: dict = {"tokens": sample.n_tokens, "text": path.name if path.exists() else "built-in prompts"}
    runs = {}
    for label, layers in (("default", None), ("every third block + last", "0,3,6,9,12,15,18,21,24,27,29")):
        t0, c0 = time.perf_counter(), time.process_time()
        r = hubness.run(lm, sample, hubness.HubnessOptions(layers=layers))
        runs[label] = r
        out[label] = {"points": r.payload["n_points"], "wall_s": time.perf_counter() - t0,
                      "cpu_s": time.process_time() - c0,
                      "phases_wall_s": {k: round(v, 3) for k, v in r.timings.items()}}
        print(json.dumps({label: out[label]}), flush=True)
    a, b = (runs[k].tables["points"].set_index(["point", "metric"])["skewness"] for k in runs)
    common = a.index.intersection(b.index)
    out["cpu_ratio_default_over_earlier"] = out["default"]["cpu_s"] / out["every third block + last"]["cpu_s"]
    out["shared_points_max_skewness_diff"] = float((a[common] - b[common]).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--defaults", action="store_true", help="only section 4: the default points on a book")
    ap.add_argument("--book", default="peter_pan.txt")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.defaults:
        print(json.dumps(defaults(args.book), indent=1))
        return
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
