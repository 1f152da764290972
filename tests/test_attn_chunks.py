"""Chunked attention statistics: the pattern's column sums from queries and keys beside SDPA, against the eager
pattern (random tensors, tiny Llama with GQA, GPT-2, a BERT encoder with padding, the bundled SmolLM2), the automatic
choice of path, and the host syncs of a capture pass."""

from __future__ import annotations

import math

import pytest
import torch

from normscope.core.attention import sink_scores, sink_scores_from_col_sum
from normscope.core.attn_chunks import pattern_col_sum
from normscope.core.capture import Capture
from normscope.core.nonfinite import FiniteWatch
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import TokenBatch, sample_from_ids
from tests.tiny import tiny_bert, tiny_gpt2, tiny_llama


def _eager_col_sum(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The whole pattern, as transformers' eager attention computes it (repeat_kv, additive finfo.min mask)."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)  # [batch, head, key, d]
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [batch, head, q, k]
    neg = torch.finfo(torch.float32).min
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), neg)
    if mask is not None:
        s = s.masked_fill(~mask, neg) if mask.dtype == torch.bool else s + mask
    if bias is not None:
        s = s + bias
    return s.softmax(-1).sum(dim=2)  # [batch, head, key]


@pytest.mark.parametrize("chunk", [1, 37, 1 << 22])  # one row per chunk, ragged chunks, one chunk
def test_col_sum_matches_the_eager_pattern(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 13, 8, generator=g) * 3  # [batch, head, q, d]: sharp rows
    k = torch.randn(2, 3, 13, 8, generator=g) * 3  # 3 key heads for 6 query heads (GQA)
    pad = torch.ones(2, 1, 13, 13, dtype=torch.bool)
    pad[1, :, :, 10:] = False  # the second sequence's last 3 keys are padding
    causal_pad = pad & torch.ones(13, 13, dtype=torch.bool).tril()
    additive = torch.zeros(2, 1, 13, 13).masked_fill(~causal_pad, torch.finfo(torch.float32).min)
    bias = torch.randn(1, 6, 13, 13, generator=g)
    cases = [  # (mask, is_causal, bias, the eager reference)
        (None, True, None, _eager_col_sum(q, k, None, True)),
        (None, False, None, _eager_col_sum(q, k, None, False)),
        (pad, False, None, _eager_col_sum(q, k, pad, False)),
        (causal_pad, False, None, _eager_col_sum(q, k, causal_pad, False)),
        (additive, False, None, _eager_col_sum(q, k, additive, False)),
        (None, True, bias, _eager_col_sum(q, k, None, True, bias)),
    ]
    for mask, causal, pb, ref in cases:
        got = pattern_col_sum(q, k, mask, None, causal, pb, chunk_elements=chunk)
        assert got.shape == (2, 6, 13)
        assert torch.allclose(got, ref, atol=1e-5), (mask is None, causal, pb is None)
    # every row sums to one, so the column sums add up to the number of queries
    assert torch.allclose(pattern_col_sum(q, k, None, None, True).sum(-1), torch.full((2, 6), 13.0), atol=1e-4)


def _padded_batches(n_pad: int) -> list[TokenBatch]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 120, (3, 24), generator=g)  # [batch, pos]
    mask = torch.ones_like(ids)
    if n_pad:
        mask[1, -n_pad:] = 0  # right padding, as tokenizers pad encoders
        ids[1, -n_pad:] = 0
    return [TokenBatch(ids, mask, ["prose"] * 3)]


class _Keep:
    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, ctx: object) -> None:
        self.x.append(x.clone())


@pytest.mark.parametrize(("factory", "n_pad"), [(tiny_llama, 0), (tiny_llama, 5), (tiny_gpt2, 0), (tiny_bert, 7)])
def test_chunked_path_equals_eager_patterns_in_tiny_models(factory, n_pad: int) -> None:
    """Llama (4 query heads on 2 key heads, RoPE), GPT-2 (fused c_attn) and BERT (no causal mask, padded keys):
    hook_col_sum from the chunked path equals the eager pattern's column sums, the model's output is unchanged,
    and the model has its own attention implementation back afterwards."""
    model = factory()
    layout, batches = find_layout(model), _padded_batches(n_pad)
    sites = find_norm_sites(model, layout)
    ids, mask = batches[0].input_ids, batches[0].attention_mask
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    cap = Capture(model, layout, sites)  # auto
    keep = {b.index: cap.add(f"blocks.{b.index}.attn.hook_col_sum", _Keep()) for b in layout.blocks}
    outs: list[torch.Tensor] = []
    with cap:
        cap.run(batches, on_output=lambda o, ctx: outs.append(o[0]))
        assert cap.attention_path == "chunked"
        assert model.config._attn_implementation != "eager"  # SDPA ran
    assert model.config._attn_implementation == "eager"
    assert torch.allclose(outs[0], ref[0], atol=1e-5)  # SDPA's output is the eager output
    for b in layout.blocks:
        pattern = ref.attentions[b.index]  # [batch, head, q, k]
        got = keep[b.index].x[0]  # [batch, head, key]
        assert torch.allclose(got, pattern.sum(dim=2), atol=1e-5)
        causal = factory is not tiny_bert
        assert torch.allclose(sink_scores_from_col_sum(got, ids.shape[1], causal), sink_scores(pattern, causal),
                              atol=1e-5)
    if n_pad:  # padded keys get no attention from any query
        assert float(keep[0].x[0][1, :, -n_pad:].abs().max()) < 1e-6


