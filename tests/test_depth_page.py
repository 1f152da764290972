"""Tests of the depth page's fixes (issue 10 item 6): skip bars one block wide on a sign-keeping axis, sentences
right for one and few skipped blocks, headline labels in words, and the explanation of the flat variance of
positions > 0 by later-position massive activations, which appears only when the data shows them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from normscope.analyses import depth
from normscope.analyses.depth import metrics, reducers, summary
from normscope.core.capture import BatchContext
from normscope.core.models import LoadedModel
from normscope.core.text import sample_from_ids
from tests.tiny import tiny_llama, tiny_tokenizer


def _blocks(n: int, skipped: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame({"block": range(n), "rel_update": np.linspace(0.5, 0.05, n),
                         "skip_delta_loss": [skipped.get(i, float("nan")) for i in range(n)]})


# ---- the skip-one-block figure --------------------------------------------------------------------------
def test_skip_bars_are_one_block_wide_when_three_blocks_are_skipped() -> None:
    from normscope.analyses.depth.report import BAR_WIDTH, skip_figure

    fig = skip_figure(_blocks(30, {0: 8.056, 15: 0.153, 29: -0.02}), 30, 3.096)
    bar = fig.data[0]
    assert list(bar.x) == [0, 15, 29]
    assert bar.width == BAR_WIDTH <= 1  # one block, not the 14-block gap plotly would fill
    assert tuple(fig.layout.xaxis.range) == (-0.5, 29.5)  # every block has its slot on the axis


def test_skip_axis_keeps_small_and_negative_changes_visible() -> None:
    from normscope.analyses.depth.report import HELPS, HURTS, skip_figure, symlog, symlog_ticks

    fig = skip_figure(_blocks(4, {0: 8.0, 1: 0.002, 2: -0.05, 3: 0.0}), 4, 3.0)
    bar = fig.data[0]
    y = np.asarray(bar.y, dtype=float)
    assert y[0] > y[1] > 0 > y[2] and y[3] == 0  # sign kept, order kept, a small change above zero
    assert y[1] > 0.02 * y[0]  # on a linear axis 0.002 next to 8 would be 0.025% of the bar: invisible
    assert [float(v) for v in np.asarray(bar.customdata)[:, 0]] == [8.0, 0.002, -0.05, 0.0]  # hover: real values
    assert list(bar.marker.color) == [HURTS, HURTS, HELPS, HURTS]
    assert fig.layout.yaxis.type != "log"  # a log axis drops zero and negative values
    assert "0" in fig.layout.yaxis.ticktext and "-0.01" in fig.layout.yaxis.ticktext
    # the transform itself: odd, zero at zero, monotone
    v = np.array([-10.0, -0.01, 0.0, 0.001, 0.01, 1.0, 10.0])
    s = symlog(v)
    assert s[2] == 0 and np.all(np.diff(s) > 0) and np.allclose(symlog(-v), -s)
    vals, text = symlog_ticks([0.5, 2.0])
    assert text == ["0", "+0.01", "+0.1", "+1", "+10"] and vals[0] == 0


# ---- sentences ----------------------------------------------------------------------------------------
def test_quotable_line_for_one_measured_block() -> None:
    line = depth.quotable_line(_blocks(30, {29: 1.798}), 30)
    assert "any one of the 1 measured" not in line
    assert "of these only block 29 was skipped, and skipping it costs 1.798 nats/token." in line
    line = depth.quotable_line(_blocks(30, {0: 8.0, 20: 0.1, 29: 1.798}), 30)
    assert "skipping any one of the 2 measured (blocks 20 and 29) costs at most 1.798 nats/token (block 29)" in line


def test_quotable_line_for_few_blocks_and_negative_costs() -> None:
    one = depth.quotable_line(_blocks(1, {0: 0.4}), 1)
    assert one.startswith("The only block changes the residual stream") and "skipping it costs 0.400" in one
    two = depth.quotable_line(_blocks(2, {1: -0.03}), 2)
    assert two.startswith("The deepest block (block 1 of 0-1) changes")
    assert "skipping it lowers the loss by 0.030 nats/token" in two
    many = depth.quotable_line(_blocks(10, {i: -0.01 for i in range(10)}), 10)
    assert "lowers the loss in every case, by at least 0.010" in many


def test_skip_line_for_one_and_for_several_blocks() -> None:
    one = summary.skip_line(_blocks(30, {15: 0.153}), 3.096)
    assert one == "Layer effectiveness: skipping block 15 (identity) on this text raises the loss from 3.096 by " \
                  "0.153 nats/token."
    few = summary.skip_line(_blocks(30, {0: 8.056, 15: 0.153, 29: -0.02}), 3.096)
    assert "at the median over the 3 blocks skipped (blocks 0, 15 and 29)" in few
    assert "block 0 is the costliest (+8.056)" in few
    assert "skipping lowers the loss for 1 of them (most for block 29: -0.020)" in few


# ---- massive activations at positions > 0 ---------------------------------------------------------------
def test_massive_tokens_follow_sun_et_al() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 64, generator=g)  # median |h| ~ 0.67
    h[0, 0, 7] = 3000.0  # position 0
    h[1, 3, 9] = -2500.0  # a later position, negative sign: magnitude counts
    h[1, 2, 4] = 90.0  # large, but not above 100
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 4] = 0
    h[0, 4, 1] = 5000.0  # a pad is never massive
    m, top, dim = metrics.massive_tokens(h, mask)
    assert m.nonzero().tolist() == [[0, 0], [1, 3]]
    assert float(top[1, 3]) == 2500.0 and int(dim[1, 3]) == 9
    med = h.abs()[mask.bool()].median()
    assert not bool(metrics.massive_tokens(h, mask, ratio=float(3000 / med) + 1)[0].any())


def test_massive_reducer_counts_later_tokens_and_leaves_them_out_of_the_typical_moments() -> None:
    acc = reducers.MassiveActivations(2)
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(10).reshape(2, 5)
    for bi in range(2):  # two batches of two rows
        h = torch.randn(2, 5, 32, generator=g)
        if bi == 1:
            h[1, 2, 5] = 4000.0
        ctx = BatchContext(ids, torch.ones(2, 5, dtype=torch.long), ["a", "b"], bi)
        for p in range(2):
            acc.add(p, h, metrics.token_l2(h), metrics.token_variance(h), ctx)
        if bi == 1:
            rest = torch.ones(2, 5, dtype=torch.bool)
            rest[:, 0] = False
            rest[1, 2] = False
            want_var = metrics.token_variance(h)[rest]
    assert acc.n_rest.tolist() == [1.0, 1.0] and acc.n_pos0.tolist() == [0.0, 0.0]
    assert acc.n_typical.tolist() == [15.0, 15.0]  # 2 batches x 2 rows x 4 later positions, minus one
    (occ,) = acc.top_occurrences()
    assert (occ.sequence, occ.position, occ.token_id, occ.dim, occ.max_abs) == (3, 2, 7, 5, 4000.0)
    assert (occ.first_point, occ.last_point) == (0, 1)
    assert acc.max_abs_rest[0] == 4000.0 and int(acc.max_dim_rest[0]) == 5
    assert acc.typical_mean(0, "var") < float(want_var.max()) * 2  # the 4000 token is not in it


def _layers(massive_rest: list[int], var_rest: list[float], typical: list[float], norm: list[float]) -> pd.DataFrame:
    n = len(massive_rest)
    return pd.DataFrame({"point": range(n), "n_rest": [2016] * n, "massive_rest": massive_rest, "var_rest": var_rest,
                         "var_rest_typical": typical, "norm_rest": norm})


def test_variance_explanation_appears_only_with_later_position_outliers() -> None:
    empty = pd.DataFrame(columns=["sequence", "position", "token", "token_id", "dim", "max_abs", "first_point",
                                  "last_point"])
    none = _layers([0] * 5, [1, 2, 4, 8, 16], [1, 2, 4, 8, 16], [10, 14, 20, 28, 40])
    assert summary.massive_line(none, empty) is None
    flat = _layers([0, 1, 1, 1, 1], [10, 529, 560, 700, 988], [10, 39, 100, 300, 500], [70, 149, 250, 400, 546])
    occ = pd.DataFrame([{"sequence": 5, "position": 1, "token": "\n", "token_id": 198, "dim": 507,
                         "max_abs": 23852.0, "first_point": 1, "last_point": 4}])
    line = summary.massive_line(flat, occ)
    assert line is not None
    assert "at layers 1 to 4, 1 of the 2,016 tokens at positions > 0 ('\\n' at position 1 of sequence 5) carries " \
           "a massive activation, |h| up to 23,852 in dim 507." in line
    assert "This is why the variance curve of positions > 0 stays nearly flat while their norm grows: that one " \
           "token has a variance over the hidden dims of about" in line
    assert "the mean goes only from 529 to 988 (x1.9)" in line and "Without it the variance goes from 39.0 to 500 " \
           "(x12.8)" in line
    # outliers that do not flatten the curve are described, but not as the reason for a flat curve
    grows = _layers([0, 1, 1, 1, 1], [10, 60, 200, 600, 1000], [10, 39, 150, 500, 900], [70, 149, 250, 400, 546])
    text = summary.massive_line(grows, occ)
    assert text is not None and "This is why" not in text


def _lm(model: torch.nn.Module) -> LoadedModel:
    info = SimpleNamespace(spec="tiny", slug="tiny", is_causal=True, to_dict=lambda: {"spec": "tiny"})
    return LoadedModel(model, tiny_tokenizer(), info)  # type: ignore[arg-type]


def test_tiny_run_has_words_for_every_headline_and_no_massive_sentence() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, 100, (4, 16), generator=g).tolist()
    r = depth.run(_lm(tiny_llama(n_layers=4)), sample_from_ids(rows, ["prose"] * 4, batch_size=2),
                  depth.DepthOptions(skip_layers="3", window=2, lns=False))
    for key in r.headlines:
        assert "_" not in r.label(key), key  # snake_case keys stay the JSON keys, the page shows words
    assert "drop_2_blocks" in r.headlines and "cheapest 2 consecutive" in r.label("drop_2_blocks")
    layers = r.tables["layers"]
    assert (layers["massive_rest"] == 0).all() and "massive" not in r.tables  # a random tiny model has none
    assert np.allclose(layers["var_rest_typical"], layers["var_rest"], rtol=1e-9)
    assert not any("Massive activations" in s for s in r.summary)
    assert "of these only block 3 was skipped" in r.summary[0]
    assert r.summary[2] .startswith("Layer effectiveness: skipping block 3 (identity)")


@pytest.mark.slow
def test_smollm2_later_position_massive_activation_explains_the_flat_variance(smollm2) -> None:
    """On the built-in text (2,048 tokens at T = 64) a '\\n' at position 1 carries |h| ~ 23,850 in dim 507 from
    layer 12 on: it alone holds the mean variance of positions > 0 up, so that mean grows far less than the norm."""
    from normscope.core.text import TextOptions, load_text

    sample = load_text(smollm2.tokenizer, TextOptions(), max_positions=smollm2.info.max_positions, is_causal=True)
    r = depth.run(smollm2, sample, depth.DepthOptions(skip=False, window=0, lns=False))
    layers = r.tables["layers"].set_index("point")
    assert (layers.loc[12:28, "massive_rest"] >= 1).all() and (layers.loc[12:28, "max_abs_rest_dim"] == 507).all()
    assert layers.loc[12:28, "max_abs_rest"].min() > 20_000
    m = r.tables["massive"]
    assert "\n" in set(m["token"]) and (m["dim"] == 507).any()
    # without the massive tokens the variance grows with the norm; with them it barely moves
    assert layers.loc[27, "var_rest_typical"] / layers.loc[12, "var_rest_typical"] > 5
    assert layers.loc[27, "var_rest"] / layers.loc[12, "var_rest"] < 2.5
    text = " ".join(r.summary)
    assert "This is why the variance curve of positions > 0 stays nearly flat" in text and "dim 507" in text
