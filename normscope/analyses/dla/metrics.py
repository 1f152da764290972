"""The pure metrics of ``normscope dla``: tensors in, numbers (or tensors of them) out; no hooks, no plotly.

* direct logit attribution with the cached final-norm scale and the true direct effect (:func:`dla_and_de`),
  and their normalised mean absolute error (:func:`nmae`): Elhage et al. 2021, "A Mathematical Framework for
  Transformer Circuits" (DLA); Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning"
  (arXiv:2409.13710); Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time"
  (arXiv:2507.02559, code ``submarat/removing-layer-norm``), whose NMAE this is;
* confidence (entropy) neurons (:func:`entropy_neuron_scores`, :func:`entropy_neuron_verdict`): Stolfo et al.
  2024, "Confidence Regulation Neurons in Language Models" (arXiv:2406.16254); Gurnee et al. 2024, "Universal
  Neurons in GPT2 Language Models".

Conventions: logits are raw (the unembedding is not centred over the vocabulary), every position that has a
next token is a prediction (not only the last one, as removing-layer-norm's NMAE takes), and the target is the
next token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ENTROPY_NEURON_MAX_CE_RATIO", "dla_and_de", "entropy", "head_dla_and_de", "entropy_neuron_scores",
           "entropy_neuron_verdict", "head_outputs", "next_token_targets", "nmae", "predicted_positions"]

ENTROPY_NEURON_MAX_CE_RATIO = 0.5
"""An entropy-neuron candidate whose mean-ablation moves the loss by at least this share of what it moves the
entropy (mean |delta CE| / mean |delta entropy|) fails the definition: an entropy neuron acts on the confidence
of the prediction, not on which token it favours (Stolfo et al. 2024)."""


def dla_and_de(comps: torch.Tensor, resid: torch.Tensor, u: torch.Tensor, *, centered: bool,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DLA (cached final-norm scale; Elhage et al. 2021, TransformerLens' ``logit_attrs``) and direct effect
    (final norm recomputed without the component; Heimersheim 2024, Baroni et al. 2025) of every component.

    comps: ``[C, N, d]`` component outputs at N predicted tokens; resid: ``[N, d]`` the final residual (input
    of the final norm); u: ``[N, d]`` gain * W_U[target] of each token's target. ``centered``/``eps``: the
    final norm (LayerNorm centres, RMSNorm not). Returns ``(dla, de)``, each ``[C, N]`` float64. Bias terms
    of the norm and of the unembedding cancel in the direct effect and are not part of any component's DLA.
    """
    c, r, uu = comps.double(), resid.double(), u.double()
    if centered:
        c = c - c.mean(dim=-1, keepdim=True)
        r = r - r.mean(dim=-1, keepdim=True)
    cu = torch.einsum("cnd,nd->cn", c, uu)  # [C, N]
    cr = torch.einsum("cnd,nd->cn", c, r)  # [C, N]
    cc = torch.einsum("cnd,cnd->cn", c, c)  # [C, N]
    return _dla_de_from_products(cu, cr, cc, r.pow(2).sum(dim=-1), (r * uu).sum(dim=-1), r.shape[-1], eps)


