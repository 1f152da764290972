"""Several analyses at once: ``normscope report`` (one model load, one text sample, an index page) and
``normscope compare`` (two models' per-layer curves on the same axes, depth normalised to 0..1)."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from normscope.errors import NormscopeError
from normscope.report import Figure, IndexEntry, Result, make_meta, write_index, write_report

# analysis name -> (module, options class, page file stem, needs a causal LM)
ANALYSES: dict[str, tuple[str, str, str, bool]] = {
    "sinks": ("normscope.sinks", "SinksOptions", "sinks", False),
    "depth": ("normscope.depth", "DepthOptions", "depth", False),
    "grads": ("normscope.grads", "GradsOptions", "grads", False),
    "hubness": ("normscope.hubness", "HubnessOptions", "hubness", False),
    "dla": ("normscope.dla", "DlaOptions", "dla", True),
}


def parse_only(only: str | None) -> list[str]:
    """``--only sinks,depth`` -> ["sinks", "depth"]; None -> every analysis."""
    if not only:
        return list(ANALYSES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ANALYSES]
    if unknown or not names:
        raise NormscopeError(f"Unknown analysis '{', '.join(unknown) or only}' in --only; choose from "
                             f"{', '.join(ANALYSES)}.")
    return list(dict.fromkeys(names))


@dataclass
class SuiteRun:
    """What one analysis of a suite produced."""

    name: str
    result: Result | None
    seconds: float | None
    error: str | None = None


def depth_overrides(depth_layers: str | None) -> dict[str, dict[str, Any]]:
    """``--depth-layers`` of report/compare as options of the depth analysis: ``none`` turns the skip-one-block
    passes off, a spec such as ``0-9,20-29`` limits them (checked here, before any model loads)."""
    if depth_layers is None:
        return {}
    if depth_layers.strip().lower() == "none":
        return {"depth": {"skip": False}}
    from normscope.depth import parse_layers

    parse_layers(depth_layers, 1 << 30)  # syntax only; the block count is checked once the model is loaded
    return {"depth": {"layers": depth_layers}}


def run_analyses(lm: Any, sample: Any, names: list[str], progress: Any = None,
                 options: dict[str, dict[str, Any]] | None = None) -> list[SuiteRun]:
    """Run each analysis on the same loaded model and text; a bad-input error skips that analysis only.

    ``options`` maps an analysis name to keyword arguments of its options dataclass (defaults otherwise)."""
    runs: list[SuiteRun] = []
    for name in names:
        module, opts_cls, _, causal_only = ANALYSES[name]
        if causal_only and not lm.info.is_causal:
            runs.append(SuiteRun(name, None, None, f"{name} needs a causal LM with an unembedding"))
            continue
        mod = importlib.import_module(module)
        t0 = time.perf_counter()
        try:
            result = mod.run(lm, sample, getattr(mod, opts_cls)(**(options or {}).get(name, {})), progress=progress)
        except NormscopeError as exc:
            runs.append(SuiteRun(name, None, None, str(exc)))
            continue
        seconds = time.perf_counter() - t0
        result.timings = {**result.timings, name: seconds}
        runs.append(SuiteRun(name, result, seconds))
    return runs


def write_suite(lm: Any, sample: Any, runs: list[SuiteRun], out_dir: Path, load_seconds: float | None = None) -> Path:
    """Each analysis page, then ``index.html`` linking them (written last, so it only links pages that exist)."""
    entries = []
    for r in runs:
        if r.result is None:
            entries.append(IndexEntry(r.name, ANALYSES[r.name][2], None, error=r.error))
            continue
        paths = write_report(r.result, out_dir)
        entries.append(IndexEntry(r.name, r.result.title, paths.html.name, dict(r.result.headlines),
                                  r.result.summary[0] if r.result.summary else "", r.seconds))
    meta = make_meta(lm.info, sample.to_dict(), analyses=[r.name for r in runs])
    if load_seconds is not None:
        entries.insert(0, IndexEntry("load", "Model and text load", None, seconds=load_seconds,
                                     note="The model and the text sample are loaded once and shared by every "
                                          "analysis below."))
    return write_index(f"normscope report: {lm.info.name}", meta, entries, out_dir)


# ---- compare -------------------------------------------------------------------------------------------
def per_layer_tables(result: Result) -> dict[str, pd.DataFrame]:
    """The tables of a result that have one row per layer (a ``layer`` column with unique integer values)."""
    out = {}
    for name, df in result.tables.items():
        if "layer" in df.columns and len(df) and df["layer"].is_unique and pd.api.types.is_numeric_dtype(df["layer"]):
            out[name] = df
    return out


def relative_depth(layers: pd.Series) -> np.ndarray:
    """Layer index -> depth in 0..1 (first layer 0, last layer 1), so models of different depth line up."""
    lo, hi = float(layers.min()), float(layers.max())
    return (layers.to_numpy(dtype=float) - lo) / (hi - lo) if hi > lo else np.zeros(len(layers))


def compare_results(name: str, a: Result, b: Result, label_a: str, label_b: str) -> tuple[list[Figure], pd.DataFrame]:
    """Overlay every numeric per-layer column of two results of the same analysis; deltas B - A.

    Depth is normalised to 0..1 when the layer counts differ; with equal counts the x axis is the layer.
    The delta table has one row per (table, column, layer) when layer counts match, else one row per
    (table, column) with the means.
    """
    figs: list[Figure] = []
    rows: list[dict[str, Any]] = []
    ta, tb = per_layer_tables(a), per_layer_tables(b)
    for tname in [t for t in ta if t in tb]:
        da, db = ta[tname].sort_values("layer"), tb[tname].sort_values("layer")
        same = len(da) == len(db)
        xa = da["layer"].to_numpy() if same else relative_depth(da["layer"])
        xb = db["layer"].to_numpy() if same else relative_depth(db["layer"])
        cols = [c for c in da.columns if c != "layer" and c in db.columns
                and pd.api.types.is_numeric_dtype(da[c]) and pd.api.types.is_numeric_dtype(db[c])
                and not pd.api.types.is_bool_dtype(da[c])]
        for col in cols:
            ya, yb = da[col].to_numpy(dtype=float), db[col].to_numpy(dtype=float)
            if not (np.isfinite(ya).any() and np.isfinite(yb).any()):
                continue
            fig = go.Figure()
            fig.add_trace(go.Scatter(x=xa, y=ya, mode="lines+markers", name=label_a))
            fig.add_trace(go.Scatter(x=xb, y=yb, mode="lines+markers", name=label_b))
            positive = bool(np.nanmin(np.concatenate([ya, yb])) > 0)
            spread = np.nanmax(np.concatenate([ya, yb])) / max(np.nanmin(np.concatenate([ya, yb])), 1e-30)
            fig.update_layout(xaxis_title="layer" if same else "relative depth (0 = first layer, 1 = last)",
                              yaxis_title=col, yaxis_type="log" if positive and spread > 100 else "linear")
            figs.append(Figure(f"{name}: {tname}.{col}", fig,
                               f"Where the two curves part is where {label_a} and {label_b} differ in {col}."))
            if same:
                for layer, va, vb in zip(da["layer"], ya, yb, strict=True):
                    rows.append({"analysis": name, "table": tname, "column": col, "layer": int(layer),
                                 "a": va, "b": vb, "delta": vb - va})
            else:
                rows.append({"analysis": name, "table": tname, "column": col, "layer": None,
                             "a": float(np.nanmean(ya)), "b": float(np.nanmean(yb)),
                             "delta": float(np.nanmean(yb) - np.nanmean(ya))})
    return figs, pd.DataFrame(rows, columns=["analysis", "table", "column", "layer", "a", "b", "delta"])


def compare(lm_a: Any, sample_a: Any, runs_a: list[SuiteRun], lm_b: Any, sample_b: Any,
            runs_b: list[SuiteRun]) -> Result:
    """One page with both models' per-layer curves on the same axes, headline deltas and per-layer deltas."""
    la, lb = lm_a.info.name, lm_b.info.name
    if la == lb:
        la, lb = f"A: {la}", f"B: {lb}"
    figures: list[Figure] = []
    deltas = []
    head_rows = []
    by_b = {r.name: r for r in runs_b}
    for ra in runs_a:
        rb = by_b.get(ra.name)
        if ra.result is None or rb is None or rb.result is None:
            continue
        figs, df = compare_results(ra.name, ra.result, rb.result, la, lb)
        figures += figs
        deltas.append(df)
        for k, va in ra.result.headlines.items():
            vb = rb.result.headlines.get(k)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                head_rows.append({"analysis": ra.name, "headline": k, "a": va, "b": vb, "delta": vb - va})
    if not figures and not head_rows:
        raise NormscopeError("The two models share no analysis that ran on both; check --only and the models.")
    delta_df = pd.concat(deltas, ignore_index=True) if deltas else pd.DataFrame()
    heads_df = pd.DataFrame(head_rows, columns=["analysis", "headline", "a", "b", "delta"])
    same_depth = lm_a.info.n_layers == lm_b.info.n_layers
    summary = [
        f"A = {la} ({lm_a.info.n_layers} layers), B = {lb} ({lm_b.info.n_layers} layers). "
        + ("Both have the same depth, so curves are drawn per layer." if same_depth else
           "Their depths differ, so each curve is drawn against relative depth 0..1 and the deltas compare means."),
    ]
    if len(heads_df):
        big = heads_df.reindex(heads_df["delta"].abs().sort_values(ascending=False).index).head(3)
        summary.append("Largest headline differences (B - A): " + "; ".join(
            f"{r.analysis} {r.headline}: {r.a:.4g} -> {r.b:.4g}" for r in big.itertuples()) + ".")
    headlines = {f"{r.analysis}: {r.headline} (B - A)": r.delta for r in heads_df.head(8).itertuples()}
    tables = {"headline_deltas": heads_df}
    if len(delta_df):
        tables["layer_deltas"] = delta_df
    return Result(
        analysis="compare",
        title=f"Compare {la} and {lb}",
        meta={"a": make_meta(lm_a.info, sample_a.to_dict()), "b": make_meta(lm_b.info, sample_b.to_dict()),
              "model": {"name": f"{la} vs {lb}"}, "versions": make_meta()["versions"],
              "analyses": [r.name for r in runs_a]},
        payload={"model_a": lm_a.info.spec, "model_b": lm_b.info.spec, "same_depth": same_depth,
                 "headline_deltas": heads_df.to_dict("records"),
                 "layer_deltas": delta_df.to_dict("records") if len(delta_df) else []},
        tables=tables,
        figures=figures,
        headlines=headlines,
        summary=summary,
        references=sorted({ref for r in runs_a if r.result for ref in r.result.references}),
    )
