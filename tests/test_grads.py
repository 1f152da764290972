"""Tests of ``normscope grads``: gradient norms per block / group and on the residual stream against plain
torch.autograd on tiny random models, the three losses, the bundled SmolLM2 and MiniLM, and bad input."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from normscope.analyses import grads
from normscope.core.errors import NormscopeError
from normscope.core.models import LoadedModel
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import sample_from_ids
from tests.tiny import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

runner = CliRunner()


def encoder_tokenizer():
    """The tiny tokenizer framed like BERT's: <bos> as [CLS], <eos> as [SEP], <unk> standing in for [MASK]."""
    tok = tiny_tokenizer()
    tok.cls_token, tok.sep_token, tok.mask_token = "<bos>", "<eos>", "<unk>"
    return tok


def _lm(model: nn.Module, causal: bool = True) -> LoadedModel:
    info = SimpleNamespace(spec="tiny", slug="tiny", is_causal=causal, to_dict=lambda: {"spec": "tiny"})
    return LoadedModel(model, encoder_tokenizer(), info)  # type: ignore[arg-type]


def _sample(n: int = 6, t: int = 16, batch_size: int = 2, pad_last: int = 0, frame: bool = False):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, 100, (n, t), generator=g)
    if frame:  # [CLS] ... [SEP] like an encoder's windows
        rows[:, 0], rows[:, -1] = 2, 3
    s = sample_from_ids(rows.tolist(), ["prose"] * n, batch_size=batch_size)
    if pad_last:
        for b in s.batches:
            b.attention_mask[-1, t - pad_last:] = 0
            b.input_ids[-1, t - pad_last:] = 0
    return s


def _group_norms_autograd(model: nn.Module, loss: torch.Tensor) -> dict[tuple, float]:
    """Per (block, group) L2 norms of d loss / d params from one torch.autograd.grad call."""
    layout = find_layout(model)
    groups = grads.param_groups(model, layout, find_norm_sites(model, layout))
    params = [p for g in groups for p in g.params]
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    by_param = {id(p): g for p, g in zip(params, gs, strict=True)}
    return {(g.block, g.group): math.sqrt(sum(float(by_param[id(p)].double().pow(2).sum())
                                              for p in g.params if by_param[id(p)] is not None)) for g in groups}


def _check_groups(profile: grads.GradProfile, want: dict[tuple, float]) -> None:
    got = {(None if r.block != r.block else int(r.block), r.group): r.grad_norm
           for r in profile.groups.itertuples()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-9), k


# ---- pure functions ------------------------------------------------------------------------------------
def test_mask_positions() -> None:
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 3], [2, 10, 11, 3, 0, 0, 0, 0, 0, 0]])
    att = (ids != 0).long()
    gen = torch.Generator().manual_seed(0)
    m = grads.mask_positions(ids, att, [0, 2, 3], 0.25, gen)
    assert m.sum(1).tolist() == [2, 1]  # round(8 * 0.25) = 2; round(2 * 0.25) = 0 -> at least one
    assert not m[:, 0].any() and not m[0, -1].any() and not m[1, 3:].any()  # specials and pads never masked
    again = grads.mask_positions(ids, att, [0, 2, 3], 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


def test_mean_pool_and_masked_view_loss() -> None:
    h = torch.randn(2, 4, 8)
    att = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pooled = grads.mean_pool(h, att)
    assert torch.allclose(pooled[1], h[1, :2].mean(0)) and torch.allclose(pooled[0], h[0].mean(0))
    loss = grads.masked_view_loss(h, h * 3.0, att)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6)  # same direction: zero loss
    want = 1 - F.cosine_similarity(h[0].mean(0), -h[0].mean(0), dim=0)
    assert grads.masked_view_loss(h, -h, att)[0].item() == pytest.approx(float(want))


def test_l2_and_thirds_ratio() -> None:
    assert grads.l2([torch.tensor([3.0]), torch.tensor([4.0])]) == pytest.approx(5.0)
    assert grads.l2([]) == 0.0
    assert grads.thirds_ratio([4, 4, 1, 1, 2, 2]) == pytest.approx(2.0)


