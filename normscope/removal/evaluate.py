"""Held-out evaluation of a removal run: per-token losses, their tail, the tokens that got worse, residual norms.

Baroni et al. 2025 report GPT-2 XL's LN-free model at +0.025 nats over its control on OpenWebText, yet 130.2
mean CE on the Pile (median 1.09): a handful of rare tokens blew up while the mean on the training
distribution looked fine. So every model is scored on the whole per-token loss distribution (mean, median,
99th and 99.9th percentile, maximum) and the tokens whose loss grew most are listed with their context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from normscope.core.losses import token_losses
from normscope.removal.frozen import Removal, clamp_ratio


@dataclass
class TokenLosses:
    """Next-token losses of one model on one text, in a fixed token order (comparable across models)."""

    losses: torch.Tensor  # [n_tokens] float32, nats
    targets: torch.Tensor  # [n_tokens] long: the predicted token
    seq: torch.Tensor  # [n_tokens] long: sequence number
    pos: torch.Tensor  # [n_tokens] long: position of the predicted token in its sequence
    n_nonfinite: int = 0


def per_token_losses(model: nn.Module, sample: Any, *, progress: Any = None) -> TokenLosses:
    """One forward pass per batch (no gradient); keeps one float per token, never the activations."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out_l, out_t, out_s, out_p = [], [], [], []
    n_seq = 0
    with torch.no_grad():
        for b in sample.iter_batches():
            ids = b.input_ids.to(device)  # [batch, pos]
            mask = b.attention_mask.to(device)  # [batch, pos]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, pos, vocab]
            ce = token_losses(logits, ids, mask).float().cpu()  # [n]
            keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).cpu()  # [batch, pos-1]
            seq = torch.arange(n_seq, n_seq + ids.shape[0])[:, None].expand_as(keep)
            pos = torch.arange(1, ids.shape[1])[None, :].expand_as(keep)
            out_l.append(ce)
            out_t.append(ids[:, 1:].cpu()[keep])
            out_s.append(seq[keep])
            out_p.append(pos[keep])
            n_seq += ids.shape[0]
            if progress is not None:
                progress(int(ids.numel()))
    model.train(was)
    losses = torch.cat(out_l)
    return TokenLosses(losses, torch.cat(out_t), torch.cat(out_s), torch.cat(out_p),
                       int((~torch.isfinite(losses)).sum()))


def loss_summary(losses: torch.Tensor) -> dict[str, float]:
    """Mean, median, 99th / 99.9th percentile and maximum of per-token losses (non-finite ones count as inf).

    losses: ``[n_tokens]``. Percentiles are linear interpolations (``torch.quantile``).
    """
    x = losses.double()
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf")))
    finite = torch.isfinite(x).all()
    q = torch.quantile(x, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64)) if finite else None
    return {
        "mean": float(x.mean()),
        "median": float(q[0]) if q is not None else float(x.median()),
        "p99": float(q[1]) if q is not None else float("inf"),
        "p99_9": float(q[2]) if q is not None else float("inf"),
        "max": float(x.max()),
        "n_tokens": int(x.numel()),
    }


def tail_curve(losses: torch.Tensor, points: int = 200) -> tuple[list[float], list[float]]:
    """Complementary CDF of per-token loss: (loss thresholds, share of tokens above each), for a log plot."""
    x = torch.sort(losses.double()[torch.isfinite(losses)]).values
    if x.numel() == 0:
        return [], []
    n = x.numel()
    idx = torch.unique(torch.cat([torch.linspace(0, n - 1, points).round().long(),
                                  torch.arange(max(n - 50, 0), n)]))
    thr = x[idx]
    share = 1.0 - (idx.double() + 1) / n + 1.0 / n  # P(loss >= thr)
    return thr.tolist(), share.tolist()


def grown_tokens(base: TokenLosses, new: TokenLosses, sample: Any, tokenizer: Any, k: int = 20,
                 context: int = 6) -> pd.DataFrame:
    """The ``k`` tokens whose loss grew most from ``base`` to ``new``, with the preceding ``context`` tokens."""
    if base.losses.shape != new.losses.shape:
        raise ValueError("the two models were scored on different tokens")
    delta = new.losses.double() - base.losses.double()  # [n]
    delta = torch.where(torch.isfinite(delta), delta, torch.full_like(delta, float("inf")))
    top = torch.topk(delta, min(k, delta.numel())).indices.tolist()
    rows_ids = torch.cat([b.input_ids for b in sample.iter_batches()])  # [n_seq, pos]
    rows = []
    for i in top:
        s, p = int(new.seq[i]), int(new.pos[i])
        ctx = rows_ids[s, max(0, p - context): p].tolist()
        rows.append({
            "context": _decode(tokenizer, ctx),
            "token": _decode(tokenizer, [int(new.targets[i])]),
            "position": p,
            "loss_before": float(base.losses[i]),
            "loss_after": float(new.losses[i]),
            "growth": float(delta[i]),
        })
    return pd.DataFrame(rows, columns=["context", "token", "position", "loss_before", "loss_after", "growth"])


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids)
    except Exception:
        return " ".join(map(str, ids))


