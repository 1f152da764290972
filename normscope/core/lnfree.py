"""Loading an exact-BOS LN-free export (``remove-ln --exact-bos``) as the model it was trained as.

The export is a plain checkpoint in which every norm divides by the constant ``sqrt(E)`` (the divisors folded
into the gains, see :mod:`normscope.removal.export`), plus ``bos_prefix.safetensors``: in training, positions
before ``k`` (the fixed BOS prefix) kept their own live divisor ``sqrt(ms + eps)``, which no ``LlamaConfig``
can express. Plain transformers uses the prefix as a key/value cache; normscope's analyses need every
position, the BOS included, so this module puts the live position-0 divisor back with one forward hook per
norm site instead:

    y_0 = (out_0 - b) * divisor * sqrt(ms_0 + E) / (sqrt(E) * sqrt(ms_0 + eps)) + b

where ``out_0`` is the folded site's output at a prefix position, ``ms_0`` its input's mean square (variance
for a LayerNorm), ``divisor`` the frozen value of the site and ``eps`` its original eps (both in the
manifest). Positions >= k are untouched: they divide by the frozen constant, as in training. Because a fixed
BOS's trajectory is the same for every input (causal attention, RoPE the identity at position 0), this is the
trained model exactly; :func:`check_sample` refuses a text whose windows do not start with the prefix, which
the model never saw (Sun et al. 2024, massive activations; the fixed-BOS argument of REFERENCE §5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError

MANIFEST = "normscope_removal.json"  # the same name removal/export.py writes
PREFIX_FILE = "bos_prefix.safetensors"


def export_description(manifest: dict[str, Any]) -> dict[str, Any]:
    """What analyses need to know of a remove-ln export: its kind, and whether its norms keep a clamp (and of
    which shape: ``soft`` or ``hard``)."""
    shapes = {site.get("clamp_shape") or "soft" for site in manifest.get("sites", []) if site.get("clamp")}
    return {"kind": str(manifest.get("export_kind") or "LN-free export"), "clamped": bool(shapes),
            "clamp_shape": ("hard" if shapes == {"hard"} else "soft") if shapes else None}


def _knee_hook(skip: int, centered: bool, divisor: float, k: float, eps: float, bias: Any) -> Any:
    """A hard clamp's knee on a folded site (``remove-ln --clamp-shape hard``): the folded module divides by the
    constant ``divisor``; a token whose own divisor ``sqrt(ms + eps)`` is above ``k * divisor`` is scaled down
    by ``k * divisor / sqrt(ms + eps)``, so it leaves at ``k`` x the site's scale. Positions < ``skip`` (the
    BOS, which keeps its live divisor through :func:`install_exact_bos`) are left alone."""
    def hook(_mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # [batch, pos, d]
        if x.dim() < 2 or x.shape[1] <= skip:
            return out
        xf = x[:, skip:].float()  # [batch, pos - skip, d]
        if centered:
            xf = xf - xf.mean(dim=-1, keepdim=True)
        live = torch.sqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [batch, pos - skip, 1]
        f = (k * divisor / live).clamp(max=1.0)
        b = bias.float() if isinstance(bias, torch.Tensor) else 0.0
        tail = ((out[:, skip:].float() - b) * f + b).to(out.dtype)  # [batch, pos - skip, d]
        return torch.cat([out[:, :skip], tail], dim=1)

    return hook


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The LN-free export's manifest, or None when ``folder`` is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise NormscopeError(f"{path} is not a readable normscope export manifest ({exc}); re-export the "
                             "model with remove-ln --resume.") from exc


def position0_factor(x0: torch.Tensor, centered: bool, divisor: float, eps: float, big_eps: float) -> torch.Tensor:
    """``divisor * sqrt(ms + E) / (sqrt(E) * sqrt(ms + eps))`` per prefix position: ``[batch, k, ..., 1]`` fp64."""
    xf = x0.double()  # [batch, k, ..., d]
    if centered:
        xf = xf - xf.mean(dim=-1, keepdim=True)
    ms = xf.pow(2).mean(dim=-1, keepdim=True)  # [batch, k, ..., 1]
    return divisor * torch.sqrt(ms + big_eps) / (math.sqrt(big_eps) * torch.sqrt(ms + eps))


def _site_hook(k: int, centered: bool, divisor: float, eps: float, big_eps: float, bias: Any) -> Any:
    def hook(_mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # [batch, pos, d]
        if x.dim() < 2 or x.shape[1] == 0:
            return out
        n = min(k, x.shape[1])
        f = position0_factor(x[:, :n], centered, divisor, eps, big_eps)  # [batch, n, 1]
        b = bias.double() if isinstance(bias, torch.Tensor) else 0.0
        head = ((out[:, :n].double() - b) * f + b).to(out.dtype)  # [batch, n, d]
        return torch.cat([head, out[:, n:]], dim=1)

    return hook


def apply_site_eps(model: nn.Module, folder: Path, manifest: dict[str, Any] | None = None, skip: int = 0) -> int:
    """Give every clamped norm of an export (``remove-ln --clamp``) what the config cannot hold: a soft-clamped
    site its own eps from the manifest, a hard-clamped one (``clamp_shape`` "hard") its knee, as one forward
    hook (:func:`_knee_hook`; ``skip``: the fixed prefix positions the loader runs through the model, which
    keep their own divisor). Returns how many modules were set (0 for any other folder). ``manifest``: the
    folder's, when the caller has read it already."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        return 0
    n = 0
    for site in manifest.get("sites", []):
        if not site.get("clamp"):
            continue
        try:
            mod = model.get_submodule(site["path"])
        except AttributeError as exc:
            raise NormscopeError(f"{folder}: the export's manifest names {site['path']}, which the model lacks; "
                                 "the folder's weights and manifest come from different runs.") from exc
        if site.get("clamp_shape") == "hard":
            mod.register_forward_hook(_knee_hook(skip, site.get("kind") == "layernorm", float(site["divisor"]),
                                                 float(site["clamp"]), float(site["original_eps"]),
                                                 getattr(mod, "bias", None)))
            n += 1
        else:
            n += set_module_eps(mod, float(site["folded_eps"]))
    return n


