"""Which hidden dims a remove-ln run's runaway tokens carry: load a checkpoint of an LN-free run (its weights and
frozen divisors, the exact BOS kept), run windows of a book with a BOS, and at the input of a chosen block list the
tokens at positions >= 1 whose residual RMS is largest relative to the window's median, with their top dims; then
the same tokens in the original model, and the share of |h|^2 in dims 507 and 247 (SmolLM2's massive-activation
dims). Asks whether variant U's runaway tokens at ``blocks.12.ln1`` trip the circuit that writes the sink's massive
activation (README: they do not; they grow along the residual's usual direction, in which those two dims already
hold about half of an ordinary token's |h|^2 at block 12).

    python benchmarks/lnfree/runaway_dims.py runs/U/ln-free/ckpt-000159 --act gelu_10 --block 12
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights
from transformers.activations import ACT2FN

from normscope.core.models import load_model
from normscope.core.sites import find_layout, find_norm_sites
from normscope.removal.frozen import Removal
from normscope.removal.train import WEIGHTS_FILE, read_state


def residual_in(model: torch.nn.Module, ids: torch.Tensor, block: int) -> torch.Tensor:
    """The residual stream entering ``block``: ``[batch, pos, d_model]``."""
    got: dict[str, torch.Tensor] = {}
    h = model.model.layers[block].register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return got["x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--act", default="", help="the student's MLP activation, if the run swapped it (U: gelu_10)")
    ap.add_argument("--block", type=int, default=12)
    ap.add_argument("--text", type=Path, default=Path("../shared/corpus/sherlock_holmes.txt"))
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2-135m", device="cpu")
    original, tok = lm.model.eval(), lm.tokenizer
    student = copy.deepcopy(original)
    if args.act:
        for b in student.model.layers:
            b.mlp.act_fn = ACT2FN[args.act]
    removal = Removal(student, find_layout(student), find_norm_sites(student))
    load_weights(student, str(args.ckpt / WEIGHTS_FILE))
    removal.load_state(read_state(args.ckpt)["removal"])
    student.eval()  # no training guard: what the export would compute
    text = args.text.read_text(encoding="utf-8")
    ids = tok(text[len(text) // 2:], return_tensors="pt").input_ids[0, : args.windows * 127].reshape(-1, 127)
    ids = torch.cat([torch.full((ids.shape[0], 1), tok.bos_token_id), ids], dim=1)  # [windows, 128]
    rows = []
    for name, model in (("LN-free", student), ("original", original)):
        x = torch.cat([residual_in(model, ids[i:i + 8], args.block) for i in range(0, len(ids), 8)])  # [w, 128, d]
        rms = x[:, 1:].pow(2).mean(-1).sqrt()  # [windows, 127]
        rms = torch.where(torch.isfinite(x[:, 1:]).all(-1), rms, torch.full_like(rms, float("nan")))
        rel = rms / rms.nanmedian(dim=1, keepdim=True).values  # [windows, 127]: over the finite tokens
        rows.append((name, x, rel))
    _, xs, rel = rows[0]
    _, xo, rel_o = rows[1]
    finite = torch.isfinite(xs[:, 1:]).all(-1)  # [windows, 127]: a token that overflowed has no dims to show
    flat = torch.where(finite, rel, torch.full_like(rel, -1.0)).flatten().topk(args.top)
    print(f"{int((~finite).sum())} of {finite.numel():,} tokens overflowed (inf/NaN) before block {args.block}")
    print(f"block {args.block} input, positions >= 1 ({rel.numel():,} tokens); the LN-free model's largest RMS / "
          "window median, and the same token in the original:")
    for i in flat.indices.tolist():
        w, p = divmod(i, rel.shape[1])
        for name, x, r in (("LN-free", xs, rel), ("original", xo, rel_o)):
            h = x[w, p + 1]  # [d_model]
            top = h.abs().topk(3)
            dims = ", ".join(f"{d}: {h[d]:+.3g}" for d in top.indices.tolist())
            share = float((h[507] ** 2 + h[247] ** 2) / h.pow(2).sum())  # of the squared norm in the two dims
            dims += f"; dims 507+247 hold {share:.0%} of |h|^2"
            word = repr(tok.decode(ids[w, p + 1]))
            print(f"  {word:>14} pos {p + 1:3d}  {name:8s} {float(r[w, p]):9.3g}x  top dims {dims}")
    for name, x in (("LN-free", xs), ("original", xo)):
        h = x[:, 1:][finite]  # [tokens, d_model]
        share = (h[:, 507] ** 2 + h[:, 247] ** 2) / h.pow(2).sum(-1)  # [tokens]
        print(f"{name}: dims 507+247 hold {float(share.median()):.0%} of |h|^2 for the median finite token")
    n507 = int((xs[:, 1:, 507].abs() > 1000).sum())
    print(f"tokens at positions >= 1 with |h[507]| > 1000 at this block: LN-free {n507}, original "
          f"{int((xo[:, 1:, 507].abs() > 1000).sum())}")


if __name__ == "__main__":
    main()
