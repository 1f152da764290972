"""Sinks: the metric functions against direct computations, the capture pass against ``output_attentions``
/ ``output_hidden_states`` and TransformerLens, and the phenomena the bundled SmolLM2 really shows."""

from __future__ import annotations

import math
import re

import pytest
import torch

from normscope.analyses import sinks
from normscope.core.models import LoadedModel, ModelInfo
from normscope.core.text import TextOptions, load_text, sample_from_ids
from tests.tiny import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer


# ---- pure functions ----------------------------------------------------------------------------------
def test_sink_scores_causal_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    pattern = logits.masked_fill(causal, -math.inf).softmax(-1)  # [batch, head, q, k]
    alpha = sinks.sink_scores(pattern, causal=True)
    for b in range(2):
        for h in range(3):
            for k in range(6):
                direct = sum(float(pattern[b, h, i, k]) for i in range(k, 6)) / (6 - k)
                assert alpha[b, h, k].item() == pytest.approx(direct, rel=1e-6)


def test_sink_scores_encoder_averages_all_queries() -> None:
    pattern = torch.rand(1, 2, 5, 5).softmax(-1)
    alpha = sinks.sink_scores(pattern, causal=False)
    assert torch.allclose(alpha, pattern.mean(dim=2))


def test_sink_rate_is_strict_percentage() -> None:
    assert sinks.sink_rate(torch.tensor([0.3, 0.31, 0.1, 0.9])) == pytest.approx(50.0)
    assert sinks.sink_rate(torch.tensor([0.3, 0.3]), eps=0.3) == 0.0


def test_massive_mask_needs_both_conditions() -> None:
    h = torch.full((1, 4, 8), 0.05)
    h[0, 0, 3] = 500.0  # > 100 and > 1000 x median (0.05)
    h[0, 1, 2] = 90.0  # large ratio but under 100
    mask = sinks.massive_mask(h)
    assert mask.sum() == 1 and mask[0, 0, 3]
    h2 = torch.full((1, 4, 8), 1.0)
    h2[0, 0, 0] = 500.0  # > 100 but only 500 x the median
    assert not sinks.massive_mask(h2).any()


def test_outlier_share_matches_direct() -> None:
    x = torch.randn(2, 3, 16)
    x[0, 0, 5] = 40.0
    share = sinks.outlier_share(x, k=3, centered=False)
    sq = x.pow(2)
    direct = sq.sort(dim=-1, descending=True).values[..., :3].cumsum(-1) / sq.sum(-1, keepdim=True)
    assert torch.allclose(share, direct, atol=1e-6)
    assert share[0, 0, 0] > 0.8
    xc = x - x.mean(-1, keepdim=True)
    sqc = xc.pow(2)
    directc = sqc.sort(dim=-1, descending=True).values[..., :1] / sqc.sum(-1, keepdim=True)
    assert torch.allclose(sinks.outlier_share(x, k=1, centered=True), directc, atol=1e-6)


def test_row_median_is_torch_lower_median() -> None:
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 64, 1000):
        a = torch.randn(5, n, generator=g).abs()
        assert torch.equal(sinks.row_median(a), a.median(dim=1).values)
    a64 = torch.randn(3, 10, dtype=torch.float64)
    assert torch.equal(sinks.row_median(a64), a64.median(dim=1).values)


