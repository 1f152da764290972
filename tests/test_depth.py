"""Tests of ``normscope depth-curse``: pure metrics, direct recomputation from ``output_hidden_states`` on tiny
random models, block skipping against a hand-built model without that block, LayerNorm Scaling against edited
gains, a TransformerLens cross-check, the bundled SmolLM2's real norm growth, and bad input through the CLI."""

from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from normscope.analyses import depth
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.losses import token_losses
from normscope.core.models import LoadedModel
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import TokenBatch, sample_from_ids
from tests.tiny import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

runner = CliRunner()


def _lm(model: nn.Module, causal: bool = True) -> LoadedModel:
    info = SimpleNamespace(spec="tiny", slug="tiny", is_causal=causal, to_dict=lambda: {"spec": "tiny"})
    return LoadedModel(model, tiny_tokenizer(), info)  # type: ignore[arg-type]


def _sample(n: int = 6, t: int = 16, batch_size: int = 3, seed: int = 0, pad_last: int = 0):
    """Random token rows; with ``pad_last`` the last rows of each batch are right-padded (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(4, 100, (n, t), generator=g).tolist()
    s = sample_from_ids(rows, ["prose"] * n, batch_size=batch_size)
    if pad_last:
        for b in s.batches:
            b.attention_mask[-1, t - pad_last:] = 0
            b.input_ids[-1, t - pad_last:] = 0
    return s


def _last_block(model: nn.Module) -> nn.Module:
    return find_layout(model).blocks[-1].module


def _direct_points(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, has_final_norm: bool) -> list:
    """Residual points 0..L from ``output_hidden_states``; HF's last entry is after the final norm, so the raw
    output of the last block is read with a plain forward hook instead."""
    caught = {}
    h = _last_block(model).register_forward_hook(
        lambda m, a, o: caught.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h.remove()
    hs = list(out.hidden_states)
    if has_final_norm:
        hs[-1] = caught["h"]
    return [x.float() for x in hs]


# ---- pure functions --------------------------------------------------------------------------------------
def test_angular_distance_matrix_matches_pairwise() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 5, 8, generator=g)
    m = depth.angular_distance_matrix(v)
    assert m.shape == (3, 5, 5)
    for b in range(3):
        for i in range(5):
            for j in range(5):
                cos = float(torch.nn.functional.cosine_similarity(v[b, i].double(), v[b, j].double(), dim=0))
                want = 0.0 if i == j else math.acos(max(-1.0, min(1.0, cos))) / math.pi
                assert m[b, i, j].item() == pytest.approx(want, abs=1e-9)
    # known angles: orthogonal = 0.5, opposite = 1, parallel = 0
    e = torch.eye(2).unsqueeze(0)  # [1, 2, 2]
    assert depth.angular_distance(e[0, 0], e[0, 1]).item() == pytest.approx(0.5)
    assert depth.angular_distance(e[0, 0], -e[0, 0]).item() == pytest.approx(1.0)
    assert depth.angular_distance(e[0, 0], 3 * e[0, 0]).item() == pytest.approx(0.0, abs=1e-7)


def test_last_token_index_never_reads_a_pad() -> None:
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert depth.last_token_index(mask).tolist() == [3, 1, 3, 0]


def test_relative_update_and_token_stats() -> None:
    before = torch.tensor([[[3.0, 4.0]]])  # norm 5
    after = torch.tensor([[[3.0, 5.0]]])
    assert depth.relative_update(before, after).item() == pytest.approx(1 / 5)
    assert depth.token_l2(before).item() == pytest.approx(5.0)
    assert depth.token_variance(before).item() == pytest.approx(0.25)
    q = torch.randn(2, 3, 4, 8)  # qk-norm shaped [batch, pos, heads, d_head]
    assert depth.token_variance(q).shape == (2, 3)
    assert torch.allclose(depth.token_variance(q), q.var(-1, unbiased=False).mean(-1))


def test_fit_growth_recovers_power_law_and_exponential() -> None:
    x = np.arange(0, 20)
    pw = depth.fit_growth(x, 2.7 * (x + 1.0) ** 1.5)
    assert pw.exponent == pytest.approx(1.5, abs=1e-9) and pw.power_r2 == pytest.approx(1.0)
    assert pw.better == "power law" and pw.exp_r2 < 1.0
    ex = depth.fit_growth(x, 3.0 * np.exp(0.2 * x))
    assert ex.rate == pytest.approx(0.2, abs=1e-9) and ex.better == "exponential"
    with pytest.raises(NormscopeError):
        depth.fit_growth([0, 1], [1.0, 2.0])


def test_best_windows_picks_the_smallest_distance() -> None:
    d = np.full((6, 6), 0.5)
    np.fill_diagonal(d, 0.0)
    d[2, 4] = d[4, 2] = 0.05  # blocks 2-3 are nearly identity together
    d[1, 2] = d[2, 1] = 0.01
    w = depth.best_windows(d).set_index("n")
    assert (w.loc[1, "start"], w.loc[1, "end"], w.loc[1, "distance"]) == (1, 1, 0.01)
    assert (w.loc[2, "start"], w.loc[2, "end"]) == (2, 3)
    assert len(w) == 5


def test_quotable_line() -> None:
    import pandas as pd

    blocks = pd.DataFrame({"block": range(10), "rel_update": [0.5] * 6 + [0.01, 0.02, 0.04, 0.03],
                           "skip_delta_loss": [1.0] * 6 + [0.001, float("nan"), 0.015, 0.004]})
    line = depth.quotable_line(blocks, 10)
    assert line.startswith("The deepest 40% of blocks (4 of 10, blocks 6-9)")
    assert "at most 4.0% each" in line and "median 2.5%" in line
    assert "any one of the 3 measured (blocks 6, 8 and 9) costs at most 0.015 nats/token (block 8)" in line
    assert "skipping" not in depth.quotable_line(blocks.drop(columns="skip_delta_loss"), 10)


def test_lns_factor() -> None:
    assert depth.lns_factor(0) == 1.0 and depth.lns_factor(3) == pytest.approx(0.5)


# ---- direct recomputation on tiny models ----------------------------------------------------------------
@pytest.mark.parametrize("factory,final_norm", [(tiny_llama, True), (tiny_gpt2, True), (tiny_bert, False)])
def test_depth_statistics_match_hidden_states(factory, final_norm) -> None:
    model = factory(n_layers=3)
    causal = factory is not tiny_bert
    sample = _sample(pad_last=5)
    r = depth.run(_lm(model, causal), sample, depth.DepthOptions(skip=False, window=0, lns=False))
    n_pts = 4
    norms = {"pos0": [[] for _ in range(n_pts)], "rest": [[] for _ in range(n_pts)]}
    var_rest = [[] for _ in range(n_pts)]
    upd = [[] for _ in range(3)]
    ang = torch.zeros(n_pts, n_pts, dtype=torch.float64)
    n_seq = 0
    for b in sample.batches:
        hs = _direct_points(model, b.input_ids, b.attention_mask, final_norm)
        real = b.attention_mask.bool()
        for p, h in enumerate(hs):
            nrm = h.norm(dim=-1)
            norms["pos0"][p].append(nrm[:, 0][real[:, 0]])
            norms["rest"][p].append(nrm[:, 1:][real[:, 1:]])
            var_rest[p].append(h.var(-1, unbiased=False)[:, 1:][real[:, 1:]])
        for i in range(3):
            u = (hs[i + 1] - hs[i]).norm(dim=-1) / hs[i].norm(dim=-1)
            upd[i].append(u[:, 1:][real[:, 1:]])
        last = real.long().cumsum(1).argmax(1)  # last real token of each row
        for bi in range(len(b)):
            v = torch.stack([h[bi, last[bi]] for h in hs]).double()  # [P, d]
            for i in range(n_pts):
                for j in range(n_pts):
                    if i != j:
                        c = torch.nn.functional.cosine_similarity(v[i], v[j], dim=0).clamp(-1, 1)
                        ang[i, j] += torch.arccos(c) / math.pi
            n_seq += 1
    layers = r.tables["layers"]
    for p in range(n_pts):
        assert layers.loc[p, "norm_rest"] == pytest.approx(float(torch.cat(norms["rest"][p]).mean()), rel=1e-5)
        assert layers.loc[p, "norm_pos0"] == pytest.approx(float(torch.cat(norms["pos0"][p]).mean()), rel=1e-5)
        assert layers.loc[p, "var_rest"] == pytest.approx(float(torch.cat(var_rest[p]).mean()), rel=1e-5)
    for i in range(3):
        assert r.tables["blocks"].loc[i, "rel_update"] == pytest.approx(float(torch.cat(upd[i]).mean()), rel=1e-5)
    got = np.array(r.payload["angular_distance"])
    assert np.allclose(got, (ang / n_seq).numpy(), atol=1e-6)
    assert r.payload["n_tokens"] == int(sum(b.attention_mask.sum() for b in sample.batches))


def test_padding_does_not_change_the_last_token_angles() -> None:
    """A row padded on the right gives the same angles as the same row unpadded and cut short."""
    model = tiny_llama(n_layers=3)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (1, 12), generator=g)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 12, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    s1 = sample_from_ids(ids.tolist(), ["prose"])
    s2 = sample_from_ids(padded.tolist(), ["prose"])
    s2.batches[0].attention_mask.copy_(mask)
    opts = depth.DepthOptions(skip=False, window=0, lns=False)
    a1 = np.array(depth.run(_lm(model), s1, opts).payload["angular_distance"])
    a2 = np.array(depth.run(_lm(model), s2, opts).payload["angular_distance"])
    assert np.allclose(a1, a2, atol=1e-6) and a1[0, -1] > 0.01


def test_attention_and_mlp_parts_match_transformer_lens(tmp_path) -> None:
    """resid_mid from TransformerLens' TransformerBridge (its own model instance) gives the same split."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    model = tiny_llama(n_layers=2)
    folder = save_tiny(tiny_llama(n_layers=2), tiny_tokenizer(), tmp_path / "llama")
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_llama(n_layers=2),
                                                 tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
    sample = _sample(n=4, batch_size=4)
    r = depth.run(_lm(model), sample, depth.DepthOptions(skip=False, window=0, lns=False))
    ids = sample.batches[0].input_ids
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    for i in range(2):
        pre, mid, post = (cache[f"blocks.{i}.hook_resid_{k}"].float() for k in ("pre", "mid", "post"))
        den = pre.norm(dim=-1)[:, 1:]
        attn = ((mid - pre).norm(dim=-1)[:, 1:] / den).mean()
        mlp = ((post - mid).norm(dim=-1)[:, 1:] / den).mean()
        row = r.tables["blocks"].loc[i]
        assert row["rel_update_attn"] == pytest.approx(float(attn), rel=1e-4)
        assert row["rel_update_mlp"] == pytest.approx(float(mlp), rel=1e-4)
        assert row["split"] == "pre_ln"


