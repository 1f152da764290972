"""Pre-LN -> Pre-RMSNorm (and Pre-CRMSNorm), exactly: Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm
Transformers: Equivalent and Efficient Pre-LN Transformers" (NeurIPS 2023, arXiv:2305.14858; code
``ZixuanJiang/pre-rmsnorm-transformer``).

The identity: ``LN(x) = RMSNorm(x - mean(x))``, eps included, because ``var(x) = mean((x - mean x)^2)``. When
every module that writes the residual stream writes a zero-mean vector, the stream has mean zero at every
position and depth, and each LayerNorm computes exactly what an RMSNorm with the same eps computes. The steps
(TransformerLens' ``fold_ln`` and ``center_writing_weights`` do the first two):

1. fold each LN's gain ``w`` and bias ``b`` into the linears that read its output, ``W' = W diag(w)``,
   ``c' = c + W b``; the final LN folds into the unembedding, which gains the bias ``W_U b``. That bias is a
   per-vocabulary logit offset, the same at every position: it changes raw logits *and* the softmax (unless all
   its entries are equal), so it is kept as a bias, never dropped;
2. untie the unembedding from the token embedding (it keeps its own copy), then centre every writer along
   d_model: token and position embeddings, attention output and MLP output projections, weights and biases.
   LN is shift invariant, so centring alone changes no output;
3. replace each LN by an RMSNorm with the same eps and a unit gain.

CRMSNorm (the paper's compressed variant): a zero-mean vector is fixed by d-1 of its coordinates, so the
stream keeps only the first d-1 (writers lose their last output row, embeddings their last column), readers
fold the decompression ``x_d = -sum(x_1..x_{d-1})`` into their weights (``W' = W[:, :d-1] - W[:, d-1]``), and
CRMSNorm divides by ``sqrt((||x||^2 + (sum x)^2) / d + eps)``: the RMS of the full vector.

Discovery is structural, never by architecture name. One probe forward pass records the input and output of
every linear, embedding, norm and block: a norm's readers are the linears whose input *is* its output; block
i's writers are its other linears with a d_model output, accepted only when the block's output equals its
input plus their outputs; the embeddings must likewise sum to the first block's input. What does not fit is
refused in one line (:func:`refusal`, :func:`find_plan`). The functions here change the model they are given:
pass a copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.sites import ModelLayout, NormSite, is_norm_module

TARGETS = ("rmsnorm", "crmsnorm")


class CRMSNorm(nn.Module):
    """Compressed RMSNorm (Jiang et al. 2023, eq. 9): the input holds the first d-1 coordinates of a zero-mean
    vector of size d; the RMS of the full vector is ``sqrt((||x||^2 + (sum x)^2) / d)``."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., d_model - 1]
        xf = x.float()
        ms = (xf.pow(2).sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).pow(2)) / self.d_model  # [..., 1]
        return (xf * torch.rsqrt(ms + self.eps)).to(x.dtype) * self.weight


@dataclass
class NormPlan:
    """One LayerNorm of the model and the linears that read its output."""

    name: str  # canonical site name, e.g. "blocks.3.ln1"
    path: str  # module path, e.g. "transformer.h.3.ln_1"
    role: str
    eps: float
    dim: int
    readers: list[str]  # module paths of the linears whose input is this norm's output


@dataclass
class RewritePlan:
    """Everything the rewrite changes, found by :func:`find_plan`; JSON-ready (the export's manifest holds it)."""

    d_model: int
    norms: list[NormPlan]
    writers: list[str]  # linears whose output is added to the residual stream (per block, in order)
    embeddings: list[str]  # embeddings summed into the stream before the first block
    unembed: str  # the unembedding's module path (a reader of the final norm)
    tied: bool  # the unembedding shared its weight with the token embedding
    parallel_blocks: list[int] = field(default_factory=list)  # blocks whose attention and MLP read one input

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewritePlan:
        return cls(**{**d, "norms": [NormPlan(**n) for n in d["norms"]]})