def test_top3_entries_match_flat_topk() -> None:
    g = torch.Generator().manual_seed(2)
    for t, d in ((1, 5), (2, 3), (9, 16), (64, 40)):
        a = torch.randn(4, t, d, generator=g).abs()
        a[1, 0, :3] = torch.tensor([50.0, 40.0, 30.0])[: min(3, d)]  # all three in one token
        vals, pos, dim = sinks.top3_entries(a)
        ref = a.flatten(1).topk(min(3, t * d), dim=1)
        assert torch.equal(vals, ref.values)
        assert torch.equal(pos, ref.indices // d) and torch.equal(dim, ref.indices % d)


@pytest.mark.parametrize("centered", [False, True])
def test_site_outliers_is_one_pass_of_the_separate_metrics(centered: bool) -> None:
    from normscope.core.sites import norm_divisor

    x = torch.randn(2, 5, 32) * 3
    x[1, 0, 7] = 900.0
    div, share, top_dim = sinks.site_outliers(x, 3, centered, eps=1e-5)
    assert torch.allclose(div, norm_divisor(x, centered=centered, eps=1e-5)[..., 0], rtol=1e-6)
    assert torch.allclose(share, sinks.outlier_share(x, 3, centered), atol=1e-7)
    xc = x - x.mean(-1, keepdim=True) if centered else x
    assert torch.equal(top_dim, xc.abs().argmax(-1))
    assert int(top_dim[1, 0]) == 7


# ---- the capture pass against a direct computation ----------------------------------------------------
def _tiny_lm(model: torch.nn.Module, causal: bool = True) -> LoadedModel:
    cfg = model.config
    info = ModelInfo(spec="tiny", name="tiny", slug="tiny", source="folder", architecture=cfg.model_type,
                     n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                     is_causal=causal, max_positions=None, dtype="float32", device="cpu")
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), info=info)


def _rows(n: int, t: int, vocab: int = 90, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, t), generator=g).tolist()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_run_matches_output_attentions_and_hidden_states(factory) -> None:
    model = factory()
    lm = _tiny_lm(model)
    rows = _rows(6, 12)
    sample = sample_from_ids(rows, ["prose"] * 6, batch_size=4)
    result = sinks.run(lm, sample, sinks.SinksOptions(eps=0.3))
    ids = torch.tensor(rows)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    heads = result.tables["heads"]
    n_layers = len(out.attentions)
    alphas = []
    for layer, att in enumerate(out.attentions):  # [batch, head, q, k]
        alpha1 = att[:, :, :, 0].sum(-1) / att.shape[-1]  # queries i >= 0: all of them
        alphas.append(alpha1)
        for h in range(att.shape[1]):
            row = heads[(heads["layer"] == layer) & (heads["head"] == h)].iloc[0]
            assert row.alpha1 == pytest.approx(float(alpha1[:, h].mean()), rel=1e-5)
    rate = 100 * float((torch.stack(alphas) > 0.3).float().mean())
    assert result.payload["sink_rate"] == pytest.approx(rate)
    layers = result.tables["layers"]
    # HF hidden_states[l + 1] is block l's output, except the last, which is after the final norm.
    for layer in range(n_layers - 1):
        h = out.hidden_states[layer + 1].abs().flatten(1)  # [batch, pos*d]
        assert layers.top1_abs[layer] == pytest.approx(float(h.max(1).values.mean()), rel=1e-5)
        assert layers.median_abs[layer] == pytest.approx(float(h.median(1).values.mean()), rel=1e-5)


@pytest.mark.parametrize(("factory", "causal"), [(tiny_llama, True), (tiny_bert, False)])
def test_chunked_and_eager_paths_give_the_same_result_and_the_page_names_the_path(factory, causal, tmp_path) -> None:
    """The default (auto) pass runs SDPA with chunked column sums; --attention eager keeps whole patterns. Every
    number derived from attention agrees to 1e-5, and the page says which path ran and why."""
    from normscope.report import write_report

    lm = _tiny_lm(factory(), causal=causal)
    sample = sample_from_ids(_rows(6, 40, seed=4), ["prose"] * 3 + ["code"] * 3, batch_size=4)
    auto = sinks.run(lm, sample, sinks.SinksOptions(min_queries=2, eps=0.03))
    eager = sinks.run(lm, sample, sinks.SinksOptions(min_queries=2, eps=0.03, attention="eager"))
    assert auto.payload["attention_path"] == {"path": "chunked",
                                              "reason": "no statistic of this pass needs a whole T x T pattern"}
    assert eager.payload["attention_path"] == {"path": "eager", "reason": "eager attention was asked for"}
    a, e = auto.tables["heads"], eager.tables["heads"]
    assert (a["alpha1"] - e["alpha1"]).abs().max() <= 1e-5
    assert (a["alpha_later_max"] - e["alpha_later_max"]).abs().max() <= 1e-5
    assert auto.payload["sink_rate"] == pytest.approx(eager.payload["sink_rate"], abs=1e-9)
    assert auto.payload["sink_rate_by_category"] == pytest.approx(eager.payload["sink_rate_by_category"])
    if causal:  # the untrained encoder attends uniformly (alpha ~ 1/T): no sink token to compare
        assert auto.payload["sink_tokens"] == eager.payload["sink_tokens"] and auto.payload["sink_tokens"]
    page = write_report(auto, tmp_path).html.read_text()
    assert "Attention path: chunked (SDPA forward" in page
    assert any(line.startswith("Attention path: eager (whole T x T patterns") for line in eager.summary)