def test_post_ln_split_reads_the_post_attention_norm() -> None:
    """BERT: the attention part ends at the post-attention LayerNorm's output (renormalisation included)."""
    model = tiny_bert(n_layers=2)
    sample = _sample(n=3, batch_size=3)
    r = depth.run(_lm(model, causal=False), sample, depth.DepthOptions())
    ids, mask = sample.batches[0].input_ids, sample.batches[0].attention_mask
    mids = []
    h = model.encoder.layer[1].attention.output.LayerNorm.register_forward_hook(lambda m, a, o: mids.append(o))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h.remove()
    pre, post = out.hidden_states[1], out.hidden_states[2]
    den = pre.norm(dim=-1)[:, 1:]
    row = r.tables["blocks"].loc[1]
    assert row["split"] == "post_ln"
    assert row["rel_update_attn"] == pytest.approx(float(((mids[0] - pre).norm(dim=-1)[:, 1:] / den).mean()), rel=1e-5)
    assert row["rel_update_mlp"] == pytest.approx(float(((post - mids[0]).norm(dim=-1)[:, 1:] / den).mean()), rel=1e-5)
    assert r.payload["loss"] is None and "skip_loss" not in r.tables["blocks"]  # encoder: no next-token loss
    assert r.payload["lns"] is None  # post-LN: no pre-norm site to scale
    assert "post-LN" in " ".join(r.summary)  # the growth paragraph says why the stream does not grow


