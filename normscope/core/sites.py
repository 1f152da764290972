"""Norm-site discovery: every normalization module of a transformers model, named in TransformerLens style.

Detection is by class (``nn.LayerNorm``, ``nn.RMSNorm`` and model-specific norm classes such as
``LlamaRMSNorm``, Gemma's ``1 + w`` RMSNorm, ``T5LayerNorm``), never by architecture name. The role of a
site comes from its module path and from where it sits in its block's forward order.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.markup import escape
from rich.table import Table
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.placement import input_device

Role = Literal["pre_attn", "pre_mlp", "post_attn", "post_mlp", "qk_norm", "final", "embedding", "other"]
Kind = Literal["layernorm", "rmsnorm"]


@dataclass
class NormSite:
    """One normalization module and what it does.

    ``name`` is canonical, TransformerLens style: ``blocks.3.ln1`` (pre-attention), ``blocks.3.ln2``
    (pre-MLP), ``blocks.3.ln1_post`` / ``blocks.3.ln2_post`` (post-attention / post-MLP, as in sandwich
    norms and post-LN encoders), ``blocks.3.attn.q_norm`` / ``blocks.3.attn.k_norm``, ``ln_final``,
    ``embed.ln``.
    """

    name: str
    layer: int | None
    role: Role
    kind: Kind
    centered: bool  # subtracts the mean (LayerNorm) or not (RMSNorm)
    eps: float
    gain_offset: float  # 1.0 for Gemma-style ``x * (1 + w)`` gains, else 0.0
    has_gain: bool
    has_bias: bool
    path: str  # dotted module path inside the model, e.g. "model.layers.3.input_layernorm"
    module: nn.Module = field(repr=False, compare=False)
    dim: int | None = None  # size of the normalized last dim (d_model, or head_dim for qk-norms)

    def divisor(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token divisor the site applies: std (LayerNorm) or RMS (RMSNorm), eps included.

        x: ``[..., d]`` the site's input; returns ``[..., 1]`` in float32.
        """
        return norm_divisor(x, centered=self.centered, eps=self.eps)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description (without the module)."""
        return {
            "name": self.name,
            "layer": self.layer,
            "role": self.role,
            "kind": self.kind,
            "centered": self.centered,
            "eps": self.eps,
            "gain_offset": self.gain_offset,
            "has_gain": self.has_gain,
            "has_bias": self.has_bias,
            "path": self.path,
            "dim": self.dim,
            "class": type(self.module).__name__,
        }


def norm_divisor(x: torch.Tensor, *, centered: bool, eps: float) -> torch.Tensor:
    """sqrt(var(x) + eps) for LayerNorm (centered) or sqrt(mean(x^2) + eps) for RMSNorm, over the last dim.

    x: ``[..., d]``; returns ``[..., 1]`` float32.
    """
    x = x.float()
    if centered:
        x = x - x.mean(dim=-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


# ---- detection by class ---------------------------------------------------------------------------------
_NOT_TOKEN_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                    nn.LocalResponseNorm)
_NOT_TOKEN_NAMES = ("batchnorm", "groupnorm", "instancenorm", "weightnorm", "spectralnorm")


def batch_statistics_norms(model: nn.Module) -> list[tuple[str, str]]:
    """(module path, class) of every BatchNorm, GroupNorm, InstanceNorm or LocalResponseNorm in ``model``.

    These normalise over the batch or over channel groups, not over each token's hidden vector, so normscope
    recognises them but analyses none of them (PowerNorm, Unified Normalization, AdaB2N and test-time BN
    calibration are about these)."""
    return [(path, type(m).__name__) for path, m in model.named_modules() if isinstance(m, _NOT_TOKEN_NORMS)]


def _eps_of(module: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if isinstance(module, nn.RMSNorm):  # eps=None means torch.finfo(dtype).eps
        w = module.weight
        return float(torch.finfo(w.dtype if w is not None else torch.get_default_dtype()).eps)
    return None


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a per-token normalization, judged by its class and attributes only.

    ``nn.LayerNorm`` and ``nn.RMSNorm`` (and subclasses) are; so is any class whose name contains ``Norm``
    and that has an eps attribute (``eps``, ``variance_epsilon`` or ``epsilon``) and a 1-D ``weight`` or no
    weight at all. Batch, group, instance, weight and spectral norms are not token norms and are excluded.
    """
    if isinstance(module, _NOT_TOKEN_NORMS):
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__.lower()
    if "norm" not in name or any(s in name for s in _NOT_TOKEN_NAMES):
        return False
    w = getattr(module, "weight", None)
    return _eps_of(module) is not None and (w is None or (isinstance(w, torch.Tensor) and w.dim() == 1))


