"""``normscope rewrite``: find the plan, rewrite a copy, verify it on the sample, export it, build the Result.

The model on ``lm`` is never changed: the rewrite works on a deep copy (two models in memory, three with
``--to crmsnorm``), so the check always compares against the untouched original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from normscope.core.errors import NormscopeError
from normscope.core.sites import find_layout, find_norm_sites
from normscope.report import Result, build_meta
from normscope.surgery.export import plain_load_note, write_export
from normscope.surgery.options import REFERENCES, RewriteOptions
from normscope.surgery.rewrite import RewriteLog, RewritePlan, compress, find_plan, rewrite
from normscope.surgery.verify import Verification, verify


@dataclass
class RewriteOutcome:
    """The run's result plus what the CLI needs to decide its exit status."""

    result: Result
    passed: bool
    exported: Path | None
    model: Any  # the rewritten (or compressed) model, for the Python API


def prepare_rewrite(model: Any, name: str) -> tuple[RewritePlan, Any, RewriteLog, Any, list[Any], Any, list[Any]]:
    """Plan and rewrite a copy of ``model``; returns (plan, layout, log, new model, sites, new layout, new sites)."""
    layout = find_layout(model)
    sites = find_norm_sites(model, layout)
    plan = find_plan(model, layout, sites, name)
    new = copy.deepcopy(model)
    log = rewrite(new, plan)
    new_layout = find_layout(new)
    return plan, layout, log, new, sites, new_layout, find_norm_sites(new, new_layout)


def run(lm: Any, sample: Any, opts: RewriteOptions | None = None, *, progress: Any = None) -> RewriteOutcome:
    """Rewrite ``lm.model`` (Pre-LN) into Pre-RMSNorm (or Pre-CRMSNorm), verify on ``sample``, export if asked."""
    opts = opts or RewriteOptions()
    name = lm.info.name
    plan, layout, log, new, sites, new_layout, new_sites = prepare_rewrite(lm.model, name)
    comp = None
    if opts.to == "crmsnorm":
        comp = copy.deepcopy(new)
        compress(comp, plan)
    n_models = 3 if comp is not None else 2
    if progress is not None:
        n_writers = len(plan.embeddings) + len(plan.writers)
        progress.note(f"rewrite: {len(plan.norms)} norms folded and swapped, {n_writers} writers centred; "
                      f"checking on {sample.n_tokens:,} tokens ({n_models} forward passes per batch).")
    ctx = progress.task("verifying", sample.n_tokens) if progress is not None else None
    if ctx is not None:
        with ctx as advance:
            ver = verify(lm.model, layout, sites, new, new_layout, new_sites, sample.batches, sample.seq_len,
                         compressed=comp, progress=advance)
    else:
        ver = verify(lm.model, layout, sites, new, new_layout, new_sites, sample.batches, sample.seq_len,
                     compressed=comp)
    checked = ver.compressed if ver.compressed is not None else ver.logits
    passed = ver.logits.max_rel <= opts.tolerance and checked.max_rel <= opts.tolerance
    final_model = comp if comp is not None else new
    exported = None
    if passed and opts.export is not None:
        manifest = {"source_model": lm.info.spec, "architecture": type(lm.model).__name__, "eps": {
            n.path: n.eps for n in plan.norms}, "biases_added": log.biases_added,
            "verification": _verification_json(ver, opts), "plain_transformers": plain_load_note(
                opts.to, log.logit_offset_max, log.logit_offset_spread)}
        exported = write_export(final_model, plan, opts.to, lm.tokenizer, Path(opts.export), manifest)
    result = build_result(lm, sample, opts, plan, log, ver, passed, exported)
    return RewriteOutcome(result, passed, exported, final_model)