def test_param_groups_cover_every_parameter_once() -> None:
    for model in (tiny_llama(), tiny_gpt2(), tiny_bert()):
        layout = find_layout(model)
        groups = grads.param_groups(model, layout, find_norm_sites(model, layout))
        ids = [id(p) for g in groups for p in g.params]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    bert = tiny_bert()
    layout = find_layout(bert)
    named = {n: (g.block, g.group) for g in grads.param_groups(bert, layout, find_norm_sites(bert, layout))
             for n in g.names}
    assert named["encoder.layer.0.attention.output.dense.weight"] == (0, "attention")
    assert named["encoder.layer.0.intermediate.dense.weight"] == (0, "mlp")
    assert named["encoder.layer.1.output.LayerNorm.weight"] == (1, "norm")
    assert named["embeddings.position_embeddings.weight"] == (None, "embeddings")
    assert named["pooler.dense.weight"] == (None, "other")
    llama = tiny_llama()
    layout = find_layout(llama)
    named = {n: (g.block, g.group) for g in grads.param_groups(llama, layout, find_norm_sites(llama, layout))
             for n in g.names}
    assert named["model.layers.1.self_attn.q_proj.weight"] == (1, "attention")
    assert named["model.layers.1.mlp.down_proj.weight"] == (1, "mlp")
    assert named["model.norm.weight"] == (None, "norm")
    assert named["model.embed_tokens.weight"] == (None, "embeddings")  # tied with lm_head: counted once


# ---- against torch.autograd ----------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_next_token_gradients_match_autograd(factory) -> None:
    model = factory(n_layers=3)
    sample = _sample(pad_last=4)
    prof = grads.measure(_lm(model), sample)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # left as found
    # reference: the mean next-token CE over every predicted token of the text, in one graph
    ids = torch.cat([b.input_ids for b in sample.batches])
    att = torch.cat([b.attention_mask for b in sample.batches])
    last = find_layout(model).blocks[-1].module
    caught = {}
    hook = last.register_forward_hook(lambda m, a, o: caught.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=False)
            hs = list(out.hidden_states[:-1]) + [caught["h"]]
            keep = att[:, 1:].bool() & att[:, :-1].bool()
            ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none")[keep.reshape(-1)]
            loss = ce.mean()
            h_grads = torch.autograd.grad(loss, hs, retain_graph=True)  # d loss / d h_l, l = 0..L
            want = _group_norms_autograd(model, loss)
        finally:
            hook.remove()
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
    assert prof.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    assert prof.n_units == int(keep.sum())
    _check_groups(prof, want)
    real = att.bool()
    for p, g in enumerate(h_grads):
        gn = (g * prof.n_units).norm(dim=-1)  # d(summed loss)/dh per token
        assert prof.residual.loc[p, "grad_rest"] == pytest.approx(float(gn[:, 1:][real[:, 1:]].mean()), rel=1e-4)
        assert prof.residual.loc[p, "grad_pos0"] == pytest.approx(float(gn[:, 0].mean()), rel=1e-4)
    # blocks table = the group norms combined
    b0 = prof.blocks.loc[0]
    assert b0["total"] == pytest.approx(math.sqrt(sum(v * v for (blk, _), v in want.items() if blk == 0)), rel=1e-4)


def test_masked_view_gradients_match_autograd() -> None:
    model = tiny_bert(n_layers=2)
    sample = _sample(n=4, frame=True)
    lm = _lm(model, causal=False)
    prof = grads.measure(lm, sample, grads.GradsOptions(mask_rate=0.2))  # masking seeded by the text seed
    assert prof.loss_kind == "masked-view" and "masked-view" in prof.loss_name
    masker = grads.Masker(lm.tokenizer, 0.2, sample.seed)
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            terms = []
            for i, b in enumerate(sample.batches):
                m = masker(b, i)
                assert m.any() and not m[:, 0].any() and not m[:, -1].any()
                ids_m = torch.where(m, torch.full_like(b.input_ids, lm.tokenizer.mask_token_id), b.input_ids)
                h = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                hm = model(input_ids=ids_m, attention_mask=b.attention_mask).last_hidden_state
                terms.append(grads.masked_view_loss(h, hm, b.attention_mask))
            loss = torch.cat(terms).mean()
            want = _group_norms_autograd(model, loss)
        finally:
            for p in model.parameters():
                p.requires_grad_(False)
    assert prof.loss == pytest.approx(float(loss.detach()), rel=1e-5) and prof.n_units == 4
    _check_groups(prof, want)
    assert want[(None, "other")] == 0.0  # the pooler does not take part in this loss