def _detached_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with real weights and no hooks: under ``--device-map`` an offloaded norm's weights are
    on the meta device (its accelerate hook loads them for each call, and would undo the probe's edits), and an
    exact-BOS LN-free export's norms carry a forward hook that rescales position 0 (core/lnfree.py), which would
    make the probe's output differ from the arithmetic it tests."""
    if getattr(module, "_hf_hook", None) is None:
        probe = copy.deepcopy(module)
    else:
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import align_module_device

        with align_module_device(module, torch.device("cpu")):
            probe = remove_hook_from_module(copy.deepcopy(module), recurse=True)
    for m in probe.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return probe


def probe_norm(module: nn.Module, d: int, eps: float) -> tuple[bool, float] | None:
    """Numerically find (centered, gain_offset) of a norm module, or None if it is neither LN nor RMSNorm.

    Runs a float32 copy (the model is never touched) on inputs with a large mean, so centring shows.
    The gain offset comes from zeroing the weight: an output equal to the normalized input means the gain
    is ``1 + w`` (Gemma's RMSNorm), an output of zero means it is ``w``.
    """
    probe = _detached_copy(module).float()
    device = next(itertools.chain(probe.parameters(), probe.buffers()), torch.empty(0)).device
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, d, generator=gen) * 2.0 + 3.0).to(device)  # [2, 5, d]
    xc = x - x.mean(-1, keepdim=True)  # [2, 5, d]
    refs = {True: xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps),
            False: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)}

    def matches(y: torch.Tensor) -> bool | None:  # which reference y is, if any
        y = y.to(device)
        fits = [c for c, r in refs.items() if y.shape == r.shape and torch.allclose(y, r, 1e-4, 1e-4)]
        return fits[0] if fits else None

    w, b = getattr(probe, "weight", None), getattr(probe, "bias", None)
    offset = 0.0
    with torch.no_grad():
        if isinstance(b, torch.Tensor):
            b.zero_()
        if isinstance(w, torch.Tensor):
            w.zero_()
            if matches(probe(x)) is not None:
                offset = 1.0  # a zero weight still gives the normalized input: the gain is 1 + w
            else:
                w.fill_(1.0)
        centered = matches(probe(x))  # the normalized input, with an effective gain of one
    return None if centered is None else (centered, offset)


def make_site(module: nn.Module, path: str, name: str, layer: int | None, role: Role,
              d: int | None = None) -> NormSite | None:
    """Describe one norm module as a :class:`NormSite` (None when its arithmetic is not LN or RMSNorm).

    The kind comes from the class where it is explicit (``nn.LayerNorm``; ``nn.RMSNorm`` or a class named
    ``*RMSNorm``), otherwise from :func:`probe_norm` (``T5LayerNorm`` is an RMSNorm); the gain offset always
    comes from the probe.
    """
    eps, w, b = _eps_of(module), getattr(module, "weight", None), getattr(module, "bias", None)
    d = d if d is not None else (w.numel() if isinstance(w, torch.Tensor) else None)
    if eps is None or d is None:
        return None
    found = probe_norm(module, d, eps)
    if found is None:
        warnings.warn(f"{path} ({type(module).__name__}) looks like a norm but computes neither LayerNorm "
                      "nor RMSNorm; normscope skips it.", stacklevel=3)
        return None
    centered = found[0]
    if isinstance(module, nn.LayerNorm):
        centered = True
    elif isinstance(module, nn.RMSNorm) or "rmsnorm" in type(module).__name__.lower():
        centered = False
    return NormSite(name=name, layer=layer, role=role, kind="layernorm" if centered else "rmsnorm",
                    centered=centered, eps=eps, gain_offset=found[1], has_gain=isinstance(w, torch.Tensor),
                    has_bias=isinstance(b, torch.Tensor), path=path, module=module, dim=d)


