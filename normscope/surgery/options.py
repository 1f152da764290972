"""Options of ``normscope rewrite`` and the checks that need no model load (no torch imported here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from normscope.core.errors import NormscopeError
from normscope.core.options import opt

REFERENCES = [
    "Jiang, Gu, Zhu, Pan 2023, Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN "
    "Transformers (NeurIPS 2023, arXiv:2305.14858; code ZixuanJiang/pre-rmsnorm-transformer)",
    "TransformerLens fold_ln / center_writing_weights (W_eff = w[:, None] * W, b_eff = b + b_ln @ W; writers "
    "centred along d_model)",
]
MANIFEST = "normscope_rewrite.json"


@dataclass
class RewriteOptions:
    """What ``normscope rewrite`` produces (the ``rewrite options`` panel)."""

    to: str = opt("rmsnorm", choices=("rmsnorm", "crmsnorm"))
    """rmsnorm: every LayerNorm becomes an RMSNorm with the same eps on a zero-mean stream; crmsnorm: also drop
    one residual coordinate (Jiang et al.'s compressed variant; the stream keeps d_model - 1 of them)."""
    export: Path | None = None
    """Write the rewritten model into this folder (safetensors + config + tokenizer + manifest that
    normscope's loader rebuilds); refused when the folder exists, unless --force."""
    tolerance: float = opt(1e-4, lo=0.0, lo_open=True)
    """Largest per-token relative logit difference ||z' - z|| / ||z|| (float32) that counts as exact; above it
    the run fails (exit 1) and nothing is exported."""


# The bundled models, judged without loading them.
_BUNDLED_REFUSALS = {
    "smollm2-135m": "smollm2-135m (Llama) already uses RMSNorm at every norm site: there is no LayerNorm to rewrite; "
                    "give a Pre-LN model such as GPT-2, OPT or Pythia.",
    "minilm-l6": "minilm-l6 (BERT) is a Post-LN encoder: the residual stream itself passes through each LayerNorm, "
                 "so LN(x) = RMSNorm(x) cannot be made to hold; the rewrite needs a Pre-LN model (GPT-2, OPT, "
                 "Pythia).",
}
_POST_LN_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "albert", "mpnet",
                  "deberta", "deberta-v2")


def precheck(spec: str, opts: RewriteOptions, force: bool) -> None:
    """Refuse in one line, before any model loads, what the input alone shows: a bundled model the identity
    does not apply to, a folder whose config says RMSNorm or Post-LN, an export folder that exists."""
    if spec in _BUNDLED_REFUSALS:
        raise NormscopeError(_BUNDLED_REFUSALS[spec])
    cfg_file = Path(spec).expanduser() / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            cfg = {}
        mtype = str(cfg.get("model_type", ""))
        if (Path(spec).expanduser() / MANIFEST).exists():
            raise NormscopeError(f"{spec} is already the output of normscope rewrite; give the original model.")
        if "rms_norm_eps" in cfg:
            raise NormscopeError(f"{spec} ({mtype}) already uses RMSNorm (its config has rms_norm_eps): there is no "
                                 "LayerNorm to rewrite; give a Pre-LN model such as GPT-2, OPT or Pythia.")
        if mtype in _POST_LN_TYPES or (mtype == "opt" and cfg.get("do_layer_norm_before") is False):
            raise NormscopeError(f"{spec} ({mtype}) is a Post-LN model, where LN(x) = RMSNorm(x) cannot be made to "
                                 "hold; the rewrite needs a Pre-LN model (GPT-2, OPT, Pythia).")
    if opts.export is not None:
        out = Path(opts.export)
        if out.exists() and not out.is_dir():
            raise NormscopeError(f"--export {out} is a file; give a folder (it is created).")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise NormscopeError(f"--export {out} already exists and is not empty; pass --force to replace it, or "
                                 "choose another folder.")