def _dla_de_from_products(cu: torch.Tensor, cr: torch.Tensor, cc: torch.Tensor, rr: torch.Tensor, ru: torch.Tensor,
                          d: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DLA and DE ``[C, N]`` from the dot products c.u, c.r, c.c ``[C, N]`` and r.r, r.u ``[N]`` (the
    component, residual and target-direction vectors never needed again)."""
    s = torch.sqrt(rr / d + eps)  # [N]
    s_without = torch.sqrt(((rr - 2 * cr + cc) / d).clamp_min(0) + eps)  # [C, N]: |r - c|^2 expanded
    return cu / s, ru / s - (ru - cu) / s_without


def head_dla_and_de(z: torch.Tensor, w_o: torch.Tensor, n_heads: int, resid: torch.Tensor, u: torch.Tensor, *,
                    centered: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dla_and_de` of every attention head, computed in d_head space: equal to
    ``dla_and_de(head_outputs(z, w_o, n_heads), resid, u, ...)`` without building the ``[heads, N, d]`` head
    outputs (at Llama-3-8B's 32 heads, 8,192 predictions and d = 4,096 that tensor is 8.6 GB in float64).

    With c_h = z_h W_O[h]: c_h.u = z_h.(W_O[h] u), c_h.r = z_h.(W_O[h] r) and c_h.c_h = z_h^T (W_O[h] W_O[h]^T) z_h;
    a centring final norm (LayerNorm) centres u and r, and subtracts d * mean(c_h)^2 = d * (z_h . W_O[h] 1 / d)^2
    from c_h.c_h. z: ``[N, n_heads * d_head]``; w_o: ``[n_heads * d_head, d]``; resid, u: ``[N, d]``.
    Returns ``(dla, de)``, each ``[n_heads, N]`` float64.
    """
    n, hd = z.shape
    d_head = hd // n_heads
    zh = z.double().reshape(n, n_heads, d_head)  # [N, H, d_head]
    wh = w_o.double().reshape(n_heads, d_head, -1)  # [H, d_head, d]
    r, uu = resid.double(), u.double()
    if centered:
        r = r - r.mean(dim=-1, keepdim=True)
        uu = uu - uu.mean(dim=-1, keepdim=True)
    d = r.shape[-1]
    cu = torch.einsum("nhe,nhe->hn", zh, torch.einsum("hed,nd->nhe", wh, uu))  # [H, N]
    cr = torch.einsum("nhe,nhe->hn", zh, torch.einsum("hed,nd->nhe", wh, r))  # [H, N]
    gram = torch.einsum("hed,hfd->hef", wh, wh)  # [H, d_head, d_head]
    cc = torch.einsum("nhe,hef,nhf->hn", zh, gram, zh)  # [H, N]
    if centered:
        mean_c = torch.einsum("nhe,he->hn", zh, wh.mean(dim=-1))  # [H, N] mean over d of c_h
        cc = cc - d * mean_c.pow(2)
    return _dla_de_from_products(cu, cr, cc, r.pow(2).sum(dim=-1), (r * uu).sum(dim=-1), d, eps)


def nmae(dla: torch.Tensor, de: torch.Tensor) -> float:
    """Normalised mean absolute error mean|DLA - DE| / mean|DE| x 100 (Baroni et al. 2025: a ratio of means),
    over tensors of any one shape (``[C, N]``: components x predictions); NaN when every DE is 0."""
    den = float(de.double().abs().mean())
    return 100.0 * float((dla.double() - de.double()).abs().mean()) / den if den > 0 else math.nan


def head_outputs(z: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What each attention head writes into the residual stream: z_h @ W_O[h] (output bias not included).

    z: ``[N, n_heads * d_head]`` the input of the attention output projection; w_o: ``[n_heads * d_head, d]``
    (x @ w_o is the projection). Returns ``[n_heads, N, d]``.
    """
    n, hd = z.shape
    d_head = hd // n_heads
    zh = z.reshape(n, n_heads, d_head)  # [N, H, d_head]
    wh = w_o.reshape(n_heads, d_head, -1)  # [H, d_head, d]
    return torch.einsum("nhe,hed->hnd", zh, wh.to(z.dtype))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: ``[..., vocab]`` -> ``[...]``; what confidence
    neurons regulate (Stolfo et al. 2024)."""
    lp = F.log_softmax(logits.float(), dim=-1)
    return -(lp.exp() * lp).sum(dim=-1)


def entropy_neuron_scores(w_out: torch.Tensor, w_u: torch.Tensor, gain: torch.Tensor | None = None,
                          centered: bool = False, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """||W_out[:, n]|| and the variance over the vocabulary of cos(W_out[:, n], W_U[v]) per neuron.

    w_out: ``[d, n_neurons]`` (column n is what neuron n writes); w_u: ``[vocab, d]`` unembedding rows; gain:
    ``[d]`` final-norm gain, folded into W_U as TransformerLens' fold_ln does; ``centered``: LayerNorm, so only
    the centred parts of both matter. Entropy neurons (Stolfo et al. 2024) have a large norm and a small
    variance: they write into directions the unembedding ignores. Returns ``(norm, var_cos)``, each ``[n]``.
    """
    wo = w_out.float()
    wu = w_u.float() * (gain.float()[None] if gain is not None else 1.0)  # [vocab, d]: float32 (a big matrix)
    if centered:
        wo = wo - wo.mean(dim=0, keepdim=True)
        wu = wu - wu.mean(dim=1, keepdim=True)
    norm = wo.norm(dim=0)  # [n]
    wu_n = wu / wu.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [vocab, d]
    var = torch.empty(wo.shape[1], dtype=torch.float32)
    for s in range(0, wo.shape[1], chunk):
        cols = wo[:, s:s + chunk]  # [d, c]
        cos = wu_n @ (cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-30))  # [vocab, c]
        var[s:s + chunk] = cos.var(dim=0, unbiased=False)
    return norm, var


def final_logits(x: torch.Tensor, *, gain: torch.Tensor, w_u: torch.Tensor, centered: bool, eps: float,
                 bias: torch.Tensor | None = None, u_bias: torch.Tensor | None = None,
                 chunk: int = 32768) -> torch.Tensor:
    """The logits of final residuals ``x`` ``[N, d]``, through the final norm and the unembedding, in float32
    whatever the model's dtype: ``(norm(x) * gain + bias) @ W_U.T + u_bias`` with norm the RMS (or, ``centered``,
    the LayerNorm) normalization with ``eps``. W_U ``[vocab, d]`` is upcast ``chunk`` rows at a time, so no
    float32 copy of it stays in memory. Returns ``[N, vocab]`` float32.

    The mean-ablation of an entropy neuron changes a logit by far less than bfloat16's spacing at that logit's
    size (2^-8 of it): the model's own bf16 norm and matmul would bury the change in rounding noise."""
    x = x.float()
    if centered:
        x = x - x.mean(dim=-1, keepdim=True)
    y = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * gain.float().to(x.device)  # [N, d]
    if bias is not None:
        y = y + bias.float().to(x.device)
    out = torch.cat([y @ w_u[s:s + chunk].to(x.device).float().T for s in range(0, w_u.shape[0], chunk)], dim=-1)
    return out + u_bias.float().to(x.device) if u_bias is not None else out  # [N, vocab]


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that predict a next token and their targets: ``sel`` ``[batch, pos]`` bool (the last position and
    padding excluded) and ``tgt`` ``[N]``, the next token of each selected position."""
    sel = torch.zeros_like(mask, dtype=torch.bool)
    sel[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    return sel, nxt[sel]


def predicted_positions(sel: torch.Tensor) -> torch.Tensor:
    """The position of each selected token: ``sel`` ``[batch, pos]`` bool -> ``[N]``."""
    return torch.arange(sel.shape[1], device=sel.device).expand_as(sel)[sel]


def entropy_neuron_verdict(mean_abs_delta_ce: float, mean_abs_delta_entropy: float,
                           max_ratio: float = ENTROPY_NEURON_MAX_CE_RATIO) -> tuple[float, bool]:
    """Whether a mean-ablated entropy-neuron candidate fails the definition (Stolfo et al. 2024).

    An entropy neuron changes the entropy of the prediction much more than the loss: it writes into directions
    the unembedding ignores and acts through the final norm's scale. A candidate ranked high by its weights
    (||W_out|| / var cos(W_out, W_U)) whose ablation moves the loss about as much as the entropy does something
    else, whatever its weights say. Returns ``(ratio, fails)`` with ratio = mean |delta CE| / mean |delta entropy|
    (inf when the entropy does not move but the loss does, NaN when neither moves) and ``fails`` = ratio >=
    ``max_ratio`` (False for NaN: nothing moved, nothing to judge).
    """
    if mean_abs_delta_entropy > 0:
        ratio = mean_abs_delta_ce / mean_abs_delta_entropy
    else:
        ratio = math.inf if mean_abs_delta_ce > 0 else math.nan
    return ratio, bool(ratio >= max_ratio)  # NaN >= x is False