def test_parallel_blocks_are_detected() -> None:
    from tests.tiny import tiny_gptneox

    r = depth.run(_lm(tiny_gptneox(n_layers=2)), _sample(n=2), depth.DepthOptions(skip=False, window=0, lns=False))
    assert set(r.tables["blocks"]["split"]) == {"parallel"}


# ---- skipping blocks --------------------------------------------------------------------------------------
def _removed(model: nn.Module, drop: list[int]) -> nn.Module:
    """A hand-built copy of ``model`` whose block list lacks the blocks in ``drop``."""
    m = copy.deepcopy(model)
    layout = find_layout(m)
    parent_path, attr = layout.blocks_path.rsplit(".", 1)
    parent = m.get_submodule(parent_path)
    kept = [b for i, b in enumerate(getattr(parent, attr)) if i not in drop]
    setattr(parent, attr, nn.ModuleList(kept))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(m.config, key):
            setattr(m.config, key, len(kept))
    return m


def _loss(model: nn.Module, sample) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in sample.batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            ce = token_losses(logits, b.input_ids, b.attention_mask)
            tot, n = tot + float(ce.double().sum()), n + ce.numel()
    return tot / n


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_skipping_a_block_equals_a_model_without_it(factory) -> None:
    model = factory(n_layers=4)
    sample = _sample(n=4, batch_size=2)
    r = depth.run(_lm(model), sample, depth.DepthOptions(skip=True, skip_layers="1,3", window=2, lns=False))
    blocks = r.tables["blocks"].set_index("block")
    for i in (1, 3):
        assert blocks.loc[i, "skip_loss"] == pytest.approx(_loss(_removed(model, [i]), sample), rel=1e-5)
    assert np.isnan(blocks.loc[0, "skip_loss"])  # not asked for
    drop = r.payload["drop_window"]
    want = _loss(_removed(model, list(range(drop["start"], drop["end"] + 1))), sample)
    assert drop["n"] == 2 and drop["loss"] == pytest.approx(want, rel=1e-5)
    assert r.payload["loss"] == pytest.approx(_loss(model, sample), rel=1e-6)
    # the skip also gives identical logits, not just the same loss
    layout = find_layout(model)
    cap = Capture(model, layout, find_norm_sites(model, layout))
    depth.skip_interventions(cap, [2])
    b = sample.batches[0]
    with cap, torch.no_grad(), cap.batch(b):
        got = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    with torch.no_grad():
        want_logits = _removed(model, [2])(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                              use_cache=False).logits
    assert torch.allclose(got, want_logits, atol=1e-5)


