"""Tests of ``normscope hubness``: the blocked k-NN against brute force, the hubness measures against scipy and
their definitions on hand-made point sets, the analysis against hidden states computed independently, and the
phenomena the bundled SmolLM2 really shows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from normscope.analyses import hubness as hb
from normscope.core.errors import NormscopeError
from normscope.core.models import LoadedModel, ModelInfo
from normscope.core.text import TextOptions, load_text
from tests.tiny import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer


# ---- helpers -------------------------------------------------------------------------------------------
def brute_knn(x: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """Full N x N float64 distance matrix, self excluded: the reference the blocked search must reproduce."""
    x = x.double()
    if metric == "euclidean":
        dist = torch.cdist(x, x)
    else:
        xn = x / x.norm(dim=1, keepdim=True)
        dist = 1 - xn @ xn.T
    dist.fill_diagonal_(float("inf"))
    return dist.topk(k, largest=False).indices


def tiny_lm(model: torch.nn.Module, arch: str = "llama", causal: bool = True) -> LoadedModel:
    cfg = model.config
    info = ModelInfo(spec="tiny", name="tiny", slug="tiny", source="folder", architecture=arch,
                     n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                     is_causal=causal, max_positions=64, dtype="float32", device="cpu")
    return LoadedModel(model, tiny_tokenizer(), info)


def tiny_sample(n_tokens: int = 512, seq_len: int = 32, batch_size: int = 4, causal: bool = True):
    return load_text(tiny_tokenizer(), TextOptions(seq_len=seq_len, max_tokens=n_tokens, batch_size=batch_size),
                     max_positions=64, is_causal=causal)


# ---- k-NN ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("block_size", [7, 64, 1000])
def test_blocked_knn_equals_brute_force(metric: str, block_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(150, 20, generator=gen, dtype=torch.float64) * (1 + 3 * torch.rand(150, 1, generator=gen))
    x[:5] += 40.0  # a far-away group, like position 0 with its massive activation
    idx = hb.knn_indices(x, 6, metric, block_size=block_size)
    ref = brute_knn(x, 6, metric)
    assert torch.equal(idx.sort(dim=1).values, ref.sort(dim=1).values)
    assert not (idx == torch.arange(150)[:, None]).any()  # self excluded
    assert torch.equal(hb.k_occurrence(idx, 150), torch.bincount(ref.flatten(), minlength=150))


def test_knn_against_a_gallery_by_dot_product() -> None:
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(40, 8, generator=gen), torch.randn(300, 8, generator=gen)
    idx = hb.knn_indices(q, 5, "dot", gallery=g, block_size=16)
    ref = (q.double() @ g.double().T).topk(5, dim=1).indices
    assert torch.equal(idx.sort(dim=1).values, ref.sort(dim=1).values)


def test_knn_rejects_k_too_large() -> None:
    with pytest.raises(ValueError):
        hb.knn_indices(torch.randn(5, 3), 5, "euclidean")


def test_ties_do_not_make_artificial_hubs() -> None:
    # 30 copies each of 4 vectors (repeated tokens in the embeddings): every point ties with 29 others
    base = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    x = base.repeat_interleave(30, dim=0)
    nk = hb.k_occurrence(hb.knn_indices(x, 5, "euclidean"), x.shape[0])
    assert nk.sum() == 5 * 120
    assert nk.max() < 20  # lowest-index tie breaking would give 29 per group leader


# ---- hubness measures ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=60), min_size=3, max_size=80).filter(lambda v: len(set(v)) > 1))
def test_measures_match_scipy_and_definitions(values: list[int]) -> None:
    nk = torch.tensor(values)
    x = np.array(values, dtype=float)
    k = 5
    s = hb.hubness_scores(nk, k)
    assert s["skewness"] == pytest.approx(float(scipy.stats.skew(x, bias=True)), rel=1e-9, abs=1e-9)
    if x.sum() > 0:
        assert s["robin_hood"] == pytest.approx(0.5 * np.abs(x - x.mean()).sum() / x.sum(), rel=1e-12)
        pairwise = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) * x.sum())  # scikit-hubness' Gini
        assert s["gini"] == pytest.approx(pairwise, rel=1e-9, abs=1e-12)
        assert s["atkinson"] == pytest.approx(1 - np.mean(np.sqrt(x)) ** 2 / x.mean(), rel=1e-9, abs=1e-12)
        assert s["hub_occurrence"] == pytest.approx(x[x >= 2 * k].sum() / x.sum())
    assert s["antihub_share"] == pytest.approx(float((x == 0).mean()))
    assert s["n_hubs"] == int((x >= 2 * k).sum())
    assert s["max_nk"] == int(x.max())


def test_known_hub_at_the_centre_of_a_sphere() -> None:
    # 200 points on the unit sphere in 200 dims and one at its centre: the centre is every point's nearest
    # neighbour (distance 1 against about sqrt(2) between sphere points).
    n = 200
    pts = torch.randn(n, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = torch.cat([torch.zeros(1, 200, dtype=torch.float64), pts / pts.norm(dim=1, keepdim=True)])
    nk = hb.k_occurrence(hb.knn_indices(x, 1, "euclidean"), n + 1)
    assert int(nk[0]) == n
    assert int(nk.sum()) == n + 1
    s = hb.hubness_scores(nk, 1)
    assert s["max_nk"] == n and s["n_hubs"] == 1
    assert s["hub_occurrence"] == pytest.approx(n / (n + 1))
    assert s["antihub_share"] == pytest.approx((n - 1) / (n + 1))
    assert s["skewness"] == pytest.approx(float(scipy.stats.skew(nk.numpy().astype(float))))
    assert s["skewness"] > 10


def test_known_hub_in_cosine() -> None:
    # a direction v and 100 noisy copies of it: v itself is the most similar to every copy
    gen = torch.Generator().manual_seed(4)
    v = torch.zeros(400, dtype=torch.float64)
    v[0] = 1.0  # copies have cos ~0.71 with v and ~0.5 +- 0.03 with each other
    x = torch.cat([v[None], v[None] + 0.05 * torch.randn(100, 400, generator=gen, dtype=torch.float64)])
    nk = hb.k_occurrence(hb.knn_indices(x, 1, "cosine"), 101)
    assert int(nk[0]) == 100
    assert hb.hubness_scores(nk, 1)["skewness"] > 9


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_uniform_ring_has_no_hubness(metric: str) -> None:
    angles = torch.arange(24, dtype=torch.float64) * (2 * torch.pi / 24)
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    nk = hb.k_occurrence(hb.knn_indices(x, 2, metric), 24)
    assert torch.equal(nk, torch.full((24,), 2))
    s = hb.hubness_scores(nk, 2)
    assert s["skewness"] == 0.0 and s["robin_hood"] == 0.0 and s["gini"] == 0.0
    assert s["antihub_share"] == 0.0 and s["hub_occurrence"] == 0.0 and s["atkinson"] == pytest.approx(0.0)


def test_layer_parsing_and_grouping() -> None:
    assert hb.default_layers(30) == [0, 6, 12, 17, 23, 29]  # 6 blocks, first to last: 32 points on SmolLM2
    assert hb.default_layers(2) == [0, 1] and hb.default_layers(6) == list(range(6))
    assert len(hb.default_layers(80)) == 6 and hb.default_layers(80)[-1] == 79
    assert hb.parse_layers("0,3,10-12,-1", 30) == [0, 3, 10, 11, 12, 29]
    assert hb.parse_layers("all", 3) == [0, 1, 2]
    assert hb.parse_layers(None, 3) is None
    for bad in ("x", "40", "3-"):
        with pytest.raises(NormscopeError):
            hb.parse_layers(bad, 30)
    pts = [hb.Point(f"p{i}", 0, "resid_post") for i in range(7)]
    groups = hb.group_points(pts, bytes_per_point=2**20, memory_mb=3)
    assert [len(g) for g in groups] == [3, 3, 1]


# ---- the analysis on a tiny model, against an independent computation ----------------------------------
def test_run_matches_hidden_states_and_logits() -> None:
    model = tiny_llama()
    lm, sample = tiny_lm(model), tiny_sample()
    k = 4
    res = hb.run(lm, sample, hb.HubnessOptions(k=k, layers=[0, 1], top_hubs=5, memory_mb=0.6))
    pts = res.tables["points"]
    assert res.payload["n_passes"] > 1  # the memory cap split the points over several passes
    # independent: hidden states from transformers itself, every sequence of the sample (controls included:
    # the sample, not the analysis, decides what is measured)
    ids, hs, logits = [], [], []
    for b in sample.iter_batches():
        with torch.no_grad():
            out = model(input_ids=b.input_ids, output_hidden_states=True)
        ids.append(b.input_ids.flatten())
        hs.append([h.flatten(0, 1) for h in out.hidden_states])
        logits.append(out.logits.flatten(0, 1))
    hidden = [torch.cat([h[j] for h in hs]) for j in range(len(hs[0]))]
    assert res.payload["n_tokens"] == hidden[0].shape[0]
    for label, x in (("blocks.0.resid_post", hidden[1]), ("blocks.0.ln1.in", hidden[0]),
                     ("ln_final.out", hidden[-1])):
        for metric in ("euclidean", "cosine"):
            # identical states (the same character at position 0 of two sequences) tie exactly, and ties are
            # drawn at random, so the reference search runs on the independently computed states with the same
            # seeded tie-breaking; the search itself is checked against brute force above
            nk = hb.k_occurrence(hb.knn_indices(x.float(), k, metric), x.shape[0])
            want = hb.hubness_scores(nk, k)
            row = pts[(pts["point"] == label) & (pts["metric"] == metric)].iloc[0]
            for key in ("skewness", "robin_hood", "antihub_share", "hub_occurrence", "gini"):
                assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (label, metric, key)
    # the block output of the last block and the final norm's input are the same tensor
    a = pts[pts["point"] == "blocks.1.resid_post"].set_index("metric")["skewness"]
    b = pts[pts["point"] == "ln_final.in"].set_index("metric")["skewness"]
    assert a.to_dict() == b.to_dict()
    # context-unembedding hubs: vocabulary items in the top-k logits of the model itself
    top = torch.cat(logits).topk(k, dim=1).indices
    nk_vocab = torch.bincount(top.flatten(), minlength=model.config.vocab_size)
    un = res.tables["unembedding_hubs"]
    for r in un.itertuples():
        assert r.n_k == int(nk_vocab[r.token_id])
    assert res.payload["context_unembedding"]["skewness"] == pytest.approx(hb.skewness(nk_vocab), rel=1e-9)
    # side by side: one row per norm site and metric
    eff = res.tables["norm_effect"]
    assert set(eff["site"]) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"}
    assert len(eff) == 10
    json.dumps(res.to_json_dict())


def test_too_large_k_is_one_clear_error() -> None:
    lm, sample = tiny_lm(tiny_llama()), tiny_sample(n_tokens=64)
    with pytest.raises(NormscopeError, match="--k 500"):
        hb.run(lm, sample, hb.HubnessOptions(k=500))


def test_cli_bad_k_and_report(tmp_path) -> None:
    from normscope.cli import app

    folder = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")
    runner = CliRunner()
    bad = runner.invoke(app, ["hubness", str(folder), "--k", "100000", "--max-tokens", "128", "--seq-len", "32",
                              "--quiet", "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2
    assert "--k" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(app, ["hubness", str(folder), "--k", "3", "--max-tokens", "256", "--seq-len", "32",
                             "--metric", "cosine", "--quiet", "--out", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "r" / "hubness.json").read_text())
    assert data["metrics"] == ["cosine"] and data["k"] == 3
    assert (tmp_path / "r" / "hubness.html").exists() and (tmp_path / "r" / "hubness_norm_effect.csv").exists()


def test_encoder_runs_without_the_unembedding_part() -> None:
    lm = tiny_lm(tiny_bert(), arch="bert", causal=False)
    res = hb.run(lm, tiny_sample(n_tokens=256), hb.HubnessOptions(k=3, metric="cosine"))
    assert res.payload["context_unembedding"] is None
    assert len(res.tables["points"]) > 0


# ---- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_position0_is_an_island_and_prediction_hubs_are_frequent(smollm2) -> None:
    """From block ~3 on, position 0 carries the ~22,500 massive activation in dim 507: first tokens are each
    other's neighbours (with the odd early delimiter that carries the activation too, such as a second newline)
    and nobody else's, so they are never hubs; the hubs of contexts against the unembedding are frequent tokens
    (Nielsen et al. 2025)."""
    sample = load_text(smollm2.tokenizer, TextOptions(seq_len=64, max_tokens=1024, batch_size=8),
                       max_positions=8192, is_causal=True)
    res = hb.run(smollm2, sample, hb.HubnessOptions(k=10, layers=[12]))
    pts = res.tables["points"]
    n_seq = int((hb._token_meta(sample).pos == 0).sum())
    assert n_seq > 10
    resid = pts[pts["point"] == "blocks.12.resid_post"].set_index("metric")
    for metric in ("euclidean", "cosine"):
        assert resid.loc[metric, "pos0_neighbours_pos0"] >= 0.8  # first tokens see first tokens
        assert resid.loc[metric, "pos0_mean_nk"] <= n_seq  # ... and only the island sees them
        assert resid.loc[metric, "top_hubs_pos0"] == 0
        assert resid.loc[metric, "skewness"] > 1  # pronounced hubness among the other tokens
    un = res.tables["unembedding_hubs"]
    assert (un["frequency_rank_in_text"].fillna(10**9) <= 20).sum() >= 4
    assert res.payload["context_unembedding"]["skewness"] > 10


# ---- the command line and the page -----------------------------------------------------------------------
def test_cli_backwards_layers_refused_in_one_line_before_loading(tmp_path) -> None:
    """``--layers 5-3`` once crashed with a KeyError after a forward pass; it now goes through the one grammar
    (core.layers) and is refused before any model loads (the model path does not even exist)."""
    from normscope.cli import app

    res = CliRunner().invoke(app, ["hubness", str(tmp_path / "no-such-model"), "--layers", "5-3"])
    assert res.exit_code == 2, res.output
    assert "--layers range '5-3' runs backwards; write it as 3-5." in res.output
    assert res.output.strip().count("\n") == 0 and "Traceback" not in res.output
    with pytest.raises(NormscopeError, match="runs backwards"):
        hb.parse_layers("5-3", 30, "--layers")


class _ByteTokenizer:
    """Decodes token 7 alone to U+FFFD, as byte-level BPE does for the first byte of an emoji."""

    def decode(self, ids: list[int]) -> str:
        return "\ufffd" if ids == [7] else f"t{ids[0]}"

    def convert_ids_to_tokens(self, i: int) -> str:
        return "\u00f0\u0141" if i == 7 else f"t{i}"  # byte-level pieces of b"\xf0\x9f"


def test_hub_tables_show_byte_tokens_readably() -> None:
    meta = hb.TokenMeta(ids=torch.tensor([7, 8, 9]), pos=torch.tensor([0, 1, 2]), seq=torch.tensor([0, 0, 0]),
                        next_ids=torch.tensor([8, 9, -1]))
    rows = hb.top_hub_rows(torch.tensor([5, 1, 0]), meta, _ByteTokenizer(), 2)
    assert [r["token"] for r in rows] == ["\\xf0\\x9f", "t8"]  # not two look-alike replacement characters
    assert rows[0]["sink"] == "position 0"


def test_sink_tokens_come_from_chunked_column_sums_equal_to_eager_patterns() -> None:
    """hubness names sink tokens from the pattern's column sums (SDPA kept, no T x T pattern), and they are the
    ones eager attention patterns give (Gu et al.'s alpha_k, a low threshold so that a random model has hits)."""
    from normscope.analyses.hubness.reducers import SinkColumns
    from normscope.core.attention import SinkTokens
    from normscope.core.capture import Capture
    from normscope.core.sites import find_layout, find_norm_sites

    model = tiny_llama()
    sample = tiny_sample(n_tokens=256)
    layout = find_layout(model)
    got = SinkTokens(True, eps=0.08, min_queries=4)
    cap = Capture(model, layout, find_norm_sites(model, layout))
    for b in layout.blocks:
        cap.add(f"blocks.{b.index}.attn.hook_col_sum", SinkColumns(got))
    with cap:
        cap.run(sample.iter_batches())
    assert cap.attention_path == "chunked"
    want = SinkTokens(True, eps=0.08, min_queries=4)
    model.set_attn_implementation("eager")
    try:
        for b in sample.iter_batches():
            with torch.no_grad():
                out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_attentions=True)
            for pattern in out.attentions:  # [batch, head, query, key] per layer
                want.update(pattern, b)
    finally:
        model.set_attn_implementation("sdpa")
    assert sum(want.counts.values()) > 0 and got.counts == want.counts