# ---- refusal, before any surgery ---------------------------------------------------------------------------
def refusal(layout: ModelLayout, sites: list[NormSite], name: str) -> str | None:
    """One sentence saying why ``name`` cannot be rewritten exactly, or None when it can (so far as the norm
    sites tell: :func:`find_plan` checks the data flow)."""
    rms = [s.name for s in sites if s.kind == "rmsnorm"]
    if rms and len(rms) == len(sites):
        return (f"{name} already uses RMSNorm at every norm site ({len(rms)}, e.g. {rms[0]}): there is no LayerNorm "
                "to rewrite; give a Pre-LN model such as GPT-2, OPT or Pythia.")
    if rms:
        return (f"{name} mixes RMSNorm ({rms[0]}) and LayerNorm sites; the rewrite needs every site to be a "
                "LayerNorm.")
    post = [s.name for s in sites if s.role in ("post_attn", "post_mlp")]
    if post:
        return (f"{name} is a Post-LN model: the residual stream itself passes through {post[0]}, so its mean is not "
                "the sum of what the writers write and LN(x) = RMSNorm(x) cannot be made to hold; the rewrite needs "
                "a Pre-LN model (GPT-2, OPT-125m and larger, Pythia).")
    emb = [s.name for s in sites if s.role == "embedding"]
    if emb:
        return (f"{name} normalises its embeddings ({emb[0]}) before the first block, so the stream does not start "
                "as a sum of centrable writers; the rewrite needs plain Pre-LN embeddings.")
    odd = [s for s in sites if s.role not in ("pre_attn", "pre_mlp", "final")]
    if odd:
        return (f"{odd[0].name} of {name} is a {odd[0].role} norm, which does not read the residual stream; the "
                "rewrite handles Pre-LN models whose norms all feed attention, MLP or the unembedding.")
    if not layout.is_causal or layout.unembed is None:
        return f"{name} has no unembedding to verify on; the rewrite checks a causal LM's own logits."
    if layout.final_norm is None:
        return (f"{name} has no final norm before the unembedding, so centring the stream would change the logits; "
                "the rewrite needs a final LayerNorm.")
    return None