def _rows(sample, keep: list[int]):
    """A sample of only the sequences ``keep`` (indices in batch order), for a direct recomputation."""
    rows = [r for b in sample.batches for r in b.input_ids.tolist()]
    return sample_from_ids([rows[i] for i in keep], ["prose"] * len(keep), batch_size=3)


def test_skip_losses_on_a_subset_equal_models_without_the_block_on_those_sequences() -> None:
    model = tiny_llama(n_layers=4)
    sample = _sample(n=7, batch_size=3)  # 7 sequences of 16 tokens = 112 tokens
    r = depth.run(_lm(model), sample, depth.DepthOptions(skip_layers="0,2", skip_tokens=40, window=0, lns=False))
    scope = r.payload["skip_scope"]
    keep = [0, 3, 6]  # ceil(40 / 16) = 3 sequences, first, middle and last
    assert scope["sequence_indices"] == keep and scope["tokens"] == 48 and scope["of_tokens"] == 112
    sub = _rows(sample, keep)
    base = _loss(model, sub)
    assert scope["baseline_loss"] == pytest.approx(base, rel=1e-6)
    assert r.payload["loss"] == pytest.approx(_loss(model, sample), rel=1e-6)  # the statistics: every token
    blocks = r.tables["blocks"].set_index("block")
    for i in (0, 2):
        cut = _removed(model, [i])
        assert blocks.loc[i, "skip_loss"] == pytest.approx(_loss(cut, sub), rel=1e-5)
        assert blocks.loc[i, "skip_delta_loss"] == pytest.approx(_loss(cut, sub) - base, rel=1e-4, abs=1e-6)
        # equal-length sequences: the standard error is the textbook one of the per-sequence mean changes
        per_seq = [_loss(cut, _rows(sample, [k])) - _loss(model, _rows(sample, [k])) for k in keep]
        assert blocks.loc[i, "skip_delta_loss_se"] == pytest.approx(np.std(per_seq, ddof=1) / math.sqrt(3),
                                                                    rel=1e-3)
    assert np.isnan(blocks.loc[1, "skip_loss"])
    assert r.headlines["skip_measured_on"] == "48 of 112 tokens"
    assert "48 of the 112 tokens (3 of 7 sequences" in " ".join(r.summary)
    # --skip-tokens 0 measures every token: the change is then the difference of the two full losses
    full = depth.run(_lm(model), sample, depth.DepthOptions(skip_layers="2", skip_tokens=0, window=0, lns=False))
    fb = full.tables["blocks"].set_index("block")
    assert full.payload["skip_scope"]["tokens"] == 112
    assert fb.loc[2, "skip_delta_loss"] == pytest.approx(_loss(_removed(model, [2]), sample) - _loss(model, sample),
                                                         rel=1e-4, abs=1e-6)