# ---- layout ---------------------------------------------------------------------------------------------
@dataclass
class BlockLayout:
    """One transformer block: where it is and which of its submodules are the attention and the MLP."""

    index: int
    path: str  # e.g. "model.layers.3"
    module: nn.Module = field(repr=False)
    attn: nn.Module | None = field(repr=False)  # returns (output, pattern [batch, heads, q, k]) when eager
    attn_path: str | None
    mlp: nn.Module | None = field(repr=False)  # None where the MLP is not one module (BERT, OPT)
    mlp_path: str | None


@dataclass
class ModelLayout:
    """Where the blocks, embedding, final norm and unembedding of a transformers model are."""

    blocks_path: str  # e.g. "model.layers"
    blocks: list[BlockLayout]
    embed: nn.Module = field(repr=False)  # _hf(model).get_input_embeddings()
    unembed: nn.Module | None = field(repr=False)  # _hf(model).get_output_embeddings(); None for encoders
    final_norm: NormSite | None  # the norm applied to the last block's output (``ln_final``)
    is_causal: bool
    n_heads: int
    d_model: int
    sites: list[NormSite] | None = field(default=None, repr=False, compare=False)
    """The norm sites found by the same probe pass (reused by :func:`find_norm_sites` while still valid)."""
    events: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """What each hooked module did in that probe pass (fingerprints and forward order; read by core.writers)."""

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def _hf(model: nn.Module) -> Any:
    """The model as a transformers ``PreTrainedModel``, whose methods (get_input_embeddings, ...) nn.Module's
    type does not declare."""
    return model


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int:
    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return next((v for v in (getattr(cfg, n, None) for n in names) if isinstance(v, int) and v > 0), 0)


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of ``num_hidden_layers`` blocks with two or more weight matrices each (the largest)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NormscopeError(f"{type(model).__name__} is an encoder-decoder model with two block lists; "
                             "normscope analyses decoder-only and encoder-only transformers.")
    n_layers = _config_int(model, ("num_hidden_layers", "n_layer", "num_layers"))
    candidates = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if (n_layers and len(mod) != n_layers) or (not n_layers and len({type(m) for m in mod}) != 1):
            continue
        if sum(p.dim() >= 2 for p in mod.parameters()) >= 2 * len(mod):
            candidates.append((sum(p.numel() for p in mod.parameters()), path, mod))
    if not candidates:
        raise NormscopeError(
            f"{type(model).__name__} has no transformer blocks normscope recognises (no nn.ModuleList of "
            f"{n_layers or 'identical'} layers); give a transformers model with a block list."
        )
    _, path, mod = max(candidates, key=lambda c: c[0])  # the first of the largest
    return path, mod


# ---- the probe forward pass -----------------------------------------------------------------------------
Fingerprint = tuple[tuple[int, ...], float, float, float]


