"""Several analyses at once: ``normscope report`` (one model load, one text sample, one index page) and
``normscope compare`` (two models' per-depth curves of every analysis on the same axes, relative depth 0..1).

Both work from the registry and from each :class:`~normscope.report.Result`'s declared depth tables
(``Result.axes``), so a new analysis joins them without a line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from normscope.analyses.base import REGISTRY, RunContext, get
from normscope.core.errors import NormscopeError
from normscope.report import Figure, Result, make_meta

MAX_SERIES = 6  # a depth table's text columns with more distinct values than this are not split into curves


@dataclass
class SuiteRun:
    """What one analysis of a suite produced, or why it did not run."""

    name: str
    result: Result | None
    seconds: float | None
    error: str | None = None


def run_suite(ctx: RunContext, names: list[str], options: dict[str, Any] | None = None) -> list[SuiteRun]:
    """Run each analysis on the same context; a bad-input error skips that analysis only.

    ``options`` maps an analysis name to its options dataclass (or a dict of keyword values)."""
    runs: list[SuiteRun] = []
    for name in names:
        spec = get(name)
        opts = (options or {}).get(name)
        if isinstance(opts, dict):
            opts = spec.make_options(**opts)
        if spec.needs_causal and not ctx.lm.info.is_causal:
            runs.append(SuiteRun(name, None, None, f"{name} needs a causal LM with an unembedding"))
            continue
        try:
            result = spec.run(ctx, opts)
        except NormscopeError as exc:
            runs.append(SuiteRun(name, None, None, str(exc)))
            continue
        runs.append(SuiteRun(name, result, result.timings.get(name)))
    return runs


# ---- compare -------------------------------------------------------------------------------------------
def relative_depth(values: pd.Series | np.ndarray) -> np.ndarray:
    """Depth index -> 0..1 (first 0, last 1), so models of different depth line up."""
    v = np.asarray(values, dtype=float)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    return (v - lo) / (hi - lo) if hi > lo else np.zeros(len(v))


def _series(df: pd.DataFrame, axis: str) -> list[str]:
    """The text columns that split a depth table into curves with one row per depth each (hubness' point
    kind and metric, depth's site role); none when the depth column is already unique."""
    if df[axis].dropna().is_unique:
        return []
    candidates = []
    for c in df.columns:
        if c == axis or pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]):
            continue
        try:
            n = df[c].nunique(dropna=False)
        except TypeError:  # lists in the cells
            continue
        if 1 < n <= MAX_SERIES:
            candidates.append((n, c))
    keys: list[str] = []
    for _, c in sorted(candidates):  # the coarsest split first: role before site name
        keys.append(c)
        if not df.dropna(subset=[axis]).duplicated(subset=[*keys, axis]).any():
            break
    return keys


def _curves(df: pd.DataFrame, axis: str, keys: list[str]) -> dict[str, pd.DataFrame]:
    """One depth-sorted frame per series (``""`` when the table has one row per depth); rows off the axis dropped."""
    df = df.dropna(subset=[axis])
    if not keys:
        return {"": df.sort_values(axis)}
    return {" / ".join(map(str, k if isinstance(k, tuple) else (k,))): g.sort_values(axis)
            for k, g in df.groupby(keys, sort=True, dropna=False)}


def _numeric(df: pd.DataFrame, axis: str) -> list[str]:
    return [c for c in df.columns if c != axis and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c]) and not c.endswith(("_index", "_id"))
            and c not in ("layer", "block", "point", "depth", "head", "dim", "position", "order")]


def compare_results(name: str, a: Result, b: Result, label_a: str, label_b: str) -> tuple[list[Figure], pd.DataFrame]:
    """Overlay every numeric column of every depth table the two results share; deltas B - A.

    x is the depth index when both tables have the same depths, else relative depth 0..1. The delta table has
    one row per (table, series, column, depth) for equal depths, else one per (table, series, column) with the
    means; ``relative_delta`` = (B - A) / |A| is the one to read when the two scales differ.
    """
    import plotly.graph_objects as go

    figs: list[Figure] = []
    rows: list[dict[str, Any]] = []
    ta, tb = a.depth_tables(), b.depth_tables()
    for tname in [t for t in ta if t in tb]:
        axis, da = ta[tname]
        axis_b, db = tb[tname]
        if axis != axis_b:
            continue
        keys = [k for k in _series(da, axis) if k in db.columns]
        ca, cb = _curves(da, axis, keys), _curves(db, axis, keys)
        cols = [c for c in _numeric(da, axis) if c in db.columns]
        if any(c in a.labels for c in cols):  # the analysis named the columns worth reading: overlay those
            cols = [c for c in cols if c in a.labels]
        for col in cols:
            fig = go.Figure()
            any_finite = False
            same_all = True
            for series in [s for s in ca if s in cb]:
                ga, gb = ca[series], cb[series]
                if not (ga[axis].is_unique and gb[axis].is_unique):
                    continue
                ya, yb = ga[col].to_numpy(dtype=float), gb[col].to_numpy(dtype=float)
                if not (np.isfinite(ya).any() and np.isfinite(yb).any()):
                    continue
                any_finite = True
                same = len(ga) == len(gb) and bool((ga[axis].to_numpy() == gb[axis].to_numpy()).all())
                same_all &= same
                xa = ga[axis].to_numpy() if same else relative_depth(ga[axis])
                xb = gb[axis].to_numpy() if same else relative_depth(gb[axis])
                tag = f" ({series})" if series else ""
                fig.add_trace(go.Scatter(x=xa, y=ya, mode="lines+markers", name=f"{label_a}{tag}",
                                         line={"dash": "solid"}))
                fig.add_trace(go.Scatter(x=xb, y=yb, mode="lines+markers", name=f"{label_b}{tag}",
                                         line={"dash": "dot"}))
                base = {"analysis": name, "table": tname, "series": series, "column": col}
                if same:
                    for depth, va, vb in zip(ga[axis], ya, yb, strict=True):
                        rows.append({**base, "depth": float(depth), "a": va, "b": vb, "delta": vb - va,
                                     "relative_delta": (vb - va) / abs(va) if va else np.nan})
                else:
                    ma, mb = float(np.nanmean(ya)), float(np.nanmean(yb))
                    rows.append({**base, "depth": None, "a": ma, "b": mb, "delta": mb - ma,
                                 "relative_delta": (mb - ma) / abs(ma) if ma else np.nan})
            if not any_finite:
                continue
            ys = [v for tr in fig.data for v in np.asarray(tr.y, dtype=float) if np.isfinite(v)]
            positive = bool(ys) and min(ys) > 0
            log = positive and max(ys) / max(min(ys), 1e-30) > 100
            what = a.label(col)
            fig.update_layout(xaxis_title=a.label(axis) if same_all else "relative depth (0 = first, 1 = last)",
                              yaxis_title=what + (" (log scale)" if log else ""),
                              yaxis_type="log" if log else "linear", legend={"orientation": "h", "y": -0.2})
            table = a.label(tname)
            title = f"{get_title(name)}: {what}, by {a.label(axis)}" + (
                "" if table == f"per {a.label(axis)}" else f" ({table})")
            figs.append(Figure(title, fig, f"Solid: {label_a}; dotted: {label_b}. Where the curves part is where the "
                                           f"two models differ in {what}."))
    cols_out = ["analysis", "table", "series", "column", "depth", "a", "b", "delta", "relative_delta"]
    return figs, pd.DataFrame(rows, columns=cols_out)