def test_spread_subset_and_paired_delta() -> None:
    assert depth.spread_subset(10, 3) == [0, 4, 9]
    assert depth.spread_subset(4, 9) == [0, 1, 2, 3] and depth.spread_subset(5, 1) == [0]
    assert len(depth.spread_subset(32, 8)) == 8 and depth.spread_subset(32, 8)[-1] == 31
    rng = np.random.default_rng(0)
    n = rng.integers(5, 50, size=9)
    base = rng.normal(3, 1, size=9) * n
    other = base + rng.normal(0.2, 0.1, size=9) * n
    d, se = depth.paired_loss_delta(base.tolist(), other.tolist(), n.tolist())
    assert d == pytest.approx((other.sum() - base.sum()) / n.sum())  # token-weighted, as the losses
    # equal lengths: the textbook standard error of the per-sequence mean changes
    e = rng.normal(0.2, 0.1, size=9)
    _, se_eq = depth.paired_loss_delta([0.0] * 9, (e * 16).tolist(), [16] * 9)
    assert se_eq == pytest.approx(np.std(e, ddof=1) / 3)
    # every sequence changing by the same amount per token, whatever its length: no spread, no error
    _, se0 = depth.paired_loss_delta(base.tolist(), (base + 0.25 * n).tolist(), n.tolist())
    assert se0 == pytest.approx(0.0, abs=1e-12) and se > 0
    assert math.isnan(depth.paired_loss_delta([1.0], [2.0], [4])[1])


def test_lns_what_if_equals_scaled_norm_gains() -> None:
    """1/sqrt(l+1) on each pre-norm output equals a copy whose ln1/ln2 gains are scaled by it (RMSNorm: y = w x/rms)."""
    model = tiny_llama(n_layers=3)
    sample = _sample(n=4, batch_size=2)
    r = depth.run(_lm(model), sample, depth.DepthOptions(skip=False, window=0, lns=True))
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(scaled.model.layers):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(1 / math.sqrt(i + 1))
    assert r.payload["lns"]["loss"] == pytest.approx(_loss(scaled, sample), rel=1e-5)
    assert sorted(r.payload["lns"]["scaled_sites"]) == sorted(f"blocks.{i}.ln{k}" for i in range(3) for k in (1, 2))
    # the scaled model's residual norms are what the what-if reports
    hs = _direct_points(scaled, sample.batches[0].input_ids, sample.batches[0].attention_mask, True)
    hs2 = _direct_points(scaled, sample.batches[1].input_ids, sample.batches[1].attention_mask, True)
    want = float(torch.cat([hs[-1][:, 1:].norm(dim=-1).flatten(), hs2[-1][:, 1:].norm(dim=-1).flatten()]).mean())
    assert r.tables["layers"]["lns_norm_rest"].iloc[-1] == pytest.approx(want, rel=1e-5)
    assert "not trained" in " ".join(r.summary).lower()


def test_reducers_keep_nothing_across_batches() -> None:
    acc = depth.AngularAccumulator(2)
    ctx = BatchContext(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), ["a", "b"], 0)
    acc.add(0, torch.randn(2, 3, 4), ctx)
    acc.add(1, torch.randn(2, 3, 4), ctx)
    assert acc.n == 2 and acc._cur == {}  # folded into the [P, P] sum once a batch is complete
    b = TokenBatch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), ["x"])
    assert len(b) == 1