def _fingerprint(t: Any) -> Fingerprint | None:
    """Shape, sum, ramp-weighted sum and scale: enough to tell two tensors of one forward pass apart."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    flat = t.detach().reshape(-1).double()  # [n]
    ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)  # [n]
    return tuple(t.shape), float(flat.sum()), float((flat * ramp).sum()), float(flat.abs().sum())


def _same(a: Fingerprint | None, b: Fingerprint | None) -> bool:
    if a is None or b is None or a[0] != b[0]:
        return False
    tol = 1e-9 * max(a[3], b[3]) + 1e-30
    return abs(a[1] - b[1]) <= tol and abs(a[2] - b[2]) <= tol and abs(a[3] - b[3]) <= tol


@dataclass
class _Event:
    """What one module did in the probe pass (fingerprints only: no activation is kept)."""

    end: int  # order in which its forward returned
    inp: Fingerprint | None
    out: Fingerprint | None
    d_in: int | None
    pattern: bool | None  # None: no [batch, heads, seq, seq] tensor in its output; else whether it is causal


def _trace(model: nn.Module, paths: dict[nn.Module, str], seq: int = 4) -> dict[str, _Event]:
    """Run ONE forward pass on a ``[1, seq]`` dummy input with temporary hooks on the given modules."""
    events: dict[str, _Event] = {}
    counter = itertools.count()

    def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if paths[mod] in events:  # a module called twice keeps its first call
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        outs = out if isinstance(out, (tuple, list)) else (out,)
        first = next((o for o in outs if isinstance(o, torch.Tensor)), None)
        pattern = None  # attention returns (output, pattern [1, heads, seq, seq], ...)
        for o in outs[1:]:
            if isinstance(o, torch.Tensor) and o.dim() == 4 and tuple(o.shape[-2:]) == (seq, seq):
                p = o.detach().float().nan_to_num()  # [1, h, q, k]; an overflowing probe must not look bidirectional
                pattern = bool(torch.triu(p, diagonal=1).abs().max() < 1e-9)
        d_in = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        events[paths[mod]] = _Event(next(counter), _fingerprint(x), _fingerprint(first), d_in, pattern)

    embed: Any = _hf(model).get_input_embeddings()
    device = input_device(model)  # the embedding's execution device (its weight may be offloaded to meta)
    vocab = getattr(embed, "num_embeddings", None) or _config_int(model, ("vocab_size",)) or 8
    ids = (torch.tensor([[5, 17, 23, 42, 61, 7, 11, 13][:seq]]) % vocab).to(device)  # [1, seq]
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in paths]
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(input_ids=ids, use_cache=False)
            except TypeError:
                model(input_ids=ids)
    except Exception as exc:
        raise NormscopeError(f"Could not run a 1x{seq} probe forward pass through {type(model).__name__} "
                             f"({type(exc).__name__}: {str(exc)[:160]}); normscope needs a model that takes "
                             "input_ids.") from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return events


# ---- placing blocks and sites ---------------------------------------------------------------------------
def _build_layout(model: nn.Module, blocks_path: str, block_list: nn.ModuleList, norms: dict[str, nn.Module],
                  ev: dict[str, _Event]) -> ModelLayout:
    blocks = []
    for i, block in enumerate(block_list):
        bpath = f"{blocks_path}.{i}"
        inside = [(p, m) for p, m in block.named_modules(prefix=bpath) if p != bpath and p not in norms]
        attns = [(p, m) for p, m in inside if p in ev and ev[p].pattern is not None]
        if not attns:  # sdpa / flash attention return no pattern: fall back to the class name
            attns = [(p, m) for p, m in inside
                     if "attention" in (c := type(m).__name__.lower()) and "cross" not in c]
        apath, attn = max(attns, key=lambda a: a[0].count("."), default=(None, None))  # the innermost
        mlps = [(f"{bpath}.{n}", c) for n, c in block.named_children()  # >= 2 weight matrices, no norm inside
                if f"{bpath}.{n}" in ev and sum(p.dim() >= 2 for p in c.parameters()) >= 2
                and not any(is_norm_module(m) for m in c.modules())
                and not f"{apath}.".startswith(f"{bpath}.{n}.")]
        mpath, mlp = mlps[0] if mlps else (None, None)
        blocks.append(BlockLayout(i, bpath, block, attn, apath, mlp, mpath))
    if all(b.attn is None for b in blocks):
        raise NormscopeError(f"{type(model).__name__} has no transformer blocks normscope recognises (no "
                             f"self-attention found under {blocks_path}); give a transformer model.")
    patterns = [ev[p].pattern for p in (b.attn_path for b in blocks) if p in ev and ev[p].pattern is not None]
    if patterns:  # causal when no query attends to a later key
        is_causal = all(patterns)
    else:
        is_decoder = bool(getattr(getattr(model, "config", None), "is_decoder", False))
        is_causal = is_decoder or type(model).__name__.endswith("ForCausalLM")
    embed: Any = _hf(model).get_input_embeddings()
    d_model = _config_int(model, ("hidden_size", "n_embd", "d_model")) or embed.embedding_dim
    n_heads = _config_int(model, ("num_attention_heads", "n_head", "num_heads"))
    unembed = _hf(model).get_output_embeddings()
    return ModelLayout(blocks_path, blocks, embed, unembed, None, is_causal, n_heads, d_model)


_CANONICAL = {"pre_attn": "ln1", "pre_mlp": "ln2", "post_attn": "ln1_post", "post_mlp": "ln2_post"}


def _block_role(path: str, e: _Event, b: BlockLayout, ev: dict[str, _Event], norms: dict[str, nn.Module],
                ) -> Role:
    """Role of a norm inside block ``b``, from its path and the data flow of the probe pass."""
    a, m, blk = ev.get(b.attn_path or ""), ev.get(b.mlp_path or ""), ev.get(b.path)
    if b.attn_path and path.startswith(b.attn_path + "."):
        return "qk_norm"
    if a and _same(e.out, a.inp):
        return "pre_attn"
    if m and _same(e.out, m.inp):
        return "pre_mlp"  # also when it reads the attention output directly (BLOOM adds the residual inside)
    if a and _same(e.inp, a.out):
        return "post_attn"  # sandwich norm on the attention output (Gemma2, OLMo2)
    if m and _same(e.inp, m.out):
        return "post_mlp"
    after_attn = a is not None and e.end > a.end
    siblings = [ev[p] for p in norms if p.startswith(b.path + ".") and p in ev]
    post_ln = blk is not None and any(_same(s.out, blk.out) for s in siblings)  # the residual passes a norm
    if post_ln and blk is not None and _same(e.out, blk.out):
        return "post_mlp"  # post-LN: BERT's output.LayerNorm, OPT-350m's final_layer_norm
    if post_ln and after_attn:
        return "post_attn"  # post-LN: BERT's attention.output.LayerNorm
    if after_attn and not post_ln and (m is None or e.end < m.end):
        return "pre_mlp"  # pre-LN with an inline MLP (OPT's per-layer final_layer_norm)
    return "other"


def _qk_name(path: str, n_seen: int) -> str | None:
    leaf = path.rsplit(".", 1)[-1].lower()
    if leaf.startswith("q") or "query" in leaf:
        return "attn.q_norm"
    if leaf.startswith("k") or "key" in leaf:
        return "attn.k_norm"
    return {0: "attn.q_norm", 1: "attn.k_norm"}.get(n_seen)  # unnamed: the first is q, the second k


def _analyse(model: nn.Module, layout: ModelLayout | None = None) -> tuple[ModelLayout, list[NormSite]]:
    """One probe pass; returns the layout (built unless given) and every norm site in forward order."""
    blocks_path, block_list = (layout.blocks_path, None) if layout else _find_block_list(model)
    norms = {p: m for p, m in model.named_modules() if p and is_norm_module(m)}
    prefix = blocks_path + "."
    weights = {p for p, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
               and m.weight.dim() == 2}  # embeddings outside the blocks too: core.writers reads their order
    ev = _trace(model, {m: p for p, m in model.named_modules() if p in norms or p in weights or p.startswith(prefix)})
    if layout is None:
        assert block_list is not None
        layout = _build_layout(model, blocks_path, block_list, norms, ev)
    blocks, first, last = layout.blocks, layout.blocks[0].path, layout.blocks[-1].path
    first_block_end = min((ev[p].end for p in ev if p.startswith(prefix)), default=0)
    found: list[tuple[float, NormSite]] = []
    taken: set[str] = set()
    n_qk = dict.fromkeys(range(len(blocks)), 0)
    for path, mod in norms.items():
        e = ev.get(path)
        i = int(path[len(prefix):].split(".")[0]) if path.startswith(prefix) else None
        by_path = path if i is None else f"blocks.{i}.{path[len(blocks[i].path) + 1:]}"
        role: Role = "other"
        name: str | None = None
        if e is None:
            pass  # never ran in the probe pass: kept, unplaced
        elif i is not None:
            role = _block_role(path, e, blocks[i], ev, norms)
            if role == "qk_norm":
                name, n_qk[i] = _qk_name(path, n_qk[i]), n_qk[i] + 1
            elif role != "other":
                name = _CANONICAL[role]
            name = name and f"blocks.{i}.{name}"
        elif e.end < first_block_end and first in ev and _same(e.out, ev[first].inp):
            role, name = "embedding", "embed.ln"  # its output enters the first block
        elif last in ev and e.end > ev[last].end and _same(e.inp, ev[last].out):
            role, name = "final", "ln_final"
        if name is None or name in taken:  # unplaced, or a second claim on a canonical name: named by path
            name = by_path
        site = make_site(mod, path, name, i, role, e.d_in if e else None)
        if site is not None:
            taken.add(name)
            found.append((e.end if e else float("inf"), site))
    found.sort(key=lambda s: s[0])  # forward order; norms that never ran come last, in module order
    sites = [s for _, s in found]
    layout.final_norm = next((s for s in sites if s.role == "final"), None)
    layout.sites, layout.events = sites, ev
    return layout, sites


def _sites_still_valid(model: nn.Module, sites: list[NormSite]) -> bool:
    """Whether ``sites`` (from an earlier probe) still describe ``model``: the same norm modules at the same
    paths (a wrapper such as remove-ln's frozen norm, installed since, invalidates them)."""
    norms = {p: m for p, m in model.named_modules() if p and is_norm_module(m)}
    return len(norms) == len(sites) and all(norms.get(s.path) is s.module for s in sites)


def find_layout(model: nn.Module) -> ModelLayout:
    """Find the block list, each block's attention and MLP, the embedding, final norm and unembedding.

    The block list is the ``nn.ModuleList`` whose length is the config's number of layers (``model.layers``,
    ``transformer.h``, ``encoder.layer``, ``model.decoder.layers``, ``gpt_neox.layers`` ...). The attention
    module is the innermost submodule of a block that returns the attention pattern ``[batch, heads, q, k]``
    in a 1x4 probe pass (eager attention; by class name otherwise); the MLP is the block child with two or
    more weight matrices and no norm (None when the MLP is inline, as in BERT and OPT). ``is_causal`` is read
    from the probe pattern. Raises :class:`NormscopeError` when there is no block list.
    """
    return _analyse(model)[0]


def find_norm_sites(model: nn.Module, layout: ModelLayout | None = None) -> list[NormSite]:
    """Every normalization module of ``model`` as a :class:`NormSite`, in forward order.

    Detection is by class (:func:`is_norm_module`); kind, eps and gain offset come from the class and a
    numerical probe (:func:`probe_norm`). Roles come from the module path (block index; inside the attention
    for qk-norms) and from one 1x4 probe pass that records which norm feeds the attention or MLP (pre-norm),
    which reads their output (sandwich post-norm, Gemma2) and which the residual passes through (post-LN,
    BERT). Norms that cannot be placed get role ``other`` and a name from their path; none is dropped.
    """
    if layout is not None and layout.sites is not None and _sites_still_valid(model, layout.sites):
        sites = layout.sites  # found by the probe pass that built the layout: no second pass
    else:
        _, sites = _analyse(model, layout)
    if not sites:
        raise NormscopeError(f"{type(model).__name__} has no normalization layers normscope recognises "
                             "(LayerNorm, RMSNorm or a *Norm module with an eps); give a model with norms.")
    return sites


def format_sites_table(sites: list[NormSite], title: str | None = None) -> Table:
    """A rich table for ``normscope sites``: name, layer, role, kind, eps, gain offset, bias, path, class.

    Columns with one value for every site (kind, eps, class on most models) move to the caption, so that the
    table fits 80 columns; on a narrow console the path folds onto more lines, the others keep their width.
    """
    cols = ("name", "layer", "role", "kind", "eps", "gain offset", "bias", "path", "class")
    rows = [[s.name, "" if s.layer is None else str(s.layer), s.role, s.kind, f"{s.eps:g}",
             f"{s.gain_offset:g}", "yes" if s.has_bias else "no", s.path, type(s.module).__name__]
            for s in sites]
    same = [j for j, c in enumerate(cols) if c in ("kind", "eps", "gain offset", "bias", "class") and len(rows) > 1
            and len({r[j] for r in rows}) == 1]
    caption = ("every site: " + ", ".join(f"{cols[j]} {rows[0][j]}" for j in same)) if same else None
    table = Table(title=title, header_style="bold", caption=escape(caption) if caption else None)
    keep = [j for j in range(len(cols)) if j not in same]
    for j in keep:
        col = cols[j]
        fold = col in ("path", "class")
        width = None if fold else max([len(col)] + [len(r[j]) for r in rows])
        table.add_column(col, justify="right" if col in ("layer", "eps", "gain offset") else "left",
                         min_width=width, no_wrap=not fold, overflow="fold")
    for r in rows:
        table.add_row(*(escape(r[j]) for j in keep))
    return table
