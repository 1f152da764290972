"""DLA and DE through TransformerLens' ``TransformerBridge``, as a TransformerLens user computes them
(``stack_head_results``, ``decompose_resid``, ``logit_attrs`` with the cached ``ln_final.hook_scale``), on its
own deep copy of the model (the bridge rewrites the model it wraps). Every run checks its first micro-batch
against normscope's own hooks (:mod:`.direct`) and falls back to them when the two disagree.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from normscope.analyses.dla.direct import direct_attributions
from normscope.analyses.dla.metrics import dla_and_de, next_token_targets, predicted_positions
from normscope.analyses.dla.options import DlaOptions
from normscope.analyses.dla.plan import Plan
from normscope.analyses.dla.reducers import AttributionStats, Totals
from normscope.core.nonfinite import note_nonfinite

__all__ = ["BRIDGE_TOLERANCE", "auto_skips_bridge", "boot_bridge", "bridge_attributions", "bridge_tolerance",
           "crosscheck_direct", "run_bridge"]

BRIDGE_TOLERANCE = 1e-3  # largest relative difference between the bridge and the model that is accepted (fp32)


def bridge_tolerance(dtype: torch.dtype) -> float:
    """The accepted relative difference for a model in ``dtype``: ``BRIDGE_TOLERANCE`` in float32, four
    roundings of the format in half precision (bfloat16's 2^-7 would fail a 1e-3 check on every model, since the
    bridge and the model round their sums in different orders)."""
    return max(BRIDGE_TOLERANCE, 4 * torch.finfo(dtype).eps) if dtype in (torch.bfloat16, torch.float16) \
        else BRIDGE_TOLERANCE


def auto_skips_bridge(model: torch.nn.Module, free_bytes: int | None) -> str | None:
    """Why ``--backend auto`` goes straight to normscope's own hooks, or None to try the bridge: the bridge needs a
    deep copy of the model (its own weights to fold), which must fit in the free memory with room for a pass, and
    in half precision it is not the reference the own hooks are checked against but a second rounding of them."""
    param = next(model.parameters())
    if param.dtype in (torch.bfloat16, torch.float16):
        return (f"the model is in {str(param.dtype).removeprefix('torch.')}, where TransformerLens' bridge only "
                "rounds differently from the model (--backend bridge to use it anyway)")
    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if free_bytes is not None and 2 * size > free_bytes:
        return (f"TransformerLens' bridge needs its own copy of the model ({size / 2**30:.1f} GiB), which does not "
                f"fit twice in the {free_bytes / 2**30:.1f} GiB free (--backend bridge to try it anyway)")
    return None


def crosscheck_direct(lm: Any, plan: Plan, ids: torch.Tensor, mask: torch.Tensor,
                      bridge_res: dict[str, Any]) -> dict[str, Any]:
    """Largest differences between the bridge's logits and DLA and the model's own on one batch.

    ``agrees`` is False when either differs by more than :func:`bridge_tolerance` of its largest magnitude.
    """
    d = direct_attributions(lm, plan, ids, mask)
    max_dla = float(d["dla"].abs().max()) or 1.0
    max_logit = float(d["logits"].abs().max()) or 1.0
    out: dict[str, Any] = {
        "max_abs_dla_diff": float((d["dla"] - bridge_res["dla"]).abs().max()),
        "max_abs_de_diff": float((d["de"] - bridge_res["de"]).abs().max()),
        "max_abs_dla": max_dla,
        "max_abs_logit_diff": float((d["logits"].float() - bridge_res["logits"].float()).abs().max()),
        "max_abs_logit": max_logit,
        "tokens": int(bridge_res["sel"].sum()),
    }
    tol = bridge_tolerance(next(lm.model.parameters()).dtype)
    out["tolerance"] = tol
    out["agrees"] = out["max_abs_dla_diff"] <= tol * max_dla and out["max_abs_logit_diff"] <= tol * max_logit
    return out


def boot_bridge(lm: Any) -> Any:
    """A TransformerLens ``TransformerBridge`` around a deep copy of the model (the bridge rewrites the model it
    wraps), with only the final norm's gain folded into W_U: ``fold_ln`` without centring the writing weights
    or the unembedding, so that the residual stream, the cached scales and the raw logits stay as they are."""
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (registers boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge

    own = copy.deepcopy(lm.model)
    # The bridge reloads a tokenizer from its name_or_path unless it already adds BOS; token ids go in directly
    # here, so a copy marked that way keeps it off the disk and the hub (and works for in-memory tokenizers).
    tok = copy.deepcopy(lm.tokenizer)
    tok.init_kwargs = {**tok.init_kwargs, "add_bos_token": True,
                       "name_or_path": tok.init_kwargs.get("name_or_path", "")}
    name = getattr(lm.model.config, "_name_or_path", "") or lm.info.name
    param = next(lm.model.parameters())
    bridge = TransformerBridge.boot_transformers(name, hf_model=own, tokenizer=tok, device=str(param.device),
                                                 dtype=param.dtype)
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    bridge.eval()
    return bridge


def bridge_attributions(bridge: Any, ids: torch.Tensor, mask: torch.Tensor, plan: Plan,
                        act_hook: str | None = None, nonfinite: dict[str, dict[str, Any]] | None = None,
                        batch: int = 0) -> dict[str, Any]:
    """DLA of every head and MLP layer as a TransformerLens user computes it, and the DE from the same cache.

    Uses the ActivationCache helpers: ``stack_head_results`` (per-head outputs from hook_z and W_O),
    ``decompose_resid(mode="mlp")`` (MLP outputs), ``logit_attrs`` (``apply_ln_to_stack`` with the cached
    ``ln_final.hook_scale``, dotted with the gain-folded W_U). Returns ``dla``/``de`` ``[C, N]`` (components
    layer by layer: heads, then the MLP), ``sel``/``tgt`` (predicted positions and their targets), ``logits``
    ``[N, vocab]`` and, when ``act_hook`` names a cached hook, ``acts`` ``[batch, pos, n_neurons]``. When
    ``nonfinite`` is given, the inf/NaN values of every cached activation are counted into it (see
    :func:`note_nonfinite`; ``batch`` is the batch number recorded for a point's first one).
    """
    n_layers, n_heads = plan.layout.n_layers, plan.n_heads
    wanted = ("attn.hook_z", "hook_mlp_out", "ln_final.hook_scale", "ln_final.hook_in", "hook_embed")

    def names_filter(name: str) -> bool:
        return name.endswith(wanted) or name == act_hook

    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, names_filter=names_filter)
        heads = cache.stack_head_results(layer=-1)  # [L*H, batch, pos, d]
        mlps = cache.decompose_resid(mode="mlp", incl_embeds=False)  # [L, batch, pos, d]
        b, t = ids.shape
        stack = torch.cat([heads.reshape(n_layers, n_heads, b, t, -1), mlps[:, None]], dim=1)  # [L, H+1, b, t, d]
        stack = stack.reshape(n_layers * (n_heads + 1), b, t, -1)
        del heads, mlps
        nxt = ids[:, 1:]
        # float64, one layer at a time: the same component values then give DLA and DE to float64 precision
        dla_grid = torch.cat([cache.logit_attrs(stack[s:s + n_heads + 1, :, :-1].double(), tokens=nxt,
                                                pos_slice=slice(0, -1))
                              for s in range(0, stack.shape[0], n_heads + 1)])  # [C, b, t-1]
        sel, tgt = next_token_targets(ids, mask)
        r = cache["ln_final.hook_in"][sel]  # [N, d]
        u = plan.gain.to(r.device)[None] * plan.w_u[tgt].to(r.device).float()
        de = torch.empty(stack.shape[0], r.shape[0], dtype=torch.float64)
        for s in range(0, stack.shape[0], n_heads + 1):
            _, de[s:s + n_heads + 1] = dla_and_de(stack[s:s + n_heads + 1][:, sel], r, u,
                                                  centered=plan.final.centered, eps=plan.final.eps)
        out: dict[str, Any] = {"dla": dla_grid[:, sel[:, :-1]].double().cpu(), "de": de, "sel": sel, "tgt": tgt,
                               "logits": logits[sel]}
        if nonfinite is not None:
            for name, x in cache.cache_dict.items():
                note_nonfinite(nonfinite, name, x, batch)
        if act_hook is not None and act_hook in cache.cache_dict:
            out["acts"] = cache[act_hook]
    return out


def run_bridge(bridge: Any, lm: Any, plan: Plan, sample: Any, stats: AttributionStats, totals: Totals,
                top: list[int], opts: DlaOptions, advance: Any,
                nonfinite: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, float], bool]:
    """Attributions with the bridge over the sample, in micro-batches of ``opts.micro_batch_tokens``.

    The first micro-batch also runs through normscope's own hooks: when the bridge's logits or DLA disagree
    with the model's (relative difference above ``BRIDGE_TOLERANCE``, e.g. a norm whose eps differs from the
    config's, which the bridge reads), backend ``auto`` stops and returns ``(crosscheck, False)`` so that the
    caller falls back to the direct computation. Returns ``(crosscheck, accepted)``. Every cached activation is
    checked for inf/NaN into ``nonfinite`` (by TransformerLens hook name, as :func:`note_nonfinite` records them).
    """
    dev = next(lm.model.parameters()).device
    act_hook = f"blocks.{plan.layout.n_layers - 1}.mlp.out.hook_in" if top else None
    cross: dict[str, float] = {}
    for bi, b in enumerate(sample.iter_batches()):
        step = max(1, opts.micro_batch_tokens // b.input_ids.shape[1])
        for s in range(0, b.input_ids.shape[0], step):
            ids = b.input_ids[s:s + step].to(dev)
            mask = b.attention_mask[s:s + step].to(dev)
            res = bridge_attributions(bridge, ids, mask, plan, act_hook, nonfinite, bi)
            if bi == 0 and s == 0:
                cross = crosscheck_direct(lm, plan, ids, mask, res)
                if not cross["agrees"] and opts.backend == "auto":
                    return cross, False
            pos = predicted_positions(res["sel"])
            stats.add(res["dla"], res["de"], pos)
            stats.sample(res["dla"], res["de"], pos)
            totals.add_logits(res["logits"], res["tgt"])
            if top and "acts" in res:
                totals.add_acts(res["acts"][..., top], mask)
        if advance:
            advance(int(b.input_ids.numel()))
    return cross, True