def test_run_rejects_causal_options_on_an_encoder() -> None:
    lm = _lm(tiny_bert(n_layers=2), causal=False)
    for opts, word in ((depth.DepthOptions(skip=True), "--skip"), (depth.DepthOptions(window=1), "--window"),
                       (depth.DepthOptions(lns=True), "--lns"), (depth.DepthOptions(skip_layers="0"), "--skip-layers")):
        with pytest.raises(NormscopeError, match=word):
            depth.run(lm, _sample(n=2), opts)


# ---- the bundled SmolLM2 -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_norm_growth_is_real(smollm2) -> None:
    from normscope.core.text import TextOptions, load_text

    sample = load_text(smollm2.tokenizer, TextOptions(seq_len=64, max_tokens=256, batch_size=4, controls=False),
                       max_positions=smollm2.info.max_positions)
    r = depth.run(smollm2, sample, depth.DepthOptions(skip=True, skip_layers="0,15", window=0, lns=True))
    layers = r.tables["layers"]
    assert 2.3 < layers["norm_rest"].iloc[0] < 3.2  # ~2.7 at the embeddings
    assert layers["norm_rest"].iloc[-2] > 300  # several hundred before the last block
    assert (layers["norm_rest"].diff().iloc[1:] > -0.1 * layers["norm_rest"].iloc[1:]).all()  # grows (nearly) monotone
    # position 0 (massive activation in dim 507 from layer 2 on) sits far above the rest
    assert (layers["norm_pos0"].iloc[13:29] > 20 * layers["norm_rest"].iloc[13:29]).all()
    g = r.payload["growth"][0]
    assert g["exponent"] > 0.8 and max(g["power_r2"], g["exp_r2"]) > 0.7
    blocks = r.tables["blocks"].set_index("block")
    assert blocks.loc[0, "skip_delta_loss"] > 1.0  # block 0 builds the representation: skipping it hurts
    assert blocks.loc[15, "skip_delta_loss"] < blocks.loc[0, "skip_delta_loss"] / 5
    assert 1.5 < r.payload["loss"] < 4.5
    dist = np.array(r.payload["angular_distance"])
    assert dist.shape == (31, 31) and np.allclose(dist, dist.T)
    assert dist[0, 30] > dist[20, 21]  # embeddings to the end turns far more than one deep block
    assert r.payload["lns"]["loss"] != r.payload["loss"]
    assert layers["lns_norm_rest"].iloc[-2] < layers["norm_rest"].iloc[-2]  # 1/sqrt(l) shrinks deep updates


# ---- the command line --------------------------------------------------------------------------------------
def _cli(*args: str):
    from normscope.cli import app

    return runner.invoke(app, ["depth-curse", *args])


def _assert_bad_input(res, *words: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output


def encoder_tokenizer():
    """The tiny tokenizer framed like BERT's: <bos> as [CLS], <eos> as [SEP], <unk> standing in for [MASK]."""
    tok = tiny_tokenizer()
    tok.cls_token, tok.sep_token, tok.mask_token = "<bos>", "<eos>", "<unk>"
    return tok


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth_models")
    return {"llama": save_tiny(tiny_llama(n_layers=3), tiny_tokenizer(), root / "llama"),
            "bert": save_tiny(tiny_bert(n_layers=2), encoder_tokenizer(), root / "bert")}


def test_cli_runs_and_writes_the_report(tiny_folders, tmp_path) -> None:
    res = _cli(str(tiny_folders["llama"]), "--seq-len", "32", "--max-tokens", "256", "--skip-layers", "0-1", "--window",
               "1", "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "depth.html").exists() and (tmp_path / "depth.json").exists()
    assert (tmp_path / "depth_blocks.csv").exists() and (tmp_path / "depth_angular.csv").exists()
    html = (tmp_path / "depth.html").read_text()
    assert "Angular distance" in html and "not trained" in html.lower()
    res = _cli("--help")
    flat = re.sub(r"[\u2502\s]+", " ", res.output)  # unwrap rich's help panel
    assert "one more forward pass per skipped block per batch" in flat


def test_cli_bad_layers_fail_fast() -> None:
    _assert_bad_input(_cli("smollm2-135m", "--skip-layers", "0-x"), "malformed")
    _assert_bad_input(_cli("smollm2-135m", "--skip-layers", "3", "--no-skip"), "--no-skip")


def test_cli_layers_out_of_range(tiny_folders) -> None:
    _assert_bad_input(_cli(str(tiny_folders["llama"]), "--seq-len", "16", "--max-tokens", "64", "--skip-layers", "0-3"),
                      "blocks 0-2")


def test_cli_encoder_with_causal_only_options(tiny_folders, tmp_path) -> None:
    res = _cli(str(tiny_folders["bert"]), "--seq-len", "16", "--max-tokens", "64", "--out", str(tmp_path), "-q")
    assert res.exit_code == 0, res.output  # an encoder runs: norms, updates and angles, no loss
    for extra in (["--skip"], ["--skip-layers", "0"], ["--window", "1"]):
        _assert_bad_input(_cli(str(tiny_folders["bert"]), "--seq-len", "16", "--max-tokens", "64", *extra),
                          "causal LM")


def test_cli_model_without_blocks(tmp_path) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4,
                                         conv_kernel=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)).eval()
    folder = save_tiny(mamba, tiny_tokenizer(), tmp_path / "mamba")
    _assert_bad_input(_cli(str(folder), "--seq-len", "16", "--max-tokens", "64", "--no-skip"),
                      "no transformer blocks")


