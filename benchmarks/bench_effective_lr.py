"""Benchmark of ``grads --steps``: the cost of one fine-tune step against a plain forward + backward of the same
loss on the same batch (the baseline, measured in the same run), on the bundled SmolLM2-135M (CPU, fp32).

One fine-tune step is a forward and backward pass, an AdamW step over every parameter, one copy of the 61
tracked weights and their ||dw||/||w||; the weights are put back at the end. Runs interleave A B A B so that a
shared machine's drift hits both; process CPU time is reported beside wall time (it is what a busy machine
does not inflate).

    OMP_NUM_THREADS=1 python benchmarks/bench_effective_lr.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from normscope.analyses.grads.effective import fine_tune
    from normscope.analyses.grads.losses import forward_loss
    from normscope.analyses.grads.params import grads_enabled
    from normscope.core.models import load_model
    from normscope.core.sites import find_layout, find_norm_sites
    from normscope.core.text import TextOptions, load_text
    from normscope.core.writers import find_writers

    lm = load_model("smollm2-135m", device="cpu")
    model = lm.model
    sample = load_text(lm.tokenizer, TextOptions(seq_len=64, max_tokens=512, batch_size=8, controls=False),
                       max_positions=lm.info.max_positions)
    batches = list(sample.iter_batches())[:1]
    layout = find_layout(model)
    writers = find_writers(model, layout, find_norm_sites(model, layout))
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    def plain() -> None:
        with grads_enabled(model):
            loss, n, _ = forward_loss(model, "next-token", batches[0], None, None)
            (loss / n).backward()

    def step() -> None:
        fine_tune(model, "next-token", batches, lambda b, i: None, None, writers, 2e-4, 1)

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "step": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("step", step)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items()), "weights not put back"
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    print(f"{len(writers)} tracked weights, 1 batch of {int(batches[0].attention_mask.sum())} tokens, "
          f"{args.repeats} repeats, medians")
    for k, (w, c) in med.items():
        print(f"  {k:5s}: wall {w:7.2f} s, cpu {c:7.2f} s")
    print(f"  one fine-tune step / plain forward + backward: wall {med['step'][0] / med['plain'][0]:.2f}x, "
          f"cpu {med['step'][1] / med['plain'][1]:.2f}x; weights put back bit-identical")


if __name__ == "__main__":
    main()
