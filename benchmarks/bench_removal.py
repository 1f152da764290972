"""Cost of a remove-ln training step against a plain fine-tuning step of the same model, and peak memory.

The issue's target: a step with frozen sites costs no more than 1.1x a plain fine-tuning step. Measured in one
process on ONE model whose configuration is switched in place between steps, interleaved (A B C D A B C D ...), so
that load from other processes on a shared machine hits every configuration alike; the ratio uses the median
step time of each. On a shared machine run it with OMP_NUM_THREADS=1 (two-thread processes that compete for
two cores slow each other down by up to 8x, which swamps the comparison). Peak memory is measured
in a fresh subprocess per configuration (``ru_maxrss`` after a few steps).

Configurations (same model, data, AdamW, CE loss):

* ``plain``: the unmodified model;
* ``frozen``: every norm wrapped and frozen (the state after removal; the EMA stopped);
* ``live+tracking``: every norm wrapped and live, tracking the divisor EMA and computing the aux loss at the
  final norm (the state before removal: the most the wrappers ever add);
* ``ramping``: every norm half-way along its ramp (live and frozen divisor both computed).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_removal.py    # bundled SmolLM2-135M, 4 x 128 tokens
    .venv/bin/python benchmarks/bench_removal.py --model tiny --reps 20 # tiny random Llama (no bundle needed)
"""

from __future__ import annotations

import argparse
import json
import os
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
        from normscope.core.models import load_model

        m = load_model(model_name, device="cpu").model
        vocab = m.config.vocab_size
    return m, vocab


class Bench:
    """One model, an optimizer and the wrappers, switched between configurations in place (no copies)."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        from normscope.core.sites import find_layout, find_norm_sites
        from normscope.removal.frozen import Removal
        from normscope.removal.train import param_groups

        self.model, self.ids = model, ids
        self.layout = find_layout(model)
        self.sites = find_norm_sites(model, self.layout)
        self.removal = Removal(model, self.layout, self.sites)
        self.removal.set(tracking=True)
        with torch.no_grad():
            model(input_ids=ids[:1])
        self.removal.set(tracking=False)
        self.removal.commit()
        self.state = {w.site_name: dict(w.state()) for w in self.removal}
        self.removal.uninstall()
        self.installed = False
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        self.opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-6)
        self.aux_names = [s.name for s in self.sites if s.role == "final"]

    def configure(self, config: str) -> None:
        from normscope.removal.frozen import Removal

        if config == "plain":
            if self.installed:
                self.removal.uninstall()
                self.installed = False
            return
        if not self.installed:
            self.removal = Removal(self.model, self.layout, self.sites)
            self.installed = True
        for w in self.removal:
            w.load_state(self.state[w.site_name])
            if config in ("frozen", "ramping"):
                w.freeze(0, "main")
                if w.split_v:
                    w.freeze(0, "v")
                w.first_blend = 1.0
                w.ramp = w.ramp_v = 0.5 if config == "ramping" else 1.0

    def step(self, config: str) -> float:
        from normscope.removal.train import next_token_ce

        self.configure(config)
        t0 = time.perf_counter()
        live = config == "live+tracking"
        if live:
            self.removal.set(tracking=True, aux_sites=self.aux_names)
        out = self.model(input_ids=self.ids, use_cache=False)
        loss = next_token_ce(out.logits, self.ids)
        if live:
            loss = loss + 0.1 * self.removal.aux_loss()
            self.removal.set(tracking=False, aux_sites=[])
            self.removal.commit()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def timing(args) -> dict:
    model, vocab = load(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    bench = Bench(model, ids)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for c in CONFIGS:  # warm-up
        bench.step(c)
    for _ in range(args.reps):
        for c in CONFIGS:
            times[c].append(bench.step(c))
    med = {c: statistics.median(v) for c, v in times.items()}
    return {"median_s": med, "ratio_to_plain": {c: med[c] / med["plain"] for c in CONFIGS}, "reps": args.reps,
            "all_s": times}


def memory(args, config: str) -> float:
    """Peak RSS (GiB) of a fresh process that runs 3 steps of ``config``."""
    code = (f"import sys, resource, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import bench_removal as b; "
            f"m, v = b.load({args.model!r}); ids = torch.randint(0, v, ({args.batch}, {args.seq})); "
            f"bb = b.Bench(m, ids); [bb.step({config!r}) for _ in range(3)]; "
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
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; model {args.model}; "
          f"batch {args.batch} x {args.seq}; {args.reps} interleaved repetitions")
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