def test_smollm2_chunked_alpha_equals_eager_and_shows_its_sinks(smollm2) -> None:
    """The bundled SmolLM2 (9 query heads on 3 key heads): alpha_k from both paths agree to 1e-5, and alpha_1 rises
    from a fifth of the attention at layer 0 to most of it in deep layers (REFERENCE.md: ~0.03 -> ~0.78 at T = 64;
    at T = 20 every share is larger)."""
    lm = smollm2
    layout = find_layout(lm.model)
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door."
    ids = lm.tokenizer(text)["input_ids"][:20]
    sample = sample_from_ids([ids, ids[::-1]], ["prose", "prose"])
    cols: dict[str, dict[int, torch.Tensor]] = {}
    for path in ("chunked", "eager"):
        cap = Capture(lm.model, layout, [], attention=path)
        keep = {b.index: cap.add(f"blocks.{b.index}.attn.hook_col_sum", _Keep()) for b in layout.blocks}
        with cap:
            cap.run(sample.iter_batches())
        assert cap.attention_path == path
        cols[path] = {i: k.x[0] for i, k in keep.items()}
    for i in cols["eager"]:
        a_chunk = sink_scores_from_col_sum(cols["chunked"][i], 20, True)
        a_eager = sink_scores_from_col_sum(cols["eager"][i], 20, True)
        assert torch.allclose(a_chunk, a_eager, atol=1e-5), i
    alpha1 = [float(sink_scores_from_col_sum(cols["chunked"][i], 20, True)[:, :, 0].mean()) for i in range(30)]
    assert alpha1[0] < 0.25 and max(alpha1[18:28]) > 0.7  # measured: 0.20 at layer 0, 0.80 at layer 24 (T = 20)


def test_auto_keeps_eager_when_a_statistic_reads_whole_patterns() -> None:
    model = tiny_llama()
    model.set_attn_implementation("sdpa")  # loaded without patterns: the eager path switches to eager and back
    layout = find_layout(model)
    cap = Capture(model, layout, [])
    col = cap.add("blocks.0.attn.hook_col_sum", _Keep())
    pat = cap.add("blocks.1.attn.hook_pattern", _Keep())
    with cap:
        cap.run(_padded_batches(0))
        assert cap.attention_path == "eager" and "whole T x T" in cap.attention_reason
    assert model.config._attn_implementation == "sdpa"
    assert col.x[0].shape == (3, 4, 24) and pat.x[0].shape == (3, 4, 24, 24)
    assert torch.allclose(col.x[0].sum(-1), torch.full((3, 4), 24.0), atol=1e-4)


def test_col_sum_is_not_an_intervention_point() -> None:
    from normscope.core.errors import NormscopeError

    model = tiny_llama()
    cap = Capture(model, find_layout(model), [])
    with pytest.raises(NormscopeError, match="not a tensor the model uses"):
        cap.intervene("blocks.0.attn.hook_col_sum", lambda x, ctx: x)
    with pytest.raises(NormscopeError, match="Unknown attention path"):
        Capture(model, find_layout(model), [], attention="flash")


# ---- host syncs ------------------------------------------------------------------------------------------
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def _count_host_reads(monkeypatch: pytest.MonkeyPatch, fn) -> int:  # type: ignore[no-untyped-def]
    """Calls of the Tensor methods that bring a value to the host (each one a device sync on an accelerator)."""
    calls = [0]
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return calls[0]


def test_host_reads_per_forward_do_not_grow_with_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With reducers that keep their sums on the device, a capture pass reads the host a fixed number of times per
    batch (the inf/NaN sums once, whatever the number of hooks): 2 and 6 layers read the same number of times."""
    counts = {}
    for n_layers in (2, 6):
        model = tiny_llama(n_layers=n_layers)
        layout = find_layout(model)
        sites = find_norm_sites(model, layout)
        cap = Capture(model, layout, sites)
        for b in layout.blocks:
            cap.add(f"blocks.{b.index}.hook_resid_post", FiniteWatch())
            cap.add(f"blocks.{b.index}.attn.hook_col_sum", FiniteWatch())
        for s in sites:
            cap.add(f"{s.name}.hook_in", FiniteWatch())
        batches = _padded_batches(0) * 2
        with cap:
            cap.run(batches[:1])  # warm-up: transformers' first-call checks
            counts[n_layers] = _count_host_reads(monkeypatch, lambda cap=cap, batches=batches: cap.run(batches))
        assert cap.nonfinite_report() == []
    assert counts[2] == counts[6]
    assert counts[2] <= 2 * 4  # a few per batch, two batches


def test_massive_entries_cost_one_host_read_per_update(monkeypatch: pytest.MonkeyPatch) -> None:
    from normscope.analyses.sinks.reducers import ResidualReducer
    from normscope.core.capture import BatchContext

    ids = torch.arange(2 * 8).reshape(2, 8)
    ctx = BatchContext(ids, torch.ones_like(ids), ["x", "x"], 0)
    reads = {}
    for n_massive in (1, 12):
        h = torch.full((2, 8, 32), 0.01)  # [batch, pos, d_model]
        for j in range(n_massive):
            h[j % 2, j % 8, 5 + j % 3] = 500.0 + j
        r = ResidualReducer(0, 100.0, 1000.0)
        reads[n_massive] = _count_host_reads(monkeypatch, lambda r=r, h=h: r.update(h, ctx))
        assert sum(r.massive_count.values()) == n_massive
        assert max(e[1] for e in r.massive.values()) == 500.0 + n_massive - 1
        big = max(r.massive.values(), key=lambda e: e[1])
        assert big[3] == int(ids[(n_massive - 1) % 2, (n_massive - 1) % 8])  # the token at the largest
    assert reads[1] == reads[12]
