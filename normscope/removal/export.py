"""Export an LN-free model as a plain transformers checkpoint that any tool loads with no custom code.

The frozen divisors are folded into the norms themselves, the trick of Baroni et al. 2025 (their models
``schaeff/gpt2-*_LNFree*`` set the LN weight to ``w * 1e6 / sigma`` with ``eps = 1e12``): with a huge
``eps = E`` every site computes ``x_c / sqrt(var + E) * w' + b``, and when ``var << E`` the divisor is the
constant ``sqrt(E)``, so ``w' = w * sqrt(E) / sigma`` gives exactly the frozen site ``x_c / sigma * w + b``.
The same works for RMSNorm (``mean(x^2)`` in place of ``var``). In fp32, ``var + E`` rounds to ``E`` exactly
once ``var < E * 2^-24``; with the default ``E = 1e16`` that holds for per-token RMS up to ~24,000, and the
relative error is at most ``var / (2E)`` above it. Folded gains reach ~1e8 / sigma: load the export in
float32 or bfloat16, not float16.

transformers builds every norm from one config eps (``rms_norm_eps``, ``layer_norm_epsilon``, ...), so every
site must be frozen for a plain checkpoint; a position-0 divisor cannot be expressed either, so the first-token
blend must have reached 1 (the schedule makes sure of it). A manifest (``normscope_removal.json``) lists every
site's divisor, the schedule and the training settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.lnfree import set_module_eps
from normscope.removal.frozen import Removal
from normscope.report import atomic_dir

DEFAULT_EPS = 1e16
MANIFEST = "normscope_removal.json"
_EPS_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps", "layernorm_epsilon",
             "epsilon", "eps")


def folded_gain(weight: torch.Tensor, divisor: float, eps: float, gain_offset: float = 0.0) -> torch.Tensor:
    """The gain that makes ``x_c / sqrt(var + eps) * gain`` equal ``x_c / divisor * weight`` for small var.

    weight: ``[d]``. With a ``1 + w`` gain (Gemma, ``gain_offset`` 1) the stored weight is the new gain minus
    the offset. Computed in float64, returned in the weight's dtype.
    """
    w = weight.detach().double() + gain_offset
    return (w * (math.sqrt(eps) / divisor) - gain_offset).to(weight.dtype)


def folded_site(w: Any, eps: float = DEFAULT_EPS) -> tuple[float, float]:
    """``(eps, divisor)`` to fold one frozen site with :func:`folded_gain`.

    A plain frozen site takes the huge shared ``eps`` and its divisor ``d``. A soft-clamped one (``w.clamp = K``
    > 0, see :meth:`normscope.removal.frozen.FrozenNorm._clamped`) divides by ``sqrt(d^2 + (ms + eps0) / K^2)``,
    which is ``sqrt(ms + E) / K`` with its own ``E = K^2 d^2 + eps0``: an RMSNorm (LayerNorm) with that eps and
    the gain ``K w``, i.e. ``folded_gain`` with the divisor ``sqrt(E) / K``. A hard-clamped one
    (``w.clamp_hard``) is folded like a plain site: its knee is no RMSNorm, and the loader adds it as a hook.
    """
    assert w.divisor is not None
    k = float(getattr(w, "clamp", 0.0) or 0.0)
    if k <= 0 or getattr(w, "clamp_hard", False):
        return eps, float(w.divisor)
    site_eps = k * k * float(w.divisor) ** 2 + float(w.eps)
    return site_eps, math.sqrt(site_eps) / k


def export_check(removal: Removal) -> None:
    """One-line errors when the frozen model cannot be written as a plain checkpoint."""
    live = [w.site_name for w in removal if not w.fully_frozen]
    if live:
        raise NormscopeError(
            f"{len(live)} norm site(s) are still live (e.g. {live[0]}): a plain checkpoint has one eps for every "
            "norm, so only a model with every site removed can be exported; remove all sites or skip --export."
        )
    pending = [w.site_name for w in removal
               if w.first_token and w.divisor_first is not None and w.first_blend < 1 and not w.n_fixed]
    if pending:
        raise NormscopeError(
            f"{pending[0]} still gives position 0 its own divisor, which a plain checkpoint cannot express; train "
            "until the schedule has blended the first-token divisors away."
        )
    no_gain = [w.site_name for w in removal if w.weight is None]
    if no_gain:
        raise NormscopeError(f"{no_gain[0]} has no gain to fold the divisor into; this model cannot be exported.")


def _eps_keys(config: Any, old_eps: set[float]) -> list[str]:
    keys = []
    for k in _EPS_KEYS:
        v = getattr(config, k, None)
        if isinstance(v, float) and any(math.isclose(v, e, rel_tol=1e-3) for e in old_eps):
            keys.append(k)
    return keys


def plain_copy(model: nn.Module) -> nn.Module:
    """A fresh instance of ``model``'s class with its current weights (the wrappers share the original keys)."""
    cls: Any = type(model)  # a transformers PreTrainedModel class
    fresh = cls._from_config(model.config, attn_implementation="eager", dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    return fresh.to(next(model.parameters()).device).eval()


def fold(model: nn.Module, removal: Removal, eps: float = DEFAULT_EPS) -> nn.Module:
    """A plain copy of the frozen ``model`` with every divisor folded into its norm gains and eps set to ``eps``."""
    export_check(removal)
    plain: Any = plain_copy(model)
    old_eps = {w.eps for w in removal}
    with torch.no_grad():
        for w in removal:
            site = next(s for s in removal.sites if s.name == w.site_name)
            mod: Any = plain.get_submodule(site.path)
            site_eps, site_div = folded_site(w, eps)
            mod.weight.copy_(folded_gain(mod.weight, site_div, site_eps, w.gain_offset))
            set_module_eps(mod, site_eps)
    keys = _eps_keys(plain.config, old_eps)
    if not keys:
        raise NormscopeError(f"{type(plain.config).__name__} has no eps setting normscope knows "
                             f"({', '.join(_EPS_KEYS)}); this model cannot be exported as a plain checkpoint.")
    for k in keys:
        setattr(plain.config, k, eps)
    return plain


def clamp_shape_of(removal: Any) -> str | None:
    """``"soft"`` or ``"hard"`` when some site of ``removal`` keeps a clamp (``remove-ln --clamp``), else None."""
    shapes = {"hard" if getattr(w, "clamp_hard", False) else "soft" for w in removal if w.clamp}
    return None if not shapes else "hard" if shapes == {"hard"} else "soft"


def export_kind(prefix: bool, clamp: str | None) -> str:
    """What kind of export a run wrote, in the one wording the manifest, the terminal and the page share.
    ``clamp``: the shape of the clamp its norms keep (:func:`clamp_shape_of`), None for none."""
    return ("a plain transformers checkpoint" + (" plus a BOS key/value prefix (bos_prefix.safetensors)" if prefix
                                                 else "")
            + (", with per-site eps (the soft clamp; the manifest's sites[].folded_eps)" if clamp == "soft" else
               ", with a hard clamp at some sites (a forward hook each; the manifest's sites[].clamp)"
               if clamp == "hard" else ""))


def export_model(model: nn.Module, removal: Removal, tokenizer: Any, out_dir: Path, manifest: dict[str, Any],
                 eps: float = DEFAULT_EPS, prefix: Any = None) -> tuple[Path, nn.Module]:
    """Fold, then write ``out_dir`` (safetensors, config, tokenizer, manifest) atomically; returns the folder
    and the folded in-memory model. ``prefix`` (:class:`normscope.removal.prefix.Prefix`, the exact-BOS mode)
    is written beside it as ``bos_prefix.safetensors``."""
    plain: Any = fold(model, removal, eps)  # a transformers model: save_pretrained
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if prefix is not None:
            prefix.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sites = []
        for w in removal:
            site = next(s for s in removal.sites if s.name == w.site_name)
            site_eps, site_div = folded_site(w, eps)
            sites.append({"name": w.site_name, "path": site.path, "role": w.role, "kind": site.kind,
                          "divisor": w.divisor, "first_token_divisor": w.divisor_first,
                          "clamp": w.clamp or None,
                          "clamp_shape": ("hard" if w.clamp_hard else "soft") if w.clamp else None,
                          "folded_eps": site_eps, "folded_divisor": site_div,
                          "frozen_at_step": w.frozen_at, "value_path_frozen_at_step": w.frozen_v_at,
                          "original_eps": w.eps})
        shape = clamp_shape_of(removal)
        full = {"format": "normscope LN-free export", "export_kind": export_kind(prefix is not None, shape),
                "eps": eps,
                "prefix_ids": prefix.ids.tolist() if prefix is not None else None,
                "note": ("Every norm divides by the constant sqrt(eps): gain = w * sqrt(eps) / divisor. Load in "
                         "float32 or bfloat16 (float16 overflows the folded gains). Replace the norms by their "
                         "gain (an elementwise scale) after folding for exact linear attribution."
                         if shape is None else
                         "Hard-clamped sites (sites[].clamp_shape 'hard'): each norm divides by the constant "
                         "sqrt(eps) as above, and a token whose own RMS sqrt(ms + original_eps) is above "
                         "K x the site's divisor is scaled down by K divisor / sqrt(ms + original_eps) after it "
                         "(a forward hook; normscope's loader adds it). Every token below the knee sees the "
                         "constant: LN-free for it."
                         if shape == "hard" else
                         "Soft-clamped sites: each norm keeps its own eps = K^2 d^2 + eps0 (sites[].folded_eps) and "
                         "the gain K w, so it divides by sqrt(d^2 + ms / K^2): within 1 / (2 K^2) of the constant d "
                         "for ordinary tokens, a norm for tokens above K d. The config's one eps cannot say this: "
                         "set each module's variance_epsilon from sites[].folded_eps after loading."),
                "sites": sites, **manifest}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1, default=str))
    return out_dir, plain


def max_relative_fold_error(max_mean_square: float, eps: float = DEFAULT_EPS) -> float:
    """Bound on |sqrt(ms + eps) / sqrt(eps) - 1| for the largest mean square seen at any site."""
    return math.sqrt(1.0 + max_mean_square / eps) - 1.0
