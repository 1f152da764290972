"""Cost of a remove-ln training step against a plain fine-tuning step of the same model, and peak memory.

The issue's target: a step with frozen sites costs no more than 1.1x a plain fine-tuning step. Measured in one
process with the configurations interleaved (A B C A B C ...), so that load from other processes on a shared
machine hits every configuration alike; the ratio uses the median step time of each. Peak memory is measured
in a fresh subprocess per configuration (``ru_maxrss`` after a few steps).

Configurations (same model, data, AdamW, CE loss):

* ``plain``: the unmodified model;
* ``frozen``: every norm wrapped and frozen (the state after removal; the EMA stopped);
* ``live+tracking``: every norm wrapped and live, tracking the divisor EMA and computing the aux loss at the
  final norm (the state before removal: the most the wrappers ever add);
* ``ramping``: every norm half-way along its ramp (live and frozen divisor both computed).

Usage::

    .venv/bin/python benchmarks/bench_removal.py                      # bundled SmolLM2-135M, 4 x 128 tokens
    .venv/bin/python benchmarks/bench_removal.py --model tiny --reps 20 # tiny random Llama (no bundle needed)
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

import torch

CONFIGS = ("plain", "frozen", "live+tracking", "ramping")


def load(model_name: str):
    if model_name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny import tiny_llama

        m = tiny_llama(n_layers=4)
        vocab = m.config.vocab_size
    else:
        from normscope.models import load_model

        m = load_model(model_name, device="cpu").model
        vocab = m.config.vocab_size
    return m, vocab


def make_step(model, config: str, ids: torch.Tensor):
    """Prepare ``model`` for ``config`` and return a function that runs one optimizer step."""
    from normscope.removal.frozen import Removal
    from normscope.removal.train import next_token_ce, param_groups
    from normscope.sites import find_layout, find_norm_sites

    removal = None
    if config != "plain":
        layout = find_layout(model)
        sites = find_norm_sites(model, layout)
        removal = Removal(model, layout, sites)
        removal.set(tracking=True)
        with torch.no_grad():
            model(input_ids=ids[:1])
        removal.set(tracking=False)
        removal.commit()
        if config in ("frozen", "ramping"):
            for w in removal:
                w.freeze(0, "main")
                if w.split_v:
                    w.freeze(0, "v")
                w.first_blend = 1.0
                if config == "ramping":
                    w.ramp = w.ramp_v = 0.5
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5)
    aux_names = [w.site_name for w in removal if w.role == "final"] if removal is not None else []

    def step() -> float:
        t0 = time.perf_counter()
        if removal is not None and config == "live+tracking":
            removal.set(tracking=True, aux_sites=aux_names)
        out = model(input_ids=ids, use_cache=False)
        loss = next_token_ce(out.logits, ids)
        if removal is not None and config == "live+tracking":
            aux = removal.aux_loss()
            loss = loss + 0.1 * aux
            removal.set(tracking=False, aux_sites=[])
            removal.commit()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step, removal


def timing(args) -> dict:
    import copy

    base, vocab = load(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    steps = {}
    for c in CONFIGS:
        steps[c], _ = make_step(copy.deepcopy(base), c, ids)
    del base
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for c in CONFIGS:  # warm-up
        steps[c]()
    for _ in range(args.reps):
        for c in CONFIGS:
            times[c].append(steps[c]())
    med = {c: statistics.median(v) for c, v in times.items()}
    return {"median_s": med, "ratio_to_plain": {c: med[c] / med["plain"] for c in CONFIGS}, "reps": args.reps}


def memory(args, config: str) -> float:
    """Peak RSS (GiB) of a fresh process that runs 3 steps of ``config``."""
    code = (f"import sys, resource, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import bench_removal as b; "
            f"m, v = b.load({args.model!r}); ids = torch.randint(0, v, ({args.batch}, {args.seq})); "
            f"s, _ = b.make_step(m, {config!r}, ids); [s() for _ in range(3)]; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a normscope model spec, or 'tiny'")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    print(f"machine: {torch.get_num_threads()} torch threads; model {args.model}; batch {args.batch} x {args.seq}")
    res = timing(args)
    for c in CONFIGS:
        print(f"{c:>14}: median {res['median_s'][c]:.3f} s/step  ratio to plain {res['ratio_to_plain'][c]:.3f}")
    if not args.no_memory:
        res["peak_rss_gib"] = {c: memory(args, c) for c in CONFIGS}
        for c in CONFIGS:
            print(f"{c:>14}: peak RSS {res['peak_rss_gib'][c]:.2f} GiB")
    print(f"load average during the run: {open('/proc/loadavg').read().split()[:3]}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    _ = resource  # imported for the subprocess snippet's sake


if __name__ == "__main__":
    main()
