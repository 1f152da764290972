"""Tests of ``normscope dla``: DLA and the direct effect against brute-force recomputation with the model's own
modules, TransformerLens' bridge against normscope's hooks, the LN-free limit (a fixed final scale gives zero
error), the entropy-neuron shortcut against a real ablated forward pass, and the bundled SmolLM2."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from normscope.analyses import dla
from normscope.core.errors import NormscopeError
from normscope.core.models import LoadedModel, ModelInfo
from normscope.core.sites import norm_divisor
from normscope.core.text import TextOptions, load_text
from tests.tiny import save_tiny, tiny_bert, tiny_gemma2, tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The tiny in-memory tokenizer (the bridge gets a copy that never reloads itself from disk)."""
    return tiny_tokenizer()


def tiny_lm(model: torch.nn.Module, tok, arch: str = "llama") -> LoadedModel:
    cfg = model.config
    info = ModelInfo(spec="tiny", name="tiny", slug="tiny", source="folder", architecture=arch,
                     n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                     is_causal=True, max_positions=64, dtype="float32", device="cpu")
    return LoadedModel(model, tok, info)


def sample(tok, n_tokens: int = 256):
    return load_text(tok, TextOptions(seq_len=32, max_tokens=n_tokens, batch_size=4), max_positions=64,
                     is_causal=True)


def freeze_final_scale(model: torch.nn.Module, final: torch.nn.Module, sigma: float = 1.0) -> None:
    """The LN-free export of Heimersheim / Baroni et al.: gain x 1e6 / sigma and eps 1e12, so the final norm
    divides every token by the same 1e6 / sigma: a fixed scale. Config and module agree on eps."""
    with torch.no_grad():
        final.weight.mul_(1e6 / sigma)
    for attr in ("variance_epsilon", "eps"):
        if hasattr(final, attr):
            setattr(final, attr, 1e12)


# ---- pure functions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("centered", [False, True])
def test_dla_and_de_against_recomputing_the_norm(centered: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(5, 7, 16, generator=gen, dtype=torch.float64)
    r = torch.randn(7, 16, generator=gen, dtype=torch.float64) * 3 + c.sum(0)
    u = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    eps = 1e-5
    dla_v, de_v = dla.dla_and_de(c, r, u, centered=centered, eps=eps)

    def divisor(x: torch.Tensor) -> torch.Tensor:  # float64 twin of sites.norm_divisor
        xc = x - x.mean(-1, keepdim=True) if centered else x
        return torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)

    def logit(x: torch.Tensor) -> torch.Tensor:  # the final norm recomputed, with its gain folded into u
        xc = x - x.mean(-1, keepdim=True) if centered else x
        return (xc / divisor(x) * u).sum(-1)

    assert torch.allclose(divisor(r).float(), norm_divisor(r, centered=centered, eps=eps))
    for i in range(5):
        assert torch.allclose(de_v[i], logit(r) - logit(r - c[i]), rtol=1e-9, atol=1e-12)
        ci = c[i] - c[i].mean(-1, keepdim=True) if centered else c[i]
        assert torch.allclose(dla_v[i], (ci * u).sum(-1) / divisor(r)[:, 0], rtol=1e-12)
    # DLA sums to the logit (up to the parts no component wrote) when the components make up the residual
    r2 = c.sum(0)
    dl, _ = dla.dla_and_de(c, r2, u, centered=centered, eps=eps)
    assert torch.allclose(dl.sum(0), logit(r2), rtol=1e-9)