# ---- the probe pass ---------------------------------------------------------------------------------------
@dataclass
class _Record:
    inp: torch.Tensor | None
    out: torch.Tensor | None


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: the same map with the weight stored ``[in, out]``)."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _first(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _probe(model: nn.Module, paths: list[str], seq: int = 6) -> dict[str, _Record]:
    """One forward pass on a ``[1, seq]`` input; the first call's input and output of each module in ``paths``."""
    rec: dict[str, _Record] = {}

    def hook(path: str) -> Any:
        def fn(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if path not in rec:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
                y = _first(out)
                rec[path] = _Record(None if x is None else x.detach().clone(),
                                    None if y is None else y.detach().clone())
        return fn

    embed: Any = model.get_input_embeddings()  # type: ignore[operator]
    vocab = int(embed.weight.shape[0])
    ids = (torch.tensor([[5, 17, 23, 42, 61, 7, 11, 13][:seq]]) % vocab).to(embed.weight.device)  # [1, seq]
    handles = [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return rec


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _sums_to(total: torch.Tensor | None, parts: list[torch.Tensor]) -> bool:
    if total is None or not parts:
        return False
    try:
        s = sum((p.double() for p in parts), torch.zeros((), dtype=torch.float64, device=total.device))
        s = torch.broadcast_to(s, total.shape)
    except RuntimeError:
        return False
    scale = float(total.double().abs().max()) + 1e-30
    return bool((s - total.double()).abs().max() <= 1e-5 * scale)


def find_plan(model: nn.Module, layout: ModelLayout, sites: list[NormSite], name: str) -> RewritePlan:
    """The readers of every norm, the writers of the residual stream and the embeddings, from one probe pass;
    a :class:`NormscopeError` naming the first thing that does not fit."""
    why = refusal(layout, sites, name)
    if why:
        raise NormscopeError(why)
    paths = {m: p for p, m in model.named_modules() if p}
    blocks = [b.path for b in layout.blocks]
    linears = [p for p, m in model.named_modules() if p and is_linear(m)]
    embeds = [p for p, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim == layout.d_model
              and not any(p.startswith(b + ".") for b in blocks)]
    rec = _probe(model, list(dict.fromkeys([*linears, *embeds, *blocks, *(s.path for s in sites)])))
    norms: list[NormPlan] = []
    read: set[str] = set()
    for s in sites:
        readers = [p for p in linears if p in rec and _same(rec[p].inp, rec[s.path].out if s.path in rec else None)]
        if not readers:
            raise NormscopeError(f"No linear layer reads the output of {s.name} ({s.path}) directly, so its gain and "
                                 f"bias cannot be folded; {name} is not a Pre-LN layout the rewrite knows.")
        norms.append(NormPlan(s.name, s.path, s.role, float(s.eps), int(s.dim or layout.d_model), readers))
        read.update(readers)
    unembed = paths.get(layout.unembed) if layout.unembed is not None else None
    final = next(n for n in norms if n.role == "final")
    if unembed is None or unembed not in final.readers:
        raise NormscopeError(f"The unembedding of {name} does not read {final.name} directly; the rewrite cannot fold "
                             "the final norm into it.")
    writers: list[str] = []
    for b in layout.blocks:
        cand = [p for p in linears if p.startswith(b.path + ".") and p not in read and p in rec
                and rec[p].out is not None and rec[p].out.shape[-1] == layout.d_model]  # type: ignore[union-attr]
        r = rec.get(b.path)
        outs = [rec[p].out for p in cand]
        delta = None if r is None or r.inp is None or r.out is None else r.out - r.inp  # [1, seq, d_model]
        if not _sums_to(delta, [o for o in outs if o is not None]):
            raise NormscopeError(f"Block {b.index} of {name}: its output is not its input plus the outputs of "
                                 f"{', '.join(cand) or 'any linear layer'}, so the writers of the residual stream "
                                 "cannot be centred exactly.")
        writers += cand
    first = rec.get(blocks[0])
    ran = [p for p in embeds if p in rec and rec[p].out is not None]
    if first is None or not _sums_to(first.inp, [rec[p].out for p in ran]):  # type: ignore[misc]
        raise NormscopeError(f"The first block of {name} does not read the plain sum of its embeddings "
                             f"({', '.join(ran) or 'none found'}): something (a projection, a scale) sits between "
                             "them, which the rewrite does not handle.")
    embed_w = getattr(layout.embed, "weight", None)
    tied = embed_w is not None and getattr(layout.unembed, "weight", None) is embed_w
    parallel = []  # blocks whose two norms read one input: attention and MLP side by side (Pythia, GPT-J)
    for b in layout.blocks:
        inside = [n.path for n in norms if n.path.startswith(b.path + ".")]
        if len(inside) == 2 and _same(rec[inside[0]].inp, rec[inside[1]].inp):
            parallel.append(b.index)
    return RewritePlan(layout.d_model, norms, writers, ran, unembed, tied, parallel)


# ---- the three steps -------------------------------------------------------------------------------------
def _out_in(mod: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view: Conv1D stores ``[in, out]``)."""
    w: torch.Tensor = mod.weight  # type: ignore[assignment]
    return w.t() if type(mod).__name__ == "Conv1D" else w


def _set_out_in(mod: nn.Module, w: torch.Tensor) -> None:
    """Replace the weight by ``w`` (``[out, in]``), updating the layer's size attributes."""
    stored = w.t().contiguous() if type(mod).__name__ == "Conv1D" else w.contiguous()
    old: torch.Tensor = mod.weight  # type: ignore[assignment]
    mod.weight = nn.Parameter(stored.to(old.dtype), requires_grad=old.requires_grad)
    out_f, in_f = w.shape
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = out_f, in_f
    else:  # Conv1D
        conv: Any = mod
        conv.nf, conv.nx = out_f, in_f


def _set_bias(mod: nn.Module, b: torch.Tensor) -> None:
    old = getattr(mod, "bias", None)
    ref: torch.Tensor = mod.weight  # type: ignore[assignment]
    mod.bias = nn.Parameter(b.to(ref.dtype).contiguous(), requires_grad=ref.requires_grad)
    del old


def fold_into_reader(mod: nn.Module, gain: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """``W' = W diag(gain)``, ``c' = c + W bias`` on a linear reading a norm's output; True when the layer had
    no bias and got one. Computed in float64. gain, bias: ``[d]``."""
    w = _out_in(mod).double()  # [out, d]
    b0 = getattr(mod, "bias", None)
    added = False
    if bias is not None:
        c = (b0.double() if b0 is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
        _set_bias(mod, c + w @ bias.double())  # [out]
        added = b0 is None
    if gain is not None:
        _set_out_in(mod, w * gain.double()[None, :])
    return added


def centre_writer(mod: nn.Module) -> None:
    """Remove the mean along d_model from what a linear or an embedding writes (weight and bias)."""
    with torch.no_grad():
        if isinstance(mod, nn.Embedding):
            w = mod.weight.double()  # [vocab, d]
            mod.weight.copy_(w - w.mean(-1, keepdim=True))
            return
        w = _out_in(mod).double()  # [d, in]
        _set_out_in(mod, w - w.mean(0, keepdim=True))
        b = getattr(mod, "bias", None)
        if b is not None:
            _set_bias(mod, b.double() - b.double().mean())


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def untie(model: nn.Module, plan: RewritePlan) -> None:
    """Give the unembedding its own weight (so that centring the token embedding leaves it alone)."""
    head: Any = model.get_submodule(plan.unembed)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=bool(head.weight.requires_grad))
    cfg: Any = getattr(model, "config", None)
    if cfg is not None:
        cfg.tie_word_embeddings = False
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        text.tie_word_embeddings = False


@dataclass
class RewriteLog:
    """What :func:`rewrite` changed, for the page."""

    folded: list[dict[str, Any]] = field(default_factory=list)  # per norm: gain/bias ranges, readers
    biases_added: list[str] = field(default_factory=list)
    centred: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    untied: bool = False
    logit_offset_max: float = 0.0  # max |W_U b| of the final norm's folded bias
    logit_offset_spread: float = 0.0  # its max - min over the vocabulary (0: softmax unchanged)


def rewrite(model: nn.Module, plan: RewritePlan) -> RewriteLog:
    """Pre-LN -> Pre-RMSNorm in place: fold, untie, centre, swap (see the module docstring)."""
    log = RewriteLog()
    with torch.no_grad():
        for n in plan.norms:
            ln = model.get_submodule(n.path)
            gain, bias = getattr(ln, "weight", None), getattr(ln, "bias", None)
            for r in n.readers:
                if fold_into_reader(model.get_submodule(r), gain, bias):
                    log.biases_added.append(r)
            row: dict[str, Any] = {"site": n.name, "path": n.path, "eps": n.eps, "readers": ", ".join(n.readers)}
            if gain is not None:
                row |= {"gain_min": float(gain.min()), "gain_max": float(gain.max())}
            if bias is not None:
                row |= {"bias_abs_max": float(bias.abs().max())}
            log.folded.append(row)
        head_bias = getattr(model.get_submodule(plan.unembed), "bias", None)
        if head_bias is not None and plan.unembed in log.biases_added:
            log.logit_offset_max = float(head_bias.abs().max())
            log.logit_offset_spread = float(head_bias.max() - head_bias.min())
        if plan.tied:
            untie(model, plan)
            log.untied = True
        for p in [*plan.embeddings, *plan.writers]:
            centre_writer(model.get_submodule(p))
            log.centred.append(p)
        for n in plan.norms:
            old = model.get_submodule(n.path)
            ref = next(itertools.chain(old.parameters(), model.parameters()))
            _replace(model, n.path, nn.RMSNorm(n.dim, eps=n.eps, elementwise_affine=True,
                                               device=ref.device, dtype=ref.dtype))
            log.swapped.append(n.path)
    return log


def compress(model: nn.Module, plan: RewritePlan) -> None:
    """Pre-RMSNorm -> Pre-CRMSNorm in place (after :func:`rewrite`): the stream keeps d-1 coordinates."""
    d = plan.d_model
    with torch.no_grad():
        for p in plan.embeddings:
            emb = model.get_submodule(p)
            assert isinstance(emb, nn.Embedding)
            emb.weight = nn.Parameter(emb.weight[:, : d - 1].contiguous(), requires_grad=emb.weight.requires_grad)
            emb.embedding_dim = d - 1
        for p in plan.writers:
            mod = model.get_submodule(p)
            w = _out_in(mod)  # [d, in]
            _set_out_in(mod, w[: d - 1].clone())
            b = getattr(mod, "bias", None)
            if b is not None:
                _set_bias(mod, b[: d - 1].clone())
        for n in plan.norms:
            for r in n.readers:
                mod = model.get_submodule(r)
                w = _out_in(mod)  # [out, d]: x_d = -sum(x_1..x_{d-1}) folded in
                _set_out_in(mod, (w[:, : d - 1].double() - w[:, d - 1:].double()))
            old = model.get_submodule(n.path)
            ref = next(itertools.chain(old.parameters(), model.parameters()))
            _replace(model, n.path, CRMSNorm(d, n.eps).to(device=ref.device, dtype=ref.dtype))


def norm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The norm modules left in ``model`` (for checks: after a rewrite none is an nn.LayerNorm)."""
    for p, m in model.named_modules():
        if p and (is_norm_module(m) or isinstance(m, CRMSNorm)):
            yield p, m