def test_outlier_rows_match_site_divisor_direct() -> None:
    model = tiny_llama()
    lm = _tiny_lm(model)
    rows = _rows(4, 10, seed=1)
    result = sinks.run(lm, sample_from_ids(rows, ["prose"] * 4))
    ids = torch.tensor(rows)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # blocks.0.ln1 reads the embeddings (hidden_states[0]); its divisor is the RMS with eps
    x = out.hidden_states[0]  # [batch, pos, d]
    eps = model.model.layers[0].input_layernorm.variance_epsilon
    rms = torch.sqrt(x.pow(2).mean(-1) + eps)  # [batch, pos]
    row = result.tables["sites"].set_index("site").loc["blocks.0.ln1"]
    assert row.divisor_first == pytest.approx(float(rms[:, 0].mean()), rel=1e-5)
    assert row.divisor_rest == pytest.approx(float(rms[:, 1:].mean()), rel=1e-5)


def test_encoder_alpha_over_all_queries() -> None:
    model = tiny_bert()
    lm = _tiny_lm(model, causal=False)
    rows = _rows(4, 10, seed=2)
    result = sinks.run(lm, sample_from_ids(rows, ["prose"] * 4))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(rows), output_attentions=True)
    heads = result.tables["heads"]
    att = out.attentions[1]
    assert heads[(heads["layer"] == 1) & (heads["head"] == 2)].alpha1.iloc[0] == pytest.approx(
        float(att[:, 2, :, 0].mean()), rel=1e-5)


def test_ablate_refuses_encoders() -> None:
    from normscope.core.errors import NormscopeError

    lm = _tiny_lm(tiny_bert(), causal=False)
    with pytest.raises(NormscopeError, match="causal"):
        sinks.run(lm, sample_from_ids(_rows(2, 8), ["x"] * 2), sinks.SinksOptions(ablate=True))


def test_hooks_are_removed_after_run() -> None:
    model = tiny_llama()
    lm = _tiny_lm(model)
    sinks.run(lm, sample_from_ids(_rows(2, 8), ["x"] * 2), sinks.SinksOptions(ablate=True))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_a_pass_without_logits_sees_every_token_and_projects_only_the_last() -> None:
    """Capture.run(logits=False) (what sinks uses when it reads no logits) passes logits_to_keep=1: the hooks see
    the same residual stream as a full pass, and the vocabulary projection covers the last position only."""
    from normscope.core.capture import Capture
    from normscope.core.sites import find_layout, find_norm_sites

    model = tiny_llama().eval()
    layout = find_layout(model)

    class Keep:
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def update(self, x: torch.Tensor, ctx) -> None:
            self.seen.append(x.detach().clone())

    sample = sample_from_ids(_rows(2, 8), ["x"] * 2)
    got = {}
    for logits in (True, False):
        cap = Capture(model, layout, find_norm_sites(model, layout))
        keep = cap.add("blocks.1.hook_resid_post", Keep())
        shapes: list[tuple[int, ...]] = []
        with cap:
            cap.run(sample.iter_batches(), on_output=lambda out, ctx, sh=shapes: sh.append(tuple(out.logits.shape)),
                    logits=logits)
        got[logits] = (torch.cat(keep.seen), shapes)
    assert torch.equal(got[True][0], got[False][0])
    assert all(sh[1] == 8 for sh in got[True][1]) and all(sh[1] == 1 for sh in got[False][1])