def test_the_cost_of_the_passes_is_said_before_they_run() -> None:
    from contextlib import contextmanager

    said: list[str] = []

    class Recorder:  # a progressor that records its notes and draws no bars
        def note(self, message: str) -> None:
            said.append(message)

        @contextmanager
        def task(self, name: str, total: float):  # type: ignore[no-untyped-def]
            yield lambda n: None

    model = tiny_llama(n_layers=3)
    depth.run(_lm(model), _sample(n=2), depth.DepthOptions(skip_layers="0,2", window=1, lns=True),
              progress=Recorder())
    assert said == ["depth-curse: 5 forward passes over 32 tokens: statistics 1, skip-one-block 2 (fewer: "
                    "--skip-layers), LayerNorm Scaling 1, 1-block window 1."]
    # on a subset: how many tokens the skip passes read, and what the whole costs in full passes
    said.clear()
    depth.run(_lm(model), _sample(n=4), depth.DepthOptions(skip_layers="all", skip_tokens=16, window=0, lns=False),
              progress=Recorder())
    assert said == ["depth-curse: 4 forward passes, the work of 1.75 over 64 tokens: statistics 1, skip-one-block 3 "
                    "over 16 of the tokens (1 of 4 sequences spread over the text; every token: --skip-tokens 0, "
                    "fewer blocks: --skip-layers)."]

@pytest.mark.parametrize("spec", ["0.5", "inv-sqrt-layer"])
def test_residual_branch_scaling_equals_a_hand_scaled_model(spec: str) -> None:
    """The what-if scales attention and MLP outputs at inference: the same as scaling o_proj and down_proj."""
    from normscope.analyses.depth.options import residual_scale_factors

    model = tiny_llama(n_layers=3)
    sample = _sample(n=4)
    r = depth.run(_lm(model), sample, depth.DepthOptions(skip=False, window=0, lns=False, residual_scale=spec))
    factors = residual_scale_factors(spec, 3)
    assert r.payload["residual_scale"]["factors"] == factors and r.payload["residual_scale"]["scaled_branches"] == 6
    hand = tiny_llama(n_layers=3)
    hand.load_state_dict(model.state_dict())
    with torch.no_grad():
        for f, layer in zip(factors, hand.model.layers, strict=True):
            layer.self_attn.o_proj.weight.mul_(f)
            layer.mlp.down_proj.weight.mul_(f)
    h = depth.run(_lm(hand), sample, depth.DepthOptions(skip=False, window=0, lns=False))
    assert np.allclose(r.tables["layers"]["rs_norm_rest"], h.tables["layers"]["norm_rest"], rtol=1e-5)
    assert np.allclose(r.tables["layers"]["rs_var_rest"], h.tables["layers"]["var_rest"], rtol=1e-5)
    assert r.headlines["residual_scale_delta_loss"] == pytest.approx(h.payload["loss"] - r.payload["loss"], abs=1e-4)
    assert any("not trained that way" in line for line in r.summary)
    assert "Residual-branch scaling what-if" in [f.title for f in r.figures]


def test_residual_scale_spelling_is_checked_before_loading() -> None:
    for bad, words in (("-1", "positive"), ("fast", "a number or one of")):
        with pytest.raises(NormscopeError, match=words):
            depth.DepthOptions(residual_scale=bad).check()
