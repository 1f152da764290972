"""Effective learning rates (Lyle et al. 2024) in ``normscope grads``: which weights a norm normalizes (checked by
scaling them in the real model), ||w||, lr/||w||^2, lr/||w|| and the per-step ||dw||/||w|| of an AdamW fine-tune,
against a hand computation; the bundled SmolLM2 against its GGUF file."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from normscope.analyses import grads
from normscope.analyses.grads.metrics import effective_lr, relative_update
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.writers import find_writers
from tests.test_grads import _lm, _sample
from tests.tiny import save_tiny, tiny_bert, tiny_gemma2, tiny_gpt2, tiny_llama, tiny_qwen3, tiny_tokenizer


def _writers(model: nn.Module):
    layout = find_layout(model)
    return find_writers(model, layout, find_norm_sites(model, layout))


# ---- which weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, want", [
    (tiny_llama, [("embed", "blocks.0.ln1"), ("blocks.0.self_attn.o_proj", "blocks.0.ln2"),
                  ("blocks.0.mlp.down_proj", "blocks.1.ln1"), ("blocks.1.self_attn.o_proj", "blocks.1.ln2"),
                  ("blocks.1.mlp.down_proj", "ln_final")]),
    (tiny_gpt2, [("embed", "blocks.0.ln1"), ("embed.wpe", "blocks.0.ln1"), ("blocks.0.attn.c_proj", "blocks.0.ln2"),
                 ("blocks.0.mlp.c_proj", "blocks.1.ln1"), ("blocks.1.attn.c_proj", "blocks.1.ln2"),
                 ("blocks.1.mlp.c_proj", "ln_final")]),
    (tiny_bert, [("embed", "embed.ln"), ("embed.token_type_embeddings", "embed.ln"),
                 ("embed.position_embeddings", "embed.ln"), ("blocks.0.attention.output.dense", "blocks.0.ln1_post"),
                 ("blocks.0.output.dense", "blocks.0.ln2_post"),
                 ("blocks.1.attention.output.dense", "blocks.1.ln1_post"),
                 ("blocks.1.output.dense", "blocks.1.ln2_post")]),
])
def test_writers_of_the_residual_stream(factory, want) -> None:
    ws = _writers(factory())
    assert [(w.name, w.site) for w in ws] == want
    assert all(w.invariance == "joint" for w in ws)  # a norm reads them as one term of a sum


def test_qk_norms_and_sandwich_norms_are_exactly_invariant() -> None:
    q = {w.name: (w.kind, w.site, w.invariance) for w in _writers(tiny_qwen3())}
    assert q["blocks.1.self_attn.q_proj"] == ("query", "blocks.1.attn.q_norm", "exact")
    assert q["blocks.1.self_attn.k_proj"] == ("key", "blocks.1.attn.k_norm", "exact")
    assert q["blocks.1.self_attn.o_proj"] == ("attention output", "blocks.1.ln2", "joint")
    g = {w.name: (w.site, w.invariance) for w in _writers(tiny_gemma2())}
    # Gemma2's output projections feed their post-norms alone; its pre-norms read a stream the post-norms write
    assert g == {"embed": ("blocks.0.ln1", "joint"),
                 **{f"blocks.{i}.self_attn.o_proj": (f"blocks.{i}.ln1_post", "exact") for i in (0, 1)},
                 **{f"blocks.{i}.mlp.down_proj": (f"blocks.{i}.ln2_post", "exact") for i in (0, 1)}}


def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # [1, pos, d] after ln_final


def _scaled(model: nn.Module, weights: list[nn.Parameter], c: float, ids: torch.Tensor) -> torch.Tensor:
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.mul_(c)
    try:
        return _final_hidden(model, ids)
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved, strict=True):
                w.copy_(s)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3])
def test_invariance_classes_hold_in_the_model(factory) -> None:
    """Scaling an 'exact' weight alone, or every 'joint' writer of the stream together, leaves the model's last
    hidden state as it was; scaling one 'joint' writer alone does not. The norms' eps (1e-5 against a mean square
    of about 4e-4 in these untrained models) is set to 1e-12 first: it is the only scale the norms carry."""
    model = factory(n_layers=2)
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-12
    ids = torch.tensor([[5, 17, 23, 42, 61, 7, 11, 13]])
    ref = _final_hidden(model, ids)
    ws = _writers(model)
    joint = [w.weight for w in ws if w.invariance == "joint"]

    def gap(params: list[nn.Parameter]) -> float:
        return float((_scaled(model, params, 3.0, ids) - ref).abs().max() / ref.abs().max())

    assert gap(joint) < 1e-4  # the whole residual stream scales: every norm divides it back
    one = next(w.weight for w in ws if w.kind == "MLP output")
    assert gap([one]) > 1e-2  # one writer alone shifts its share of the stream
    for w in ws:
        if w.invariance == "exact":
            assert gap([w.weight]) < 1e-4, w.name


# ---- against a hand computation ------------------------------------------------------------------------------
def test_metrics_by_hand() -> None:
    e = effective_lr(2.0, 16, 1e-3)
    assert e == pytest.approx({"sgd": 1e-3 / 4, "adam": 1e-3 / 2, "adam_first": 1e-3 * 4 / 2})
    assert relative_update(torch.tensor([3.0, 4.0]) * 1.1, torch.tensor([3.0, 4.0])) == pytest.approx(0.1)


def _adamw_by_hand(model: nn.Module, batches, lr: float, steps: int, names: dict[int, str]) -> list[dict[str, float]]:
    """``steps`` AdamW steps written out (Loshchilov & Hutter: decoupled decay, bias-corrected moments) on the
    mean next-token CE of batch k mod n; returns per step {writer name: ||dw||/||w||}. The model is changed."""
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    out = []
    for k in range(steps):
        b = batches[k % len(batches)]
        ids, att = b.input_ids, b.attention_mask
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits  # [batch, pos, vocab]
            keep = (att[:, 1:].bool() & att[:, :-1].bool()).reshape(-1)
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none")[keep].mean()
            gs = torch.autograd.grad(ce, params)
        old = {i: p.detach().clone() for i, p in enumerate(params) if id(p) in names}
        t = k + 1
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, gs, strict=True)):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                p.mul_(1 - lr * wd)
                p.sub_(lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps))
        out.append({names[id(params[i])]: float((params[i].detach() - o).norm() / o.norm()) for i, o in old.items()})
    for p in params:
        p.requires_grad_(False)
    return out


def test_effective_lr_and_fine_tune_match_hand_computation() -> None:
    model = tiny_llama(n_layers=2)
    sample = _sample(n=6, t=16, batch_size=2, pad_last=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr, steps = 3e-3, 4  # 4 steps over 3 batches: the cycle wraps
    res = grads.run(_lm(model), sample, lr=lr, steps=steps)
    # the loaded model is left exactly as it was: weights, requires_grad, .grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    table = res.tables["writers"].set_index("name")
    ws = _writers(model)
    assert list(table.index) == [w.name for w in ws]
    for w in ws:  # direct torch
        n = float(w.weight.detach().double().norm())
        assert n == pytest.approx(math.sqrt(float((w.weight.double() ** 2).sum())), rel=1e-12)
        assert table.loc[w.name, "weight_norm"] == pytest.approx(n, rel=1e-12)
        assert table.loc[w.name, "eff_lr_sgd"] == pytest.approx(lr / n ** 2, rel=1e-12)
        assert table.loc[w.name, "eff_lr_adam"] == pytest.approx(lr / n, rel=1e-12)
    want = _adamw_by_hand(model, sample.batches, lr, steps, {id(w.weight): w.name for w in ws})
    upd = res.tables["updates"]
    assert len(upd) == steps * len(ws)
    for k, per in enumerate(want):
        got = upd[upd["step"] == k + 1].set_index("name")["rel_update"]
        for name, rel in per.items():
            assert got[name] == pytest.approx(rel, rel=1e-4), (k, name)
    # Adam's first step moves every entry with a gradient by about lr: ||dw||/||w|| = lr / rms(w)
    assert (table["update_first"] / table["lr_over_rms"]).between(0.97, 1.0 + 1e-3).all()
    eff = res.payload["profiles"][0]["effective_lr"]
    assert eff["steps"] == steps and eff["optimizer"]["name"] == "AdamW" and len(eff["step_losses"]) == steps
    assert eff["writers"][0]["name"] == "embed" and eff["skipped_steps"] == []


def test_default_adds_no_pass_and_compare_overlays_the_writers() -> None:
    from normscope.analyses.suite import compare_results

    a = grads.run(_lm(tiny_llama(n_layers=4)), _sample(n=2))
    b = grads.run(_lm(tiny_gpt2(n_layers=2)), _sample(n=2))
    assert "updates" not in a.tables and a.payload["profiles"][0]["effective_lr"]["updates"] == []
    assert "update_first" not in a.tables["writers"]
    figs, deltas = compare_results("grads", a, b, "llama", "gpt2")
    titles = [f.title for f in figs]
    assert "grads: lr / ||w|| (Adam), by block (per weight a norm normalizes)" in titles, titles
    fig = next(f.fig for f in figs if f.title.startswith("grads: ||w||, by block"))
    assert sorted({t.name for t in fig.data}) == ["gpt2 (MLP output)", "gpt2 (attention output)",
                                                  "llama (MLP output)", "llama (attention output)"]
    assert "writers" in set(deltas["table"])


# ---- the bundled SmolLM2 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_writers_match_the_gguf_file(smollm2) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from normscope.core.models import bundled_path
    from normscope.core.text import TextOptions, load_text

    sample = load_text(smollm2.tokenizer, TextOptions(seq_len=64, max_tokens=128, batch_size=2, controls=False),
                       max_positions=smollm2.info.max_positions)
    before = smollm2.model.model.layers[3].mlp.down_proj.weight.detach().clone()
    res = grads.run(smollm2, sample, steps=1)
    assert torch.equal(smollm2.model.model.layers[3].mlp.down_proj.weight, before)  # shared fixture put back
    w = res.tables["writers"].set_index("name")
    assert len(w) == 61 and set(w["kind"]) == {"embedding", "attention output", "MLP output"}  # 1 + 30 + 30
    assert np.isfinite(w[["weight_norm", "eff_lr_sgd", "eff_lr_adam", "update_first"]].to_numpy()).all()
    tensors = {t.name: t for t in GGUFReader(bundled_path("smollm2-135m")).tensors}
    for gguf_name, name in (("token_embd.weight", "embed"), ("blk.3.ffn_down.weight", "blocks.3.mlp.down_proj"),
                            ("blk.29.attn_output.weight", "blocks.29.self_attn.o_proj")):
        t = tensors[gguf_name]
        direct = float(np.linalg.norm(dequantize(t.data, t.tensor_type).astype(np.float64)))
        assert w.loc[name, "weight_norm"] == pytest.approx(direct, rel=1e-6), name
    # one Adam step moves each matrix by about lr / rms(w) (measured 0.9995 and up); the (tied) embedding less
    # (measured 0.84), likely because the rows of tokens the model gives almost no probability get gradients
    # near AdamW's eps (1e-8), which damps their step
    ratio = w["update_first"] / w["lr_over_rms"]
    assert ratio.drop("embed").between(0.99, 1.001).all() and 0.5 < ratio["embed"] < 0.95


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_steps_and_lr(tmp_path) -> None:
    from normscope.cli import app

    folder = save_tiny(tiny_llama(n_layers=2), tiny_tokenizer(), tmp_path / "llama")
    runner = CliRunner()
    small = ["--seq-len", "16", "--max-tokens", "64"]
    res = runner.invoke(app, ["grads", str(folder), *small, "--steps", "2", "--lr", "1e-3", "--out",
                              str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    flat = re.sub(r"\s+", " ", res.output)
    assert "fine-tune 2 AdamW steps" in flat and "weights restored after" in flat  # the cost, said up front
    assert (tmp_path / "out" / "grads_writers.csv").exists() and (tmp_path / "out" / "grads_updates.csv").exists()
    for bad, words in ((["--steps", "-1"], "--steps"), (["--lr", "0"], "--lr")):
        res = runner.invoke(app, ["grads", str(folder), *small, *bad])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