def test_transformer_lens_bridge_agrees_on_pattern_and_scale(tmp_path) -> None:
    """TransformerLens' ``attn.hook_pattern`` and ``ln1.hook_scale`` give the same numbers as our capture."""
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    model = tiny_llama()
    own = tiny_llama()  # the bridge rewrites its model in place: give it its own identical instance
    rows = _rows(3, 10, seed=3)
    ids = torch.tensor(rows)
    try:
        from transformers import AutoTokenizer

        from tests.tiny import tiny_tokenizer_dir

        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))  # TL needs a tokenizer with a path
        bridge = bridge_mod.TransformerBridge.boot_transformers(
            "meta-llama/Llama-3.2-1B", hf_model=own, tokenizer=tok, device="cpu"
        )
        _, cache = bridge.run_with_cache(ids)
    except Exception as exc:  # pragma: no cover - depends on the installed TL version
        pytest.skip(f"TransformerBridge cannot boot a tiny Llama offline here: {type(exc).__name__}: {exc}")
    result = sinks.run(_tiny_lm(model), sample_from_ids(rows, ["x"] * 3))
    heads = result.tables["heads"]
    pat = cache["blocks.1.attn.hook_pattern"]  # [batch, head, q, k]
    ours = torch.tensor(heads[heads["layer"] == 1].sort_values("head")["alpha1"].tolist())
    assert torch.allclose(ours, (pat[:, :, :, 0].sum(-1) / pat.shape[-1]).mean(0).float(), rtol=1e-4)
    scale = cache["blocks.1.ln1.hook_scale"][..., 0]  # [batch, pos]
    row = result.tables["sites"].set_index("site").loc["blocks.1.ln1"]
    assert row.divisor_rest == pytest.approx(float(scale[:, 1:].mean()), rel=1e-4)


# ---- the bundled SmolLM2 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_result(smollm2):
    sample = load_text(smollm2.tokenizer, TextOptions(seq_len=64, max_tokens=1024, batch_size=8, controls=False),
                       max_positions=smollm2.info.max_positions)
    return sinks.run(smollm2, sample, sinks.SinksOptions(ablate=True))


@pytest.mark.slow
def test_smollm2_massive_dim_507_at_position_0(smol_result) -> None:
    p = smol_result.payload
    assert p["massive_dims"][0] == 507
    by_layer = {r["layer"]: r for r in p["layers"]}
    # From layer 1 on, dim 507 at position 0 is where a sequence's largest |h| most often sits (~200-780 in
    # layers 1-8, 60-800x the median, under Sun et al.'s 1000x bar)...
    for layer in range(1, 10):
        assert (by_layer[layer]["top1_dim"], by_layer[layer]["top1_position"]) == (507, 0), layer
        assert by_layer[layer]["top1_abs"] > 100
    # ...and from layer 11 on it is a massive activation in every sequence (~23,600, > 1000x the median).
    for layer in range(11, 29):
        assert 507 in by_layer[layer]["massive_dims"], layer
        assert by_layer[layer]["top1_frequency"] > 0.9 and by_layer[layer]["top1_position"] == 0
    mid = [a for a in p["massive_activations"] if a["dim"] == 507 and 12 <= a["layer"] <= 20]
    assert mid
    for layer in range(12, 21):  # the largest entry of each layer sits at position 0 (a few at the first delimiter)
        assert max((a for a in mid if a["layer"] == layer), key=lambda a: a["abs"])["position"] == 0
    assert max(abs(a["value"]) for a in mid) > 5000  # thousands in the middle layers (~22,500 measured)


@pytest.mark.slow
def test_smollm2_sink_rate_rises_with_depth(smol_result) -> None:
    rates = [r["sink_rate"] for r in smol_result.payload["layers"]]
    assert rates[0] < 10  # layer 0 barely attends to the first token (~0.03)
    assert sum(rates[-10:]) / 10 > sum(rates[:10]) / 10 + 20
    assert smol_result.payload["sink_rate"] > 50


@pytest.mark.slow
def test_smollm2_outlier_carries_the_divisor_at_position_0(smol_result) -> None:
    sites = smol_result.tables["sites"].set_index("site")
    mid = sites.loc["blocks.15.ln1"]
    assert mid.top1_share_first > 0.9  # dim 507 is almost all of position 0's RMS
    assert mid.top1_share_rest < 0.5
    assert mid.divisor_ratio_first_to_rest > 20