def test_mlm_gradients_match_autograd() -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, pad_token_id=0)
    model = BertForMaskedLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sample = _sample(n=4, frame=True)
    lm = _lm(model, causal=False)
    prof = grads.measure(lm, sample, grads.GradsOptions())
    assert prof.loss_kind == "mlm"
    masker = grads.Masker(lm.tokenizer, 0.15, sample.seed)
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            ces = []
            for i, b in enumerate(sample.batches):
                m = masker(b, i)
                ids_m = torch.where(m, torch.full_like(b.input_ids, lm.tokenizer.mask_token_id), b.input_ids)
                logits = model(input_ids=ids_m, attention_mask=b.attention_mask).logits
                ces.append(F.cross_entropy(logits[m], b.input_ids[m], reduction="none"))
            loss = torch.cat(ces).mean()
            want = _group_norms_autograd(model, loss)
        finally:
            for p in model.parameters():
                p.requires_grad_(False)
    assert prof.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    _check_groups(prof, want)


def test_choose_loss_refuses_what_a_model_cannot_do() -> None:
    llama, bert = _lm(tiny_llama(), True), _lm(tiny_bert(), False)
    lay_l, lay_b = find_layout(llama.model), find_layout(bert.model)
    assert grads.choose_loss(llama, lay_l, "auto") == "next-token"
    assert grads.choose_loss(bert, lay_b, "auto") == "masked-view"
    with pytest.raises(NormscopeError, match="causal LM"):
        grads.choose_loss(bert, lay_b, "next-token")
    with pytest.raises(NormscopeError, match="masked-LM head"):
        grads.choose_loss(bert, lay_b, "mlm")
    with pytest.raises(NormscopeError, match="for encoders"):
        grads.choose_loss(llama, lay_l, "masked-view")
    with pytest.raises(NormscopeError, match="--loss must be one of"):
        grads.choose_loss(llama, lay_l, "bogus")


def test_compare_overlays_both_models_gradient_curves() -> None:
    from normscope.analyses.suite import compare_results

    a = grads.run(_lm(tiny_llama(n_layers=4)), _sample(n=2))
    b = grads.run(_lm(tiny_bert(n_layers=2), False), _sample(n=2, frame=True))
    assert a.payload["profiles"][0]["loss_kind"] == "next-token" and b.payload["profiles"][0]["loss_kind"] == \
        "masked-view"
    figs, deltas = compare_results("grads", a, b, "llama", "bert")
    titles = [f.title for f in figs]
    assert "grads: ||grad|| of the block's parameters, by block" in titles, titles
    assert "grads: ||dL/dh||, positions > 0, by residual point" in titles, titles
    # 4 vs 2 blocks: drawn on relative depth, deltas compare the means
    fig = next(f.fig for f in figs if "||dL/dh||, positions > 0" in f.title)
    assert fig.layout.xaxis.title.text.startswith("relative depth")
    assert list(fig.data[0].x) == [0.0, 0.25, 0.5, 0.75, 1.0] and list(fig.data[1].x) == [0.0, 0.5, 1.0]
    assert deltas["depth"].isna().all() and set(deltas["table"]) >= {"blocks", "residual"}