def residual_norms(model: nn.Module, sample: Any, max_batches: int = 2) -> pd.DataFrame:
    """Mean L2 norm of the residual stream after each block, at position 0 and at the other positions.

    Uses :class:`normscope.core.capture.Capture` with the ``blocks.{i}.hook_resid_post`` points and a reducer per
    layer, so only running sums are kept. Baroni et al. report GPT-2 small's BOS residual norm at ~3000
    originally and ~300 LN-free; the first-token norm is what the auxiliary loss pulls down.
    """
    import warnings

    from normscope.core.capture import Capture, TokenMoments
    from normscope.core.sites import find_layout

    with warnings.catch_warnings():  # a model mid-removal has FrozenNorm wrappers; only its blocks matter here
        warnings.simplefilter("ignore")
        layout = find_layout(model)
    cap = Capture(model, layout, [])
    red = {b.index: cap.add(f"blocks.{b.index}.hook_resid_post", TokenMoments(lambda h: h.norm(dim=-1)))
           for b in layout.blocks}
    batches = list(sample.iter_batches())[:max_batches]
    with cap:
        cap.run(batches)
    return pd.DataFrame([{"layer": i, "first_token": r.mean("pos0"), "other_tokens": r.mean("rest")}
                         for i, r in sorted(red.items())])


def clamp_usage(model: nn.Module, removal: Removal, sample: Any, level: float = 1.1) -> dict[str, Any]:
    """What the clamp (``remove-ln --clamp K``) did on held-out text: the share of tokens (past the fixed prefix)
    that some site divided more than ``level`` x as hard as a token at the site's scale, i.e. where the model is
    not LN-free (:func:`normscope.removal.frozen.clamp_ratio`), per site and over all sites, and the largest
    ratio. A hard clamp (``--clamp-shape hard``) is the constant below its knee, so for it every token the knee
    touches counts (``level`` 1). One forward pass per batch; the hooks keep counts, never activations."""
    hard = any(w.clamp > 0 for w in removal) and all(w.clamp_hard for w in removal if w.clamp > 0)
    if hard:
        level = 1.0
    per_site: dict[str, list[int]] = {}
    state: dict[str, Any] = {"any": None, "max": 1.0}
    handles = []

    def make(w: Any) -> Any:
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not (w.clamp > 0 and w.frozen and w.divisor is not None):
                return
            live = w.live_divisor(args[0])  # [batch, pos, ..., 1]
            k = max(w.n_fixed, w.aux_skip_first)
            r = clamp_ratio(live[:, k:], w.divisor, w.clamp, w.clamp_hard)
            r = r.reshape(r.shape[0], r.shape[1], -1).amax(dim=-1)  # [batch, pos - k]
            hit = torch.nan_to_num(r, nan=float("inf")) > level
            cnt = per_site.setdefault(w.site_name, [0, 0])
            cnt[0] += int(hit.sum())
            cnt[1] += int(hit.numel())
            state["any"] = hit if state["any"] is None else state["any"] | hit
            state["max"] = max(state["max"], float(torch.nan_to_num(r, nan=float("inf")).max()))
        return pre

    for w in removal:
        handles.append(w.register_forward_pre_hook(make(w)))
    device = next(model.parameters()).device
    hits = total = 0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in sample.iter_batches():
                state["any"] = None
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
                if state["any"] is not None:
                    hits += int(state["any"].sum())
                    total += int(state["any"].numel())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    shares = {n: c[0] / c[1] if c[1] else 0.0 for n, c in per_site.items()}
    worst = max(shares, key=lambda n: shares[n]) if shares else None
    return {"level": level, "share_any_site": hits / total if total else 0.0, "tokens": total,
            "max_ratio": state["max"], "worst_site": worst, "worst_site_share": shares[worst] if worst else 0.0,
            "sites": [{"site": n, "share": v, "tokens": per_site[n][1]} for n, v in shares.items()],
            "sites_clamped": sum(1 for w in removal if w.clamp > 0), "sites_removed": removal.n_removed(),
            "hard": hard}