@pytest.mark.slow
def test_smollm2_zeroing_massive_dims_hurts_mean_does_not(smol_result) -> None:
    abl = {r["intervention"]: r["delta_loss"] for r in smol_result.payload["ablations"]}
    assert abl["massive dims zeroed"] > 1.0  # Sun et al.: zeroing destroys the model
    assert abs(abl["massive dims set to their mean"]) < 0.1  # ...setting to the mean keeps it


def test_nonfinite_activations_are_named_not_averaged() -> None:
    """An overflow (here: an injected inf in block 1's output) is reported by hook point, not silently averaged."""
    model = tiny_llama()
    lm = _tiny_lm(model)

    def overflow(module, args, out):
        out = out.clone()
        out[0, 3, 5] = float("inf")
        return out

    h = model.model.layers[1].register_forward_hook(overflow)
    try:
        result = sinks.run(lm, sample_from_ids(_rows(2, 8), ["x"] * 2))
    finally:
        h.remove()
    points = [r["point"] for r in result.payload["nonfinite"]]
    assert points[0] == "blocks.1.hook_resid_post"
    assert "blocks.1.hook_resid_post" in result.summary[0]


# ---- the page: what it says and how it draws it (issue 10, item 6) ------------------------------------
def test_massive_labels_one_per_run_of_layers_with_the_same_dim() -> None:
    import pandas as pd

    from normscope.analyses.sinks.report import figures, massive_label_layers

    # SmolLM2's shape: d507 at layer 2, then again in every layer from 11 to 28; another dim at 29
    layers_with = [2, *range(11, 29), 29]
    dims = [507] * 19 + [247]
    top = pd.DataFrame({"layer": layers_with, "dim": dims})
    keep = massive_label_layers(top)
    assert [lay for lay, k in zip(layers_with, keep, strict=True) if k] == [2, 11, 29]
    # the figure: every layer's point is there for hover, but only the run starts carry a text label
    massive = pd.DataFrame({"layer": layers_with, "dim": dims, "position": 0, "token": "x", "value": 1e4,
                            "abs": 1e4, "count": 1})
    layers = pd.DataFrame({"layer": range(30), "top1_abs": 1e4, "top2_abs": 1e3, "top3_abs": 1e3,
                           "median_abs": 1.0, "sink_rate": 50.0})
    fig = next(f.fig for f in figures(pd.DataFrame(), layers, massive, pd.DataFrame(), sinks.SinksOptions(), 64)
               if f.title == "Massive activations per layer")
    trace = next(t for t in fig.data if t.name == "largest massive activation")
    assert len(trace.x) == 20 and [t for t in trace.text if t] == ["d507", "d507", "d247"]
    assert "dim %{customdata[0]}" in trace.hovertemplate


@pytest.fixture(scope="module")
def smol_bos_pair(smollm2):
    """The bundled model on two short samples of the same text: as its tokenizer cuts it (no BOS), and with
    ``--bos yes``."""
    out = {}
    for bos in ("auto", "yes"):
        sample = load_text(smollm2.tokenizer, TextOptions(seq_len=64, max_tokens=128, batch_size=2, bos=bos),
                           max_positions=smollm2.info.max_positions)
        out[bos] = sinks.run(smollm2, sample)
    return out


def test_no_bos_flags_position_0_as_an_arbitrary_token(smol_bos_pair, smollm2) -> None:
    auto, yes = smol_bos_pair["auto"], smol_bos_pair["yes"]
    assert auto.payload["bos_prepended"] is False  # SmolLM2's tokenizer adds no BOS
    assert auto.payload["position0_arbitrary_token"] is True
    assert "no BOS" in auto.label("sink_tokens")  # the table's heading on the page
    assert any(p.startswith("No BOS was prepended") and "--bos yes" in p for p in auto.summary)
    assert yes.payload["bos_prepended"] is True and yes.payload["position0_arbitrary_token"] is False
    assert yes.label("sink_tokens") == "sink tokens"
    assert not any("No BOS" in p for p in yes.summary)
    # with BOS, position 0 is the same token in every sequence: every 'first' sink row is BOS
    first = {r["token_id"] for r in yes.payload["sink_tokens"] if r["position"] == "first"}
    assert first == {smollm2.tokenizer.bos_token_id}
    assert len({r["token_id"] for r in auto.payload["sink_tokens"] if r["position"] == "first"}) > 1
    # the JSON carries the flag next to bos_prepended
    keys = list(auto.to_json_dict())
    assert keys.index("position0_arbitrary_token") == keys.index("bos_prepended") + 1