def get_title(name: str) -> str:
    """The analysis' command name for figure titles (``depth-curse``), or the name itself."""
    return REGISTRY[name].command if name in REGISTRY else name


def _side_by_side(meta_a: dict[str, Any], meta_b: dict[str, Any]) -> dict[str, Any]:
    """One settings block for two runs: a value once where they agree, ``A / B`` where they differ."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys([*meta_a, *meta_b]):
        va, vb = meta_a.get(key), meta_b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out[key] = _side_by_side(va, vb)
        elif va == vb:
            out[key] = va
        else:
            out[key] = f"{'none' if va is None else va} / {'none' if vb is None else vb}"
    return out


def compare(lm_a: Any, sample_a: Any, runs_a: list[SuiteRun], lm_b: Any, sample_b: Any,
            runs_b: list[SuiteRun]) -> Result:
    """One page with both models' per-depth curves of every analysis on the same axes, and the deltas."""
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
                rel = (vb - va) / abs(va) if va else float("nan")
                head_rows.append({"analysis": ra.name, "headline": ra.result.label(k), "a": va, "b": vb,
                                  "delta": vb - va, "relative_delta": rel})
    if not figures and not head_rows:
        raise NormscopeError("The two models share no analysis that ran on both; check --only and the models.")
    delta_df = pd.concat([d for d in deltas if len(d)], ignore_index=True) if any(len(d) for d in deltas) else \
        pd.DataFrame()
    heads_df = pd.DataFrame(head_rows, columns=["analysis", "headline", "a", "b", "delta", "relative_delta"])
    same_depth = lm_a.info.n_layers == lm_b.info.n_layers
    summary = [
        f"A = {la} ({lm_a.info.n_layers} layers, solid lines), B = {lb} ({lm_b.info.n_layers} layers, dotted). "
        + ("Both have the same depth, so curves are drawn per layer." if same_depth else
           "Their depths differ, so each curve is drawn against relative depth 0..1 and the deltas compare means."),
        f"{len(figures)} overlaid figures from {len({f.title.split(':')[0] for f in figures})} analyses.",
    ]
    if len(heads_df):
        scaled = heads_df.assign(size=heads_df["relative_delta"].abs().fillna(heads_df["delta"].abs()))
        big = scaled.sort_values("size", ascending=False).head(3)
        summary.append("Largest headline differences (B vs A, relative): " + "; ".join(
            f"{r.analysis} {r.headline}: {r.a:.4g} -> {r.b:.4g}" for r in big.itertuples()) + ".")
    headlines = {f"{r.analysis}: {r.headline} (B - A)": r.delta for r in heads_df.head(8).itertuples()}
    tables = {"headline_deltas": heads_df}
    if len(delta_df):
        tables["layer_deltas"] = delta_df
    meta_a, meta_b = make_meta(lm_a.info, sample_a.to_dict()), make_meta(lm_b.info, sample_b.to_dict())
    meta = _side_by_side(meta_a, meta_b)
    meta["model"]["name"] = f"{la} vs {lb}"
    meta["analyses"] = [r.name for r in runs_a]
    return Result(
        analysis="compare",
        title=f"Compare {la} and {lb}",
        meta=meta,
        payload={"model_a": lm_a.info.spec, "model_b": lm_b.info.spec, "same_depth": same_depth,
                 "headline_deltas": heads_df.to_dict("records"),
                 "layer_deltas": delta_df.to_dict("records") if len(delta_df) else []},
        tables=tables,
        figures=figures,
        headlines=headlines,
        summary=summary,
        references=sorted({ref for r in runs_a if r.result for ref in r.result.references}),
        labels={"layer_deltas": "per-depth deltas", "headline_deltas": "headline deltas",
                **{k: k for k in headlines}},  # the keys are words already
    )
