"""--dtype bfloat16 / float16: every analysis runs in the model's half precision and folds its statistics in
float32/float64, so its numbers stay within a stated distance of the float32 run.

Tolerances, from measurement (CPU, torch 2.13, the 3-block tiny Llama below and the bundled SmolLM2) with a
margin of about 2x: bfloat16 keeps 8 significant bits, so one rounding moves a value by up to 2^-8 = 0.4% of
itself; a forward pass compounds a few of them, and means over tokens average most of them out. Each error is
measured against the scale of its column (max |float32 value| over the rows of the table), so that a signed mean
near 0 (a component's mean DLA) is not judged by its own tiny size.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import normscope
from normscope.analyses import RunContext
from normscope.core.models import load_model
from normscope.core.options import TextOptions
from normscope.core.text import load_text
from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer

ANALYSES = ("sinks", "depth", "grads", "dla")
OPTIONS = {"dla": {"neurons": 2, "backend": "direct"}}
# Largest column-scaled error measured in bfloat16 was 1.2e-2 (dla's mean DLA per component and its NMAE at
# position 0, both from bf16 component outputs), 7e-3 for depth's skip-one-block loss change, 3e-3 to 4e-3 for
# norms, variances, top-|h| values, divisor shares and gradient norms (float16 keeps 11 bits: 10x smaller).
DEFAULT_TOL = 2e-2
TOL = {
    # a median over ~60 tokens of a per-token entropy change: one token's rounding moves it (measured 4.8e-2).
    # Before the ablation's logits were computed in float32 these were 50-90% off in bfloat16.
    "median_abs_delta_entropy": 1e-1,
}
# Absolute floors, in the column's own unit, under which a difference is rounding whatever the column's scale.
# The tiny random model's neurons move entropy by ~1e-5 nats (a real confidence neuron: 1e-2 to 5e-2), so one
# half-precision rounding of the hidden state is 10-15% of that column: CI measured 1.4e-6 nats (0.13 of the
# column) in float16 on one machine and under 0.1 on another. 1e-5 nats is 1/1000 of a real neuron's effect.
FLOOR = {"median_abs_delta_entropy": 1e-5, "mean_abs_delta_entropy": 1e-5}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tiny_llama(n_layers=3), tiny_tokenizer(), tmp_path_factory.mktemp("half") / "llama")


def _results(folder: Path, dtype: str) -> dict[str, normscope.Result]:
    lm = load_model(str(folder), dtype=dtype, device="cpu", for_training=True)
    assert next(lm.model.parameters()).dtype == getattr(torch, dtype)  # --dtype is the model's dtype
    sample = load_text(lm.tokenizer, TextOptions(seq_len=16, max_tokens=128, batch_size=4), max_positions=64)
    ctx = RunContext.build(lm, sample)
    return {n: normscope.run(n, ctx, **OPTIONS.get(n, {})) for n in ANALYSES}


@pytest.fixture(scope="module")
def fp32(folder: Path) -> dict[str, normscope.Result]:
    return _results(folder, "float32")


def _column_errors(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    """max |a - b| / max |a| for every float column of two tables of one analysis; a column whose largest
    difference is under its absolute floor (FLOOR) counts as 0."""
    out = {}
    for c in a.columns:
        if not pd.api.types.is_float_dtype(a[c]):
            continue
        x, y = a[c].astype(float), b[c].astype(float)
        scale = float(x.abs().max())
        if scale and not math.isnan(scale):
            diff = float((x - y).abs().max())
            out[c] = 0.0 if diff <= FLOOR.get(c, 0.0) else diff / scale
    return out


def test_column_errors_scale_by_the_column_and_forgive_only_under_the_floor() -> None:
    a = pd.DataFrame({"v": [2.0, -4.0], "median_abs_delta_entropy": [1e-5, 2e-5], "n": [1, 2]})
    b = pd.DataFrame({"v": [2.2, -4.0], "median_abs_delta_entropy": [1.2e-5, 2e-5], "n": [1, 2]})
    assert _column_errors(a, b) == {"v": pytest.approx(0.05), "median_abs_delta_entropy": 0.0}
    b.loc[0, "median_abs_delta_entropy"] = 5e-5  # 4e-5 nats off: over the floor, judged by the column's scale
    assert _column_errors(a, b)["median_abs_delta_entropy"] == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tables_stay_within_the_stated_tolerance(dtype: str, folder: Path,
                                                                 fp32: dict[str, normscope.Result]) -> None:
    half = _results(folder, dtype)
    checked = 0
    for name in ANALYSES:
        assert half[name].meta["model"]["dtype"] == dtype and not half[name].payload["nonfinite"]
        for tname, table in fp32[name].tables.items():
            other = half[name].tables[tname]
            assert list(other.columns) == list(table.columns) and len(other) == len(table), (name, tname)
            for col, err in _column_errors(table, other).items():
                assert err <= TOL.get(col, DEFAULT_TOL), f"{name}.{tname}.{col}: {err:.3g} ({dtype})"
                checked += 1
    assert checked > 100  # every float column of every table, not a handful


def test_hubness_runs_in_bfloat16_on_float32_matrices(folder: Path) -> None:
    """k-NN hubness is discrete: bf16 moves distances by ~0.4%, which reorders near-tied neighbours of a random
    model, so its scores are not compared to float32. What must hold: the run works, the representation
    matrices it searches are float32, and every token appears in exactly k neighbour lists on average."""
    lm = load_model(str(folder), dtype="bfloat16", device="cpu")
    sample = load_text(lm.tokenizer, TextOptions(seq_len=16, max_tokens=128, batch_size=4), max_positions=64)
    res = normscope.run("hubness", RunContext.build(lm, sample), k=3)
    pts = res.tables["points"]
    assert len(pts) and (pts["n_tokens"] == 128).all() and pts["skewness"].notna().all()
    from normscope.analyses.hubness.reducers import MatrixCollector
    from normscope.core.capture import BatchContext

    col = MatrixCollector(4)
    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)  # [batch, pos, d]
    col.update(x, BatchContext(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), ["p"], 0))
    assert col.take().dtype == torch.float32


@pytest.mark.slow
def test_smollm2_sinks_headlines_survive_bfloat16() -> None:
    """SmolLM2's phenomena in bfloat16: dim 507's massive activation at position 0 in the same layers with the same
    value to bf16's spacing (measured 0.66%: 24,740 in float32 is 24,576 in bfloat16, whose step there is 128),
    alpha_1 per layer to 0.01 absolute (measured 6.4e-3 at the last layer, under 2e-3 elsewhere), and the
    top-1 |h| in the same dim and position in every layer where it is that large."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model("smollm2-135m", dtype=dtype, device="cpu")
        sample = load_text(lm.tokenizer, TextOptions(seq_len=64, max_tokens=128, batch_size=2),
                           max_positions=lm.info.max_positions)
        runs[dtype] = normscope.run("sinks", RunContext.build(lm, sample))
    a, b = (runs[d].tables["layers"] for d in ("float32", "bfloat16"))
    assert (a["alpha1_mean"] - b["alpha1_mean"]).abs().max() <= 1e-2
    massive = a["top1_abs"] > 10_000
    assert massive.sum() >= 15  # layers 11-27 carry the ~24k activation at position 0
    assert (a["top1_dim"][massive] == 507).all() and (b["top1_dim"][massive] == 507).all()
    assert (a["top1_position"][massive] == b["top1_position"][massive]).all()
    ma, mb = (runs[d].tables["massive_activations"] for d in ("float32", "bfloat16"))

    def at507(m: pd.DataFrame) -> pd.Series:
        return m[(m["dim"] == 507) & (m["position"] == 0)].set_index("layer")["value"]

    va, vb = at507(ma), at507(mb)
    assert len(va) >= 15 and list(va.index) == list(vb.index)
    assert ((va - vb).abs() / va.abs()).max() <= 1e-2
    assert runs["bfloat16"].headlines["massive_dims"] == runs["float32"].headlines["massive_dims"]