def test_encoder_position_0_is_cls_not_arbitrary() -> None:
    lm = _tiny_lm(tiny_bert(), causal=False)
    result = sinks.run(lm, sample_from_ids(_rows(2, 8), ["x"] * 2))
    assert result.payload["position0_arbitrary_token"] is False


def test_headlines_read_as_words_and_name_the_threshold(smol_bos_pair) -> None:
    result = smol_bos_pair["auto"]
    assert set(result.headlines) >= {"sink_rate_percent", "top_sink_head", "massive_dims", "max_massive_value"}
    snake = re.compile(r"\b[a-z]+_[a-z]+\b")
    for key in result.headlines:  # JSON keys stay; the page and the terminal show words
        assert key in result.labels and not snake.search(result.label(key)), key
    assert result.label("sink_rate_percent") == "sink rate Sink_1^0.3 (%)"
    lm = _tiny_lm(tiny_llama())
    other = sinks.run(lm, sample_from_ids(_rows(2, 8), ["x"] * 2), sinks.SinksOptions(eps=0.2, ablate=True))
    assert other.label("sink_rate") == "sink rate Sink_1^0.2 (%)"
    for key in other.headlines:  # the ablation headlines too
        assert key in other.labels and not snake.search(other.label(key)), key


def test_sink_and_massive_tokens_are_shown_by_their_bytes(smollm2) -> None:
    """A byte-level piece of an emoji decodes alone to U+FFFD; the tables show its bytes instead."""
    from collections import Counter
    from types import SimpleNamespace

    from normscope.analyses.sinks.analysis import _massive_rows, _sink_token_rows

    tok = smollm2.tokenizer
    piece = tok("\U0001F600", add_special_tokens=False)["input_ids"][0]
    assert "\ufffd" in tok.decode([piece])  # the defect: decoded alone it is a replacement character
    attn = {0: SimpleNamespace(tokens=SimpleNamespace(counts=Counter({("later", piece): 3, ("first", 30): 1})))}
    rows = _sink_token_rows(attn, tok)
    assert rows[0]["token_id"] == piece and "\ufffd" not in rows[0]["token"] and rows[0]["token"].startswith("\\x")
    assert rows[1]["token"] == "."
    resid = {4: SimpleNamespace(massive={(507, 0): [2, 900.0, -900.0, piece]})}
    assert "\ufffd" not in _massive_rows(resid, tok)[0]["token"]


def test_every_reference_names_its_arxiv_id() -> None:
    from normscope.analyses.sinks.options import REFERENCES

    for ref in REFERENCES:
        assert re.search(r"\(arXiv:\d{4}\.\d{4,5}\)", ref), ref
    unified = next(r for r in REFERENCES if "Residual Sinks" in r)
    assert unified.startswith("Qiu, Huang, Wen et al. 2026") and "arXiv:2601.22966" in unified


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cutting_attention_to_position_0_keeps_the_causal_mask(impl: str) -> None:
    """The ablation must forbid key 0 and nothing else: on SDPA (no mask handed to the layers) as on eager."""
    from normscope.analyses.sinks.analysis import no_attention_to_first
    from normscope.core.sites import find_layout

    model = tiny_llama(n_layers=2)
    model.set_attn_implementation(impl)
    layout = find_layout(model)
    ids = torch.randint(4, 100, (2, 12))
    with torch.no_grad(), no_attention_to_first(layout):
        cut = model(input_ids=ids).logits  # [batch, pos, vocab]
        cut_prefix = model(input_ids=ids[:, :6]).logits
    # causal: a position's logits never depend on later tokens, with or without the cut
    assert torch.allclose(cut[:, :6], cut_prefix, atol=1e-5)
    eager = tiny_llama(n_layers=2)
    eager.set_attn_implementation("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad(), no_attention_to_first(find_layout(eager)):
        assert torch.allclose(eager(input_ids=ids).logits, cut, atol=1e-5)