def test_one_profile_per_result_and_its_terminal_table() -> None:
    """grads measures one model; two are compared by `compare A B --only grads` (the overlay above)."""
    import inspect

    from normscope.analyses.grads import report as grads_report

    res = grads.run(_lm(tiny_llama(n_layers=3)), _sample(n=2))
    assert len(res.payload["profiles"]) == 1 and res.payload["profiles"][0]["n_blocks"] == 3
    assert res.title == "Gradient flow per layer" and "compare" not in res.meta
    assert set(res.tables) == {"blocks", "residual", "groups", "writers"}  # no *_compare; "updates" needs --steps
    assert set(res.headlines) == {"loss (next-token)", "block grad, first/last third", "residual grad, embeddings/last"}
    assert "compare" not in inspect.signature(grads.measure).parameters
    assert [f.title for f in res.figures][:2] == ["Parameter gradient per block", "Residual-stream gradient per layer"]
    assert len(res.summary) == 4 and res.summary[0].startswith("tiny: loss = next-token cross-entropy")
    table = grads_report.terminal_table(res)
    assert [c.header for c in table.columns] == ["block", "||grad||", "attention", "mlp", "norm", "||dL/dh||"]
    assert table.row_count == 3 and table.title == "grads: tiny"
    assert grads.terminal_table is grads_report.terminal_table  # the registry's analysis:terminal_table still works


# ---- the bundled models ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_pre_ln_smollm2_vs_post_ln_minilm(smollm2, minilm) -> None:
    from normscope.core.text import TextOptions, load_text

    opts = TextOptions(seq_len=64, max_tokens=256, batch_size=4, controls=False)
    s_a = load_text(smollm2.tokenizer, opts, max_positions=smollm2.info.max_positions)
    s_b = load_text(minilm.tokenizer, opts, max_positions=minilm.info.max_positions, is_causal=False)
    a = grads.run(smollm2, s_a).payload["profiles"][0]
    b = grads.run(minilm, s_b).payload["profiles"][0]
    assert a["loss_kind"] == "next-token" and 1.5 < a["loss"] < 5.0
    assert b["loss_kind"] == "masked-view" and 0.0 < b["loss"] < 1.0
    for m in (smollm2.model, minilm.model):  # shared fixtures left as found
        assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    res_a = [row["grad_rest"] for row in a["residual"]]
    # Pre-LN: the residual stream grows ~300x with depth, and the gradient on it shrinks in step: deep layers
    # see a far smaller dL/dh than the embeddings
    assert res_a[0] > 20 * res_a[-1]
    blocks_a = [row["total"] for row in a["blocks"]]
    assert grads.thirds_ratio(blocks_a) > 1.0  # deep blocks of the Pre-LN model get less gradient
    res_b = [row["grad_rest"] for row in b["residual"]]
    assert 0.2 < res_b[0] / res_b[-1] < 20  # Post-LN keeps the stream normalised: no such drop
    assert all(np.isfinite(blocks_a)) and all(np.isfinite([row["total"] for row in b["blocks"]]))


# ---- the command line --------------------------------------------------------------------------------------
def _cli(*args: str):
    from normscope.cli import app

    return runner.invoke(app, ["grads", *args])


def _assert_bad_input(res, *words: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    flat = re.sub(r"\s+", " ", res.output)
    for w in words:
        assert w in flat


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("grads_models")
    return {"llama": save_tiny(tiny_llama(n_layers=2), tiny_tokenizer(), root / "llama"),
            "bert": save_tiny(tiny_bert(n_layers=2), encoder_tokenizer(), root / "bert")}


def test_cli_writes_one_page(folders, tmp_path) -> None:
    res = _cli(str(folders["llama"]), "--seq-len", "16", "--max-tokens", "64", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "grads.html").exists() and (tmp_path / "grads.json").exists()
    assert "||dL/dh||" in res.output  # the terminal summary table


def test_cli_bad_input(folders) -> None:
    small = ("--seq-len", "16", "--max-tokens", "64")
    _assert_bad_input(_cli(str(folders["bert"]), "--loss", "next-token", *small), "causal LM")
    _assert_bad_input(_cli(str(folders["llama"]), "--loss", "bogus", *small), "--loss must be one of")
    _assert_bad_input(_cli(str(folders["llama"]), "--mask-rate", "1.5", *small), "--mask-rate")


def test_cli_model_without_blocks(tmp_path) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4,
                                         conv_kernel=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)).eval()
    folder = save_tiny(mamba, tiny_tokenizer(), tmp_path / "mamba")
    _assert_bad_input(_cli(str(folder), "--seq-len", "16", "--max-tokens", "64"), "no transformer blocks")