def _verification_json(ver: Verification, opts: RewriteOptions) -> dict[str, Any]:
    out = {"tokens": ver.n_tokens, "tolerance": opts.tolerance, "max_rel_logit_diff": ver.logits.max_rel,
           "mean_rel_logit_diff": ver.logits.mean_rel, "max_abs_logit_diff": ver.logits.max_abs,
           "max_abs_log_softmax_diff": ver.logits.max_logsoftmax_abs, "ce_original": ver.ce_original,
           "ce_rewritten": ver.ce_rewritten,
           "max_resid_mean_ratio": max(r["rewritten_max"] for r in ver.resid)}
    if ver.compressed is not None:
        out |= {"crms_max_rel_logit_diff": ver.compressed.max_rel, "crms_ce": ver.ce_compressed}
    return out


def build_result(lm: Any, sample: Any, opts: RewriteOptions, plan: RewritePlan, log: RewriteLog, ver: Verification,
                 passed: bool, exported: Path | None) -> Result:
    """Tables, headlines, figures and summary of a run."""
    from normscope.surgery import report

    resid = pd.DataFrame(ver.resid)
    resid.insert(0, "point_index", range(len(resid)))
    lc = ver.logits
    positions = pd.DataFrame({"position": range(lc.seq_len), "max_rel": lc.pos_max,
                              "mean_rel": [s / n if n else float("nan") for s, n in zip(lc.pos_sum, lc.pos_n,
                                                                                         strict=True)]})
    if ver.compressed is not None:
        positions["crms_max_rel"] = ver.compressed.pos_max
    norms = pd.DataFrame(log.folded)
    writers = pd.DataFrame({"module": log.centred,
                            "kind": ["embedding"] * len(plan.embeddings) + ["block output"] * len(plan.writers)})
    headlines: dict[str, Any] = {
        "passed": passed,
        "max_rel_logit_diff": lc.max_rel,
        "mean_rel_logit_diff": lc.mean_rel,
        "max_abs_log_softmax_diff": lc.max_logsoftmax_abs,
        "ce_original": ver.ce_original,
        "ce_rewritten": ver.ce_rewritten,
        "max_resid_mean_ratio": float(resid["rewritten_max"].max()),
        "original_max_resid_mean_ratio": float(resid["original_max"].max()),
        "norms_swapped": len(log.swapped),
        "writers_centred": len(log.centred),
    }
    if ver.compressed is not None:
        headlines |= {"crms_max_rel_logit_diff": ver.compressed.max_rel, "ce_crms": ver.ce_compressed}
    if exported is not None:
        headlines["export"] = str(opts.export)
    payload = {"model": lm.info.name, "to": opts.to, "tolerance": opts.tolerance, "plan": plan.to_dict(),
               "biases_added": log.biases_added, "untied": log.untied,
               "logit_offset_max": log.logit_offset_max, "logit_offset_spread": log.logit_offset_spread,
               "tokens_checked": ver.n_tokens,
               "export_kind": ("safetensors state dict + config + tokenizer + normscope_rewrite.json manifest "
                               "(normscope rebuilds it)") if exported is not None else None,
               "plain_transformers": plain_load_note(opts.to, log.logit_offset_max, log.logit_offset_spread)}
    settings = {"to": opts.to, "tolerance": opts.tolerance, "export": str(opts.export) if opts.export else None}
    result = Result(analysis="rewrite", title=f"Pre-LN -> Pre-{'CRMSNorm' if opts.to == 'crmsnorm' else 'RMSNorm'}"
                    " rewrite (exact)", meta=build_meta(lm, sample, **settings), payload=payload,
                    tables={"residual_mean": resid, "logits_by_position": positions, "norms": norms,
                            "writers": writers},
                    headlines=headlines, references=list(REFERENCES),
                    axes={"residual_mean": "point_index", "logits_by_position": "position"},
                    labels=report.LABELS)
    result.figures = report.figures(result, ver)
    result.summary = report.summary(result, ver, plan)
    return result


def refuse_dtype(dtype: str) -> None:
    """The check runs in float32: a bf16/fp16 model could not show a 1e-4 relative difference."""
    if dtype not in ("auto", "float32"):
        raise NormscopeError(f"rewrite computes and verifies in float32 (a 1e-4 logit check means nothing in {dtype}); "
                             "drop --dtype, and cast the export when you load it.")
