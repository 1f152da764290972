"""The words of the depth page: table and column labels, and the summary sentences, each computed from the data
(no plotly here; ``report.py`` draws the figures).

The sentences follow Sun, Yin, Li, Liu et al. 2025 (Curse of Depth, arXiv:2502.05795), Gromov et al. 2024
(arXiv:2403.17887) and Sun, Chen, Kolter, Liu 2024 (Massive Activations, arXiv:2402.17762).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from normscope.analyses.depth.metrics import MASSIVE_MIN, MASSIVE_RATIO, GrowthFit, fit_growth

DEEP_FRACTION = 0.4  # the summary line talks about the deepest 40% of blocks

AXES = {"layers": "point", "blocks": "block", "sites": "layer"}  # each per-depth table: its depth column
LABELS = {  # words for table, column and headline names on pages and in compare
    "layers": "per residual point",
    "blocks": "per block",
    "sites": "per norm site",
    "growth": "growth laws fitted against depth",
    "windows": "cheapest window of n blocks to drop",
    "angular": "angular distance between residual points",
    "massive": "tokens at positions > 0 with a massive activation",
    "point": "residual point",
    "block": "block",
    "norm_rest": "residual L2 norm, positions > 0",
    "norm_pos0": "residual L2 norm, position 0",
    "var_rest": "residual variance, positions > 0",
    "var_pos0": "residual variance, position 0",
    "norm_rest_typical": "residual L2 norm, positions > 0 without massive activations",
    "var_rest_typical": "residual variance, positions > 0 without massive activations",
    "massive_rest": "tokens at positions > 0 with a massive activation",
    "massive_pos0": "first tokens with a massive activation",
    "max_abs_rest": "largest |h| at positions > 0",
    "rel_update": "relative update ||f(h)|| / ||h||",
    "rel_update_attn": "relative update of attention",
    "rel_update_mlp": "relative update of the MLP",
    "skip_delta_loss": "loss change when the block is skipped",
    "skip_loss": "loss with the block skipped",
    "skip_delta_loss_se": "standard error of that loss change, over the sequences measured",
    "angular_to_next": "angular distance to the next block",
    "divisor_rest": "norm divisor, positions > 0",
    "divisor_pos0": "norm divisor, position 0",
    "out_var_rest": "norm output variance, positions > 0",
    "lns_norm_rest": "LNS what-if: residual norm, positions > 0",
    "nonfinite_points": "hook points with inf/NaN",
    # headline keys (the JSON keys stay as they are)
    "norm_embeddings": "residual norm at the embeddings",
    "norm_before_last_block": "residual norm before the last block",
    "norm_last": "residual norm after the last block",
    "pos0_to_rest_norm_ratio_max": "largest position-0 / ordinary norm ratio",
    "growth_exponent": "growth exponent p, norm ~ (l+1)^p",
    "growth_better_fit": "better growth law",
    "loss": "loss (nats/token)",
    "costliest_block_to_skip": "costliest block to skip (loss change)",
    "cheapest_block_to_skip": "cheapest block to skip (loss change)",
    "skip_measured_on": "skip losses measured on",
    "lns_delta_loss": "LNS what-if: loss change (nats/token)",
}


def block_list(blocks: list[int]) -> str:
    """``[29]`` -> "block 29", ``[0, 15]`` -> "blocks 0 and 15", ``[0, 15, 29]`` -> "blocks 0, 15 and 29"."""
    b = [str(int(x)) for x in blocks]
    if len(b) == 1:
        return f"block {b[0]}"
    return f"blocks {', '.join(b[:-1])} and {b[-1]}"


def _cost(v: float, at_most: bool) -> str:
    """What skipping costs, in words that keep the sign: negative means skipping lowers the loss."""
    if v >= 0:
        return f"costs {'at most ' if at_most else ''}{v:.3f} nats/token"
    return f"lowers the loss {'in every case, by at least' if at_most else 'by'} {-v:.3f} nats/token"


def quotable_line(blocks: pd.DataFrame, n_blocks: int, fraction: float = DEEP_FRACTION) -> str:
    """The sentence a reader can quote: how much the deepest ``fraction`` of blocks change the stream,
    and (when measured) what skipping any one of them costs."""
    k = max(1, math.ceil(fraction * n_blocks))
    deep = blocks.sort_values("block").tail(k)
    upd = float(deep["rel_update"].max())
    if k == 1:
        last = int(deep["block"].iloc[0])
        where = "the only block" if n_blocks == 1 else f"the deepest block (block {last} of 0-{n_blocks - 1})"
        line = (f"{where[0].upper()}{where[1:]} changes the residual stream of ordinary tokens by "
                f"{100 * upd:.1f}%")
    else:
        line = (f"The deepest {round(100 * k / n_blocks)}% of blocks ({k} of {n_blocks}, blocks "
                f"{int(deep['block'].min())}-{int(deep['block'].max())}) change the residual stream of ordinary "
                f"tokens by at most {100 * upd:.1f}% each (median {100 * float(deep['rel_update'].median()):.1f}%)")
    if "skip_delta_loss" in deep and deep["skip_delta_loss"].notna().any():
        measured = deep.dropna(subset=["skip_delta_loss"])
        w = measured.loc[measured["skip_delta_loss"].idxmax()]
        worst, wb = float(w["skip_delta_loss"]), int(w["block"])
        if len(measured) == len(deep) == 1:
            line += f"; skipping it {_cost(worst, False)}"
        elif len(measured) == 1:
            line += f"; of these only block {wb} was skipped, and skipping it {_cost(worst, False)}"
        elif len(measured) == len(deep):
            line += f"; skipping any one of them {_cost(worst, True)} (block {wb})"
        else:
            line += (f"; skipping any one of the {len(measured)} measured "
                     f"({block_list(measured['block'].tolist())}) {_cost(worst, True)} (block {wb})")
    return line + "."


def _longest_run(points: list[int]) -> list[int]:
    """The longest run of consecutive integers in sorted ``points`` (the first one on a tie)."""
    best: list[int] = []
    cur: list[int] = []
    for p in points:
        cur = cur + [p] if cur and p == cur[-1] + 1 else [p]
        if len(cur) > len(best):
            best = cur
    return best


def massive_line(layers: pd.DataFrame, massive: pd.DataFrame) -> str | None:
    """Why the mean variance of positions > 0 can stay flat while their norm grows: a few later-position tokens
    with massive activations (Sun, Chen, Kolter, Liu 2024) dominate that mean of squares. None when the data shows
    no such token. ``layers`` needs the ``massive_rest`` and ``*_typical`` columns of the depth analysis."""
    if "massive_rest" not in layers or not (layers["massive_rest"] > 0).any():
        return None
    lay = layers.set_index("point")
    run = _longest_run(sorted(int(p) for p in lay.index[lay["massive_rest"] > 0]))
    a, b = lay.loc[run[0]], lay.loc[run[-1]]
    k = int(lay.loc[run, "massive_rest"].max())
    n_rest = int(a["n_rest"])
    occ = massive[(massive["last_point"] >= run[0]) & (massive["first_point"] <= run[-1])] if len(massive) else massive
    one = k == 1
    if len(occ) == 1:
        o = occ.iloc[0]
        who = f"{o['token']!r} at position {int(o['position'])} of sequence {int(o['sequence'])}"
    else:
        kinds = occ.groupby("token", sort=False).size().sort_values(ascending=False)
        who = ", ".join(f"{t!r} ({n}x)" if n > 1 else repr(t) for t, n in kinds.head(5).items())
    top = occ.loc[occ["max_abs"].idxmax()] if len(occ) else None
    size = f" |h| up to {float(top['max_abs']):,.0f} in dim {int(top['dim'])}" if top is not None else " one"
    span = f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]} to {run[-1]}"
    # the mean variance of positions > 0, split into the massive tokens and the rest (a mean of squares)
    n_typ = n_rest - int(a["massive_rest"])
    per_token = (float(a["var_rest"]) * n_rest - float(a["var_rest_typical"]) * n_typ) / max(int(a["massive_rest"]), 1)
    share = 1.0 - float(a["var_rest_typical"]) * n_typ / (float(a["var_rest"]) * n_rest)
    line = (f"Massive activations at positions > 0 (Sun, Chen, Kolter, Liu 2024: |h| above {MASSIVE_MIN:g} and "
            f"{MASSIVE_RATIO:,.0f} times the median): at {span}, {k} of the {n_rest:,} tokens at positions > 0 "
            f"({who}) {'carries' if one else 'carry'} a massive activation,{size}. ")
    that = "that one token has" if one else f"these {k} tokens each have"
    part = (f"{that} a variance over the hidden dims of about {_sig(per_token)}, {100 * share:.0f}% of the mean "
            f"variance of positions > 0 at layer {run[0]}")
    if len(run) == 1:
        return line + part[0].upper() + part[1:] + "."
    r_var = float(b["var_rest"]) / float(a["var_rest"])
    r_norm = float(b["norm_rest"]) / float(a["norm_rest"])
    r_typ = float(b["var_rest_typical"]) / float(a["var_rest_typical"])
    if r_var < 0.5 * r_typ:
        lead = "This is why the variance curve of positions > 0 stays nearly flat while their norm grows: "
    else:
        lead = ""
        part = part[0].upper() + part[1:]
    return line + (
        f"{lead}{part}, so over {span} the mean goes only from {_sig(float(a['var_rest']))} to "
        f"{_sig(float(b['var_rest']))} (x{r_var:.1f}) while the mean norm goes from {_sig(float(a['norm_rest']))} to "
        f"{_sig(float(b['norm_rest']))} (x{r_norm:.1f}). Without {'it' if one else 'them'} the variance goes from "
        f"{_sig(float(a['var_rest_typical']))} to {_sig(float(b['var_rest_typical']))} (x{r_typ:.1f}): it grows "
        "with the norm, as the Curse of Depth says.")


def _sig(x: float, digits: int = 3) -> str:
    """``999339.2`` -> "999,000", ``33.52`` -> "33.5": three significant digits, thousands separated."""
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    r = round(x, digits - 1 - math.floor(math.log10(abs(x))))
    if abs(r) >= 10 ** (digits - 1):
        return f"{r:,.0f}"
    return f"{r:,.{max(0, digits - 1 - math.floor(math.log10(abs(r))))}f}"


def summary(layers: pd.DataFrame, blocks: pd.DataFrame, g: GrowthFit, base_loss: float | None,
            lns_loss: float | None, has_lns: bool, drop: dict[str, Any] | None, n_blocks: int, dropped: int,
            post_ln: bool, massive: pd.DataFrame, skip_scope: dict[str, Any] | None = None) -> list[str]:
    """The interpretation paragraphs of the depth page, in reading order."""
    out = [quotable_line(blocks, n_blocks)]
    e, last = layers["norm_rest"].iloc[0], layers["norm_rest"].iloc[-2]
    ratio = (layers["norm_pos0"] / layers["norm_rest"]).max()
    out.append(
        f"Variance growth: the mean L2 norm of the residual stream at ordinary positions goes from {e:.2f} at the "
        f"embeddings to {last:.1f} before the last block and {layers['norm_rest'].iloc[-1]:.1f} after it; position 0 "
        f"reaches up to {ratio:.0f}x that. Norm ~ (l+1)^{g.exponent:.2f} (R^2 {g.power_r2:.3f}) against "
        f"norm ~ exp({g.rate:.3f} l) (R^2 {g.exp_r2:.3f}): "
        + (f"the {g.better} fits better." if max(g.power_r2, g.exp_r2) >= 0.5 else "neither law fits (R^2 < 0.5).")
        + (" This model normalises after each sub-layer (post-LN), so its stream cannot grow with depth; the Curse "
           "of Depth (Sun et al. 2025) concerns Pre-LN models." if post_ln else
           " Sun et al. 2025 (Curse of Depth) show that in Pre-LN models this growth makes deep blocks "
           "near-identity.")
    )
    m = massive_line(layers, massive)
    if m is not None:
        out.append(m)
    if "skip_delta_loss" in blocks and blocks["skip_delta_loss"].notna().any():
        out.append(skip_line(blocks, base_loss, skip_scope))
    if drop is not None:
        out.append(
            f"Gromov et al.'s rule picks blocks {drop['start']}-{drop['end']} as the cheapest window of {drop['n']} "
            f"to drop (angular distance {drop['distance']:.3f} between its input and output); dropping them all "
            f"changes the loss by {drop['delta_loss']:+.3f} nats/token (Gromov et al. see little degradation "
            "until about half the layers of large models are removed)."
        )
    if has_lns:
        g2 = fit_growth(layers["point"], layers["lns_norm_rest"])
        loss_part = ""
        if lns_loss is not None and base_loss is not None:
            loss_part = f"; the loss goes from {base_loss:.3f} to {lns_loss:.3f} nats/token"
        out.append(
            "What-if, LayerNorm Scaling (Sun et al. 2025): each pre-norm output is multiplied by 1/sqrt(l) at "
            "inference. This model was NOT trained that way, so this shows how its blocks react, not what a "
            f"model trained with LayerNorm Scaling would do. The norm before the last block becomes "
            f"{layers['lns_norm_rest'].iloc[-2]:.1f} (exponent {g2.exponent:.2f}){loss_part}. Sun et al. report "
            "perplexities Pre-LN vs LNS for models trained from scratch: LLaMA-130M 26.73 vs 25.76, 1B 17.02 vs 15.71."
        )
    if dropped:
        out.append(f"{dropped} control sequences (random or repeated tokens) of the built-in text were left out; "
                   "--controls keeps them.")
    return out


def skip_scope_phrase(scope: dict[str, Any] | None) -> str:
    """Which tokens the skip losses were measured on: "all 2,048 tokens" or "512 of the 2,048 tokens (8 of 32
    sequences, spread over the text)"."""
    if not scope:
        return "this text"
    if scope["tokens"] >= scope["of_tokens"]:
        return f"all {scope['of_tokens']:,} tokens"
    return (f"{scope['tokens']:,} of the {scope['of_tokens']:,} tokens ({scope['sequences']} of "
            f"{scope['of_sequences']} sequences, spread over the text)")