def set_module_eps(mod: nn.Module, eps: float) -> int:
    """Set a norm module's own eps attribute (transformers reads it at every forward, not the config's);
    returns 1 when the module had one."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if isinstance(getattr(mod, attr, None), float):
            setattr(mod, attr, eps)
            return 1
    return 0


def install_exact_bos(model: nn.Module, folder: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Give the prefix positions of an exact-BOS export their live divisors back (see the module docstring).

    Returns ``{"export_kind", "prefix_ids", "sites"}`` for the model's description, or None when ``folder``
    is a plain model (or a plain LN-free export, which needs nothing). ``manifest``: as for
    :func:`apply_site_eps`."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None or not manifest.get("prefix_ids"):
        return None
    prefix = [int(i) for i in manifest["prefix_ids"]]
    k = len(prefix)
    big_eps = float(manifest["eps"])
    handles = []
    for site in manifest["sites"]:
        try:
            mod = model.get_submodule(site["path"])
        except AttributeError as exc:
            raise NormscopeError(f"{folder}: the export's manifest names {site['path']}, which the model lacks; "
                                 "the folder's weights and manifest come from different runs.") from exc
        centered = site.get("kind") == "layernorm"
        # a soft-clamped site was folded with its own eps and divisor (removal.export.folded_site)
        site_eps = float(site.get("folded_eps") or big_eps)
        site_div = float(site.get("folded_divisor") or site["divisor"])
        handles.append(mod.register_forward_hook(_site_hook(
            k, centered, site_div, float(site["original_eps"]), site_eps, getattr(mod, "bias", None))))
    return {"export_kind": str(manifest.get("export_kind", "")), "prefix_ids": prefix,
            "sites": len(manifest["sites"]), "handles": handles}


def check_sample(exact_bos: dict[str, Any] | None, batches: Any) -> None:
    """One line when a window does not start with the export's fixed prefix: the model is exact only there."""
    if not exact_bos:
        return
    prefix = exact_bos["prefix_ids"]
    want = torch.tensor(prefix, dtype=torch.long)  # [k]
    for batch in batches:
        ids = batch.input_ids  # [batch, pos]
        if ids.shape[1] < len(prefix) or not bool((ids[:, :len(prefix)].cpu() == want[None, :]).all()):
            raise NormscopeError(f"this LN-free export was trained with the fixed prefix {prefix} at the start of "
                                 "every window and is exact only there; load the text with --bos yes.")
