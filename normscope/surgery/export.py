"""The checkpoint a rewrite exports, and the loader that rebuilds it.

transformers' GPT-2, OPT and GPT-NeoX classes build every norm as an ``nn.LayerNorm`` and their unembedding
without a bias, so no plain config can say "RMSNorm here, a logit bias there". The export is therefore

* ``model.safetensors``: the rewritten model's state dict (RMSNorm gains of one under the LayerNorms' names,
  ``lm_head.bias`` holding the final norm's folded bias), float32;
* ``config.json``: the original config with ``tie_word_embeddings`` false, and the tokenizer files;
* ``normscope_rewrite.json``: the manifest: target, the :class:`~normscope.surgery.rewrite.RewritePlan` (which
  module paths became RMSNorm or CRMSNorm, which linears gained a bias, which writers were centred), and the
  verification numbers of the run that wrote it.

Any normscope command given the folder rebuilds it exactly (:func:`load_rewritten`, called by
``normscope.core.models.load_model``): the model class from the config, the same structural edits, then the
weights, strictly. Plain ``AutoModelForCausalLM.from_pretrained(folder)`` also loads an ``rmsnorm`` export, as
the original class with unit-gain, zero-bias LayerNorms, which compute the same as RMSNorm on the zero-mean
stream; but it drops ``lm_head.bias``, so its logits differ by that per-vocabulary offset (the manifest gives
its size). A ``crmsnorm`` export has d_model - 1 stream coordinates and loads only through normscope.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.io import atomic_dir
from normscope.surgery.options import MANIFEST
from normscope.surgery.rewrite import RewritePlan, compress, rewrite

WEIGHTS = "model.safetensors"
FORMAT = "normscope rewrite"


def plain_load_note(to: str, offset_max: float, offset_spread: float) -> str:
    """What plain transformers makes of the export, in one paragraph."""
    if to == "crmsnorm":
        return ("Plain transformers cannot load this folder: its residual stream has d_model - 1 coordinates. Load "
                "it with normscope (any command given the folder).")
    return ("AutoModelForCausalLM.from_pretrained loads this folder as the original class with LayerNorm(gain 1, "
            "bias 0) in place of each RMSNorm, the same function on the zero-mean stream, but it drops lm_head.bias "
            f"(the final norm's folded bias: max |offset| {offset_max:.4g}, spread {offset_spread:.4g} over the "
            "vocabulary), so its logits and, unless the spread is 0, its softmax differ by that per-vocabulary "
            "offset. normscope's loader (any normscope command given the folder) rebuilds the exact model.")


def write_export(model: nn.Module, plan: RewritePlan, to: str, tokenizer: Any, out_dir: Path,
                 manifest: dict[str, Any]) -> Path:
    """Write the folder atomically (an existing one is replaced only as a whole, when the block succeeds)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config: Any = model.config
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full = {"format": FORMAT, "to": to, "weights": WEIGHTS, "plan": plan.to_dict(), **manifest}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=True, default=str))
    return Path(out_dir)


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        d = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise NormscopeError(f"{folder / MANIFEST} is unreadable ({type(exc).__name__}); re-export the model.") from exc
    if d.get("format") != FORMAT or d.get("to") not in ("rmsnorm", "crmsnorm"):
        raise NormscopeError(f"{folder / MANIFEST} is not a normscope rewrite manifest; re-export the model.")
    return d


def load_rewritten(folder: Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "eager",
                   trust_remote_code: bool = False) -> nn.Module:
    """Rebuild an exported rewrite: the class from the config, the plan's structural edits, the weights
    (strictly: a missing or extra tensor is a one-line error)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    d = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model: Any = AutoModelForCausalLM.from_config(config, **kwargs)
    plan = RewritePlan.from_dict(d["plan"])
    rewrite(model, plan)  # the structure (its arithmetic on the fresh weights is overwritten below)
    if d["to"] == "crmsnorm":
        compress(model, plan)
    state = load_file(str(folder / d.get("weights", WEIGHTS)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NormscopeError(f"{folder} does not match its manifest (missing {list(missing)[:2]}, unexpected "
                             f"{list(unexpected)[:2]}); re-export the model.")
    return model.to(dtype).eval()