@pytest.mark.parametrize("centered", [False, True])
def test_head_attributions_in_d_head_space_equal_the_full_head_outputs(centered: bool) -> None:
    """head_dla_and_de never builds [heads, N, d]; it must equal dla_and_de on the explicit head outputs."""
    gen = torch.Generator().manual_seed(3)
    n_heads, d_head, d, n = 4, 8, 24, 11
    z = torch.randn(n, n_heads * d_head, generator=gen)
    w_o = torch.randn(n_heads * d_head, d, generator=gen) / 5
    r = torch.randn(n, d, generator=gen) * 2
    u = torch.randn(n, d, generator=gen)
    want = dla.dla_and_de(dla.head_outputs(z.double(), w_o.double(), n_heads), r, u, centered=centered, eps=1e-5)
    got = dla.head_dla_and_de(z, w_o, n_heads, r, u, centered=centered, eps=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (n_heads, n) and g.dtype == torch.float64
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_auto_goes_to_the_own_hooks_when_the_bridge_cannot_be_the_reference(tok) -> None:
    """--backend auto skips the bridge's deep copy when it cannot pay off: a half-precision model (the bridge's
    1e-3 check would reject it every time) or a copy that does not fit; an explicit bridge in bfloat16 is judged
    by a tolerance of four bfloat16 roundings."""
    from normscope.analyses.dla.bridge import BRIDGE_TOLERANCE, auto_skips_bridge, bridge_tolerance

    model = tiny_llama(n_layers=2)
    size = sum(p.numel() * 4 for p in model.parameters())
    assert auto_skips_bridge(model, None) is None and auto_skips_bridge(model, 3 * size) is None
    assert "does not fit" in auto_skips_bridge(model, size)
    assert bridge_tolerance(torch.float32) == BRIDGE_TOLERANCE
    assert bridge_tolerance(torch.bfloat16) == pytest.approx(4 * 2**-7)
    half = tiny_lm(model.to(torch.bfloat16), tok)
    assert "bfloat16" in auto_skips_bridge(half.model, None)
    res = dla.run(half, sample(tok, 64), dla.DlaOptions(neurons=0))
    assert res.payload["backend"] == "direct"
    assert any("bfloat16" in n for n in res.payload.get("notes", [])) or "bfloat16" in json.dumps(res.payload)


def test_nmae() -> None:
    assert dla.nmae(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == pytest.approx(100 * 1.0 / 2.5)
    assert dla.nmae(torch.ones(3), torch.ones(3)) == 0.0


def test_entropy_neuron_scores_against_a_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    w_out, w_u, g = torch.randn(12, 30, generator=gen), torch.randn(50, 12, generator=gen), torch.rand(12) + 0.5
    for centered in (False, True):
        norm, var = dla.entropy_neuron_scores(w_out, w_u, g, centered, chunk=7)
        for n in range(30):
            w = w_out[:, n].double() - (w_out[:, n].double().mean() if centered else 0)
            wu = w_u.double() * g.double()
            wu = wu - wu.mean(1, keepdim=True) if centered else wu
            cos = F.cosine_similarity(wu, w[None], dim=1)
            assert float(norm[n]) == pytest.approx(float(w.norm()), rel=1e-5)
            assert float(var[n]) == pytest.approx(float(np.var(cos.numpy())), rel=1e-4)


def test_head_outputs_add_up_to_the_attention_output(tok) -> None:
    model = tiny_llama()
    lm = tiny_lm(model, tok)
    plan = dla.plan_model(lm)
    store: dict[int, torch.Tensor] = {}
    outs = []
    handle = plan.layout.blocks[1].attn.register_forward_hook(lambda m, a, o: outs.append(o[0]))
    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad(), dla.input_hooks(plan.o_proj, store):
            model(input_ids=ids)
    finally:
        handle.remove()
    heads = dla.head_outputs(store[1].flatten(0, 1), plan.w_o[1], plan.n_heads)  # [H, N, d]
    assert torch.allclose(heads.sum(0), outs[0].flatten(0, 1), atol=1e-5)


# ---- the analysis on tiny models ------------------------------------------------------------------------
@pytest.mark.parametrize("factory,arch", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2")])
def test_bridge_and_direct_agree_and_de_is_the_true_direct_effect(factory, arch, tok) -> None:
    model = factory()
    lm, s = tiny_lm(model, tok, arch), sample(tok)
    a = dla.run(lm, s, dla.DlaOptions(backend="bridge", neurons=2))
    b = dla.run(lm, s, dla.DlaOptions(backend="direct", neurons=2))
    assert a.payload["backend"] == "bridge" and b.payload["backend"] == "direct"
    cross = a.payload["crosscheck"]
    assert cross["agrees"] and cross["max_abs_dla_diff"] < 1e-5 * cross["max_abs_dla"]
    ca, cb = a.tables["components"], b.tables["components"]
    for col in ("mean_dla", "mean_de", "nmae"):
        assert np.allclose(ca[col], cb[col], rtol=1e-4, atol=1e-7), col
    assert a.payload["ce"] == pytest.approx(b.payload["ce"], rel=1e-5)
    ea, eb = a.tables["entropy_neurons"], b.tables["entropy_neurons"]  # means from the bridge's cache
    assert np.allclose(ea["mean_activation"], eb["mean_activation"], rtol=1e-4, atol=1e-6)
    assert b.payload["nmae"]["all"] > 1.0  # a real norm: the frozen scale is clearly wrong
    # DE of each MLP = target logit minus the logit with its output removed, through the model's own modules
    plan = dla.plan_model(lm)
    ids = s.batches[0].input_ids
    mask = s.batches[0].attention_mask
    d = dla.direct_attributions(lm, plan, ids, mask)
    mlp_out, resid = [], []
    hooks = [plan.layout.blocks[i].mlp.register_forward_hook(lambda m, a_, o: mlp_out.append(o)) for i in range(2)]
    hooks.append(plan.final.module.register_forward_pre_hook(lambda m, a_: resid.append(a_[0])))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    sel, tgt = d["sel"], d["tgt"]
    with torch.no_grad():
        full = logits[sel].gather(1, tgt[:, None])[:, 0]
        for i in range(2):
            without = plan.layout.unembed(plan.final.module(resid[0] - mlp_out[i]))[sel].gather(1, tgt[:, None])[:, 0]
            c = i * (plan.n_heads + 1) + plan.n_heads
            assert torch.allclose(d["de"][c].float(), full - without, atol=2e-5)


@pytest.mark.parametrize("factory,arch,attr", [(tiny_llama, "llama", "model.norm"),
                                               (tiny_gpt2, "gpt2", "transformer.ln_f")])
def test_fixed_final_scale_makes_dla_exact(factory, arch, attr, tok) -> None:
    """The LN-free check: with the final norm a fixed scale, DLA is the direct effect (NMAE < 1e-4 %)."""
    model = factory()
    lm, s = tiny_lm(model, tok, arch), sample(tok)
    before = dla.run(lm, s, dla.DlaOptions(backend="direct", neurons=0)).payload["nmae"]["all"]
    frozen = copy.deepcopy(model)
    freeze_final_scale(frozen, frozen.get_submodule(attr))
    frozen.config.update({"rms_norm_eps": 1e12} if arch == "llama" else {})
    flm = tiny_lm(frozen, tok, arch)
    direct = dla.run(flm, s, dla.DlaOptions(backend="direct", neurons=0))
    assert before > 1.0
    assert direct.payload["nmae"]["all"] < 1e-4
    if arch == "llama":  # the bridge agrees with the module here; it computes in float32 (~1e-4 % floor)
        bridged = dla.run(flm, s, dla.DlaOptions(backend="bridge", neurons=0))
        assert bridged.payload["backend"] == "bridge"
        assert bridged.payload["nmae"]["all"] < 1e-3
    else:  # GPT-2's bridge reads eps from the config (1e-5), not the module: auto must notice and fall back
        auto = dla.run(flm, s, dla.DlaOptions(backend="auto", neurons=0))
        assert auto.payload["backend"] == "direct"
        assert auto.payload["crosscheck"]["agrees"] is False
        assert auto.payload["nmae"]["all"] < 1e-4
        assert any("disagreed" in n for n in auto.payload["notes"])


@pytest.mark.parametrize("factory,arch,key", [(tiny_llama, "llama", "rms_norm_eps"),
                                              (tiny_gpt2, "gpt2", "layer_norm_epsilon")])
def test_full_ln_free_export_is_exact_through_the_bridge(factory, arch, key, tok) -> None:
    """Every norm frozen the way remove-ln exports it (gain x sqrt(E) / sigma, eps E = 1e16 in the modules AND the
    config, so TransformerLens reads the same eps): the bridge is accepted and DLA equals DE."""
    model = factory()
    s = sample(tok)
    plan = dla.plan_model(tiny_lm(model, tok, arch))
    with torch.no_grad():
        for site in plan.sites:
            site.module.weight.mul_(1e8 / 2.0)  # sqrt(1e16) / sigma, sigma = 2
            for attr in ("variance_epsilon", "eps"):
                if hasattr(site.module, attr):
                    setattr(site.module, attr, 1e16)
    setattr(model.config, key, 1e16)
    res = dla.run(tiny_lm(model, tok, arch), s, dla.DlaOptions(backend="auto", neurons=1))
    assert res.payload["backend"] == "bridge" and res.payload["crosscheck"]["agrees"]
    assert res.payload["nmae"]["all"] < 1e-3  # float32 floor of the bridge's folded W_U
    assert dla.run(tiny_lm(model, tok, arch), s, dla.DlaOptions(backend="direct", neurons=0)).payload["nmae"][
        "all"] < 1e-4


def test_entropy_neuron_shortcut_equals_an_ablated_forward_pass(tok) -> None:
    model = tiny_llama()
    lm, s = tiny_lm(model, tok), sample(tok)
    plan = dla.plan_model(lm)
    neurons = [3, 17]
    means = torch.tensor([0.25, -0.5])
    got = dla.ablate_neurons(lm, plan, s, neurons, means, None)
    for j, n in enumerate(neurons):
        ce_abs, h_abs = [], []

        def set_mean(mod, args, j=j, n=n):
            x = args[0].clone()
            x[..., n] = means[j]
            return (x,)

        for b in s.iter_batches():
            sel, tgt = dla.next_token_targets(b.input_ids, b.attention_mask)
            with torch.no_grad():
                base = model(input_ids=b.input_ids).logits[sel]
                h = plan.mlp_out.register_forward_pre_hook(set_mean)
                try:
                    abl = model(input_ids=b.input_ids).logits[sel]
                finally:
                    h.remove()
            ce_abs.append((F.cross_entropy(abl, tgt, reduction="none") - F.cross_entropy(base, tgt, reduction="none"))
                          .abs())
            h_abs.append((dla.entropy(abl) - dla.entropy(base)).abs())
        assert got[j]["mean_abs_delta_ce"] == pytest.approx(float(torch.cat(ce_abs).mean()), rel=1e-3, abs=1e-7)
        assert got[j]["mean_abs_delta_entropy"] == pytest.approx(float(torch.cat(h_abs).mean()), rel=1e-3, abs=1e-7)


def test_refusals_are_one_clear_line(tok) -> None:
    from transformers import LlamaModel

    base = LlamaModel(tiny_llama().config).eval()
    with pytest.raises(NormscopeError, match="no unembedding"):
        dla.plan_model(tiny_lm(base, tok))
    enc = tiny_lm(tiny_bert(), tok, "bert")
    enc.info.is_causal = False
    with pytest.raises(NormscopeError, match="encoder"):
        dla.plan_model(enc)
    with pytest.raises(NormscopeError, match="pre-norm"):
        dla.plan_model(tiny_lm(tiny_gemma2(), tok, "gemma2"))
    with pytest.raises(NormscopeError, match="--backend"):
        dla.run(tiny_lm(tiny_llama(), tok), sample(tok, 64), dla.DlaOptions(backend="nope"))


def test_cli_encoder_exit_2_and_report(tmp_path) -> None:
    from normscope.cli import app

    runner = CliRunner()
    bert = save_tiny(tiny_bert(), tiny_tokenizer(), tmp_path / "bert")
    bad = runner.invoke(app, ["dla", str(bert), "--max-tokens", "64", "--seq-len", "32", "--quiet"])
    assert bad.exit_code == 2, bad.output
    assert "encoder" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) <= 3  # one sentence (rich may wrap it)
    llama = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")
    ok = runner.invoke(app, ["dla", str(llama), "--max-tokens", "128", "--seq-len", "32", "--neurons", "2",
                             "--quiet", "--out", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "r" / "dla.json").read_text())
    assert data["backend"] == "bridge" and len(data["components"]) == 2 * 5
    assert (tmp_path / "r" / "dla.html").exists() and (tmp_path / "r" / "dla_entropy_neurons.csv").exists()


# ---- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_frozen_scale_misleads_most_in_the_last_layers(smollm2) -> None:
    """On SmolLM2 the bridge and normscope's hooks agree, the cached final-RMSNorm scale is clearly wrong, and
    most wrong for the last layers and at position 0, whose residual carries the ~22,500 massive activation."""
    s = load_text(smollm2.tokenizer, TextOptions(seq_len=64, max_tokens=256, batch_size=4, controls=False),
                  max_positions=8192, is_causal=True)
    res = dla.run(smollm2, s, dla.DlaOptions(backend="bridge", neurons=0))
    cross = res.payload["crosscheck"]
    assert cross["agrees"] and cross["max_abs_dla_diff"] < 1e-5 * cross["max_abs_dla"]
    n = res.payload["nmae"]
    assert n["all"] > 10
    layers = res.tables["layers"]
    assert layers["nmae_all"].iloc[-6:].mean() > 1.5 * layers["nmae_all"].iloc[:6].mean()
    assert n["position_0"] > n["other_positions"]


# ---- the page (issue 10, item 6) --------------------------------------------------------------------------
def test_entropy_neuron_verdict() -> None:
    # moves the loss about as much as the entropy (SmolLM2's candidates: |dCE| / |dH| ~ 0.7-1.0): fails
    assert dla.entropy_neuron_verdict(0.006, 0.006) == (pytest.approx(1.0), True)
    ratio, fails = dla.entropy_neuron_verdict(0.0792, 0.1134)
    assert ratio == pytest.approx(0.698, abs=1e-3) and fails
    # changes the entropy much more than the loss (Stolfo et al.'s entropy neuron): passes
    assert dla.entropy_neuron_verdict(0.002, 0.05) == (pytest.approx(0.04), False)
    assert dla.entropy_neuron_verdict(0.01, 0.05, max_ratio=0.1)[1]  # the bar is a parameter
    assert dla.entropy_neuron_verdict(0.01, 0.0) == (math.inf, True)  # loss moves, entropy does not
    ratio, fails = dla.entropy_neuron_verdict(0.0, 0.0)  # nothing moved: nothing to judge
    assert math.isnan(ratio) and not fails


def _neurons(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    out = []
    for label, d_ce, d_h in rows:
        ratio, fails = dla.entropy_neuron_verdict(d_ce, d_h)
        out.append({"label": label, "mean_abs_delta_ce": d_ce, "mean_abs_delta_entropy": d_h,
                    "median_abs_delta_entropy": d_h / 2, "ce_to_entropy_ratio": ratio, "fails_definition": fails})
    return pd.DataFrame(out)


def test_a_failing_candidate_is_flagged_not_headlined() -> None:
    from normscope.analyses.dla.analysis import entropy_headlines
    from normscope.analyses.dla.report import figures, neuron_note

    # the candidate that moves the entropy most also moves the loss as much: not the headline
    neurons = _neurons([("L1N7", 0.09, 0.10), ("L1N3", 0.001, 0.04), ("L1N9", 0.02, 0.021)])
    assert list(neurons["fails_definition"]) == [True, False, True]
    assert entropy_headlines(neurons) == {"top entropy neuron": "L1N3", "its median |d entropy|": 0.02}
    note = neuron_note(neurons)
    assert note and "2 of 3 candidates" in note and "L1N7 (0.90)" in note and "L1N3" not in note
    assert entropy_headlines(neurons.iloc[[0, 2]]) == {"top entropy neuron": "none of 2 candidates"}
    assert neuron_note(neurons.iloc[[1]]) is None
    comps = pd.DataFrame({"type": ["head"] * 2, "mean_dla": [0.1, 0.2], "nmae": [10.0, 20.0]})
    layers = pd.DataFrame({"layer": [0], "nmae_heads": [1.0], "nmae_mlp": [2.0], "nmae_all": [1.5]})
    fig = next(f for f in figures(comps, layers, torch.zeros(0, 4), [], 1, 2, neurons)
               if f.title.startswith("Entropy neurons"))
    assert list(fig.fig.data[0].x) == ["L1N7 (fails)", "L1N3", "L1N9 (fails)"] and "not entropy neurons" in fig.caption


def test_run_flags_each_ablated_candidate(tok) -> None:
    lm, s = tiny_lm(tiny_llama(), tok), sample(tok)
    res = dla.run(lm, s, dla.DlaOptions(backend="direct", neurons=3))
    rows = res.payload["entropy_neurons"]
    assert len(rows) == 3
    for r in rows:
        ratio, fails = dla.entropy_neuron_verdict(r["mean_abs_delta_ce"], r["mean_abs_delta_entropy"])
        assert r["ce_to_entropy_ratio"] == pytest.approx(ratio) and r["fails_definition"] is fails
    assert list(res.tables["entropy_neurons"].columns)[:5] == ["rank", "neuron", "label", "fails_definition",
                                                               "ce_to_entropy_ratio"]  # the verdict is seen first
    # the headline names a passing candidate, or says that none passes
    top = res.headlines["top entropy neuron"]
    passing = [r["label"] for r in rows if not r["fails_definition"]]
    assert top in passing if passing else top == "none of 3 candidates"
    assert any(p.startswith("Not entropy neurons") for p in res.summary) == (len(passing) < 3)
    # heads and MLPs read apart in the scatter: distinct symbols, colours and legend entries
    fig = next(f.fig for f in res.figures if f.title == "DLA against the direct effect")
    heads, mlps = (next(t for t in fig.data if t.name.startswith(n)) for n in ("attention heads", "MLP layers"))
    assert heads.marker.symbol != mlps.marker.symbol and heads.marker.color != mlps.marker.color
    assert mlps.marker.size > heads.marker.size and heads.showlegend is not False and mlps.showlegend is not False
    n_h, n_m = int(heads.name.split("(")[1].split()[0]), int(mlps.name.split("(")[1].split()[0])
    assert n_h == len(heads.x) and n_m == len(mlps.x) and n_m > 0
    assert set(mlps.text) <= {f"L{i}MLP" for i in range(2)} and all("H" in t for t in heads.text)