def skip_line(blocks: pd.DataFrame, base_loss: float | None, scope: dict[str, Any] | None = None) -> str:
    """Layer effectiveness in one sentence, right for one block skipped as for many, and for either sign.

    ``scope`` (the analysis' ``skip_scope``): the tokens the losses were measured on and their own baseline."""
    sk = blocks.dropna(subset=["skip_delta_loss"])
    if scope is not None:
        base_loss = scope["baseline_loss"]
    base = f" from {base_loss:.3f}" if base_loss is not None else ""
    on = skip_scope_phrase(scope)
    se = sk["skip_delta_loss_se"] if "skip_delta_loss_se" in sk else pd.Series(dtype=float)
    se_part = (f"; standard error over the sequences {se.min():.3f}-{se.max():.3f} nats/token"
               if se.notna().any() else "")
    if len(sk) == 1:
        v, b = float(sk["skip_delta_loss"].iloc[0]), int(sk["block"].iloc[0])
        return (f"Layer effectiveness: skipping block {b} (identity) on {on} {'raises' if v >= 0 else 'lowers'} "
                f"the loss{base} by {abs(v):.3f} nats/token{se_part}.")
    w = sk.loc[sk["skip_delta_loss"].idxmax()]
    c = sk.loc[sk["skip_delta_loss"].idxmin()]
    which = f" ({block_list(sk['block'].tolist())})" if len(sk) <= 5 else ""
    line = (f"Layer effectiveness: skipping one block (identity) on {on} changes the loss{base} by "
            f"{sk['skip_delta_loss'].median():+.3f} nats/token at the median over the {len(sk)} blocks "
            f"skipped{which}; block {int(w['block'])} is the costliest ({w['skip_delta_loss']:+.3f})")
    n_help = int((sk["skip_delta_loss"] < 0).sum())
    if n_help:
        line += (f"; skipping lowers the loss for {n_help} of them (most for block {int(c['block'])}: "
                 f"{c['skip_delta_loss']:+.3f})")
    return line + se_part + "."
