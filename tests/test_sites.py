"""Norm-site and block-layout discovery (normscope.core.sites) on 7 tiny architectures and the bundled models."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from rich.console import Console
from tiny import (
    ARCHITECTURES,
    VOCAB_SIZE,
    save_tiny,
    tiny_gpt2,
    tiny_gptneox,
    tiny_llama,
    tiny_opt,
    tiny_tokenizer,
    tiny_tokenizer_dir,
)
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.sites import (
    NormSite,
    batch_statistics_norms,
    find_layout,
    find_norm_sites,
    format_sites_table,
    is_norm_module,
    norm_divisor,
    probe_norm,
)

# arch -> (blocks path, attention path in block 0, MLP path in block 0, causal, unembedding present)
LAYOUTS = {
    "gpt2": ("transformer.h", "attn", "mlp", True, True),
    "llama": ("model.layers", "self_attn", "mlp", True, True),
    "qwen3": ("model.layers", "self_attn", "mlp", True, True),
    "gemma2": ("model.layers", "self_attn", "mlp", True, True),
    "bert": ("encoder.layer", "attention.self", None, False, False),
    "opt": ("model.decoder.layers", "self_attn", None, True, True),
    "gptneox": ("gpt_neox.layers", "attention", "mlp", True, True),
}

# arch -> (kind, eps, gain offset, has bias, [(name, role, path in block)], [(name, role, path) outside])
EXPECTED = {
    "gpt2": ("layernorm", 1e-5, 0.0, True, [("ln1", "pre_attn", "ln_1"), ("ln2", "pre_mlp", "ln_2")],
             [("ln_final", "final", "transformer.ln_f")]),
    "llama": ("rmsnorm", 1e-5, 0.0, False,
              [("ln1", "pre_attn", "input_layernorm"), ("ln2", "pre_mlp", "post_attention_layernorm")],
              [("ln_final", "final", "model.norm")]),
    "qwen3": ("rmsnorm", 1e-6, 0.0, False,
              [("ln1", "pre_attn", "input_layernorm"), ("attn.q_norm", "qk_norm", "self_attn.q_norm"),
               ("attn.k_norm", "qk_norm", "self_attn.k_norm"),
               ("ln2", "pre_mlp", "post_attention_layernorm")],
              [("ln_final", "final", "model.norm")]),
    "gemma2": ("rmsnorm", 1e-6, 1.0, False,
               [("ln1", "pre_attn", "input_layernorm"), ("ln1_post", "post_attn", "post_attention_layernorm"),
                ("ln2", "pre_mlp", "pre_feedforward_layernorm"),
                ("ln2_post", "post_mlp", "post_feedforward_layernorm")],
               [("ln_final", "final", "model.norm")]),
    "bert": ("layernorm", 1e-12, 0.0, True,
             [("ln1_post", "post_attn", "attention.output.LayerNorm"),
              ("ln2_post", "post_mlp", "output.LayerNorm")],
             [("embed.ln", "embedding", "embeddings.LayerNorm")]),
    "opt": ("layernorm", 1e-5, 0.0, True,
            [("ln1", "pre_attn", "self_attn_layer_norm"), ("ln2", "pre_mlp", "final_layer_norm")],
            [("ln_final", "final", "model.decoder.final_layer_norm")]),
    "gptneox": ("layernorm", 1e-5, 0.0, True,
                [("ln1", "pre_attn", "input_layernorm"), ("ln2", "pre_mlp", "post_attention_layernorm")],
                [("ln_final", "final", "gpt_neox.final_layer_norm")]),
}


def _expected_sites(arch: str, n_layers: int = 2) -> list[tuple[str, str, str]]:
    blocks_path = LAYOUTS[arch][0]
    _, _, _, _, per_block, outside = EXPECTED[arch]
    embed = [s for s in outside if s[1] == "embedding"]
    final = [s for s in outside if s[1] == "final"]
    inner = [(f"blocks.{i}.{n}", r, f"{blocks_path}.{i}.{p}")
             for i in range(n_layers) for n, r, p in per_block]
    return embed + inner + final


def _ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB_SIZE, (batch, seq), generator=torch.Generator().manual_seed(seed))  # [b, t]


def _call_order(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor) -> list[str]:
    """Paths of ``modules`` in the order their forward first returns in a real forward pass."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, p=p: order.append(p) if p not in order else None)
               for p, m in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return order


# ---- tiny architectures -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_sites_of_tiny_architectures(arch: str) -> None:
    model = ARCHITECTURES[arch]()
    sites = find_norm_sites(model)
    assert [(s.name, s.role, s.path) for s in sites] == _expected_sites(arch)
    kind, eps, offset, bias, _, _ = EXPECTED[arch]
    for s in sites:
        assert (s.kind, s.centered) == (kind, kind == "layernorm")
        assert s.eps == pytest.approx(eps, rel=1e-6)
        assert s.gain_offset == offset and s.has_gain and s.has_bias == bias
        assert s.layer == (int(s.name.split(".")[1]) if s.name.startswith("blocks.") else None)
        assert s.module is model.get_submodule(s.path)
        assert s.to_dict()["class"] == type(s.module).__name__
    qk = [s for s in sites if s.role == "qk_norm"]
    assert all(s.dim == 16 for s in qk) and all(s.dim == 64 for s in sites if s.role != "qk_norm")
    assert len({s.name for s in sites}) == len(sites)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layout_of_tiny_architectures(arch: str) -> None:
    model = ARCHITECTURES[arch]()
    layout = find_layout(model)
    blocks_path, attn, mlp, causal, has_unembed = LAYOUTS[arch]
    assert layout.blocks_path == blocks_path and layout.n_layers == 2
    assert (layout.d_model, layout.n_heads, layout.is_causal) == (64, 4, causal)
    assert layout.embed is model.get_input_embeddings()
    assert (layout.unembed is not None) == has_unembed and layout.unembed is model.get_output_embeddings()
    final = [s for s in EXPECTED[arch][5] if s[1] == "final"]
    assert (layout.final_norm.path if layout.final_norm else None) == (final[0][2] if final else None)
    for i, b in enumerate(layout.blocks):
        assert b.index == i and b.path == f"{blocks_path}.{i}" and b.module is model.get_submodule(b.path)
        assert b.attn_path == f"{b.path}.{attn}" and b.attn is model.get_submodule(b.attn_path)
        assert b.mlp_path == (f"{b.path}.{mlp}" if mlp else None)
        assert (b.mlp is None) == (mlp is None)
    # the attention module returns its output and the pattern [batch, heads, q, k] (rows sum to one)
    got: dict[str, torch.Tensor] = {}
    h = layout.blocks[1].attn.register_forward_hook(lambda m, a, o: got.update(out=o[0], pattern=o[1]))
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    assert got["pattern"].shape == (2, 4, 7, 7)
    torch.testing.assert_close(got["pattern"].sum(-1), torch.ones(2, 4, 7))
    assert (torch.triu(got["pattern"], diagonal=1).abs().max() == 0) == causal
    assert got["out"].shape[:2] == (2, 7)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_divisor_reproduces_the_module(arch: str) -> None:
    """module(x) == (x - mean?) / divisor(x) * (w + offset) + b, and the other kind does not fit."""
    model = ARCHITECTURES[arch]()
    gen = torch.Generator().manual_seed(1)
    for s in find_norm_sites(model):
        x = torch.randn(3, 5, s.dim, generator=gen) * 4.0 + 1.5  # [3, 5, d], non-zero mean
        with torch.no_grad():
            y = s.module(x)  # [3, 5, d]
        xc = x - x.mean(-1, keepdim=True) if s.centered else x
        gain = s.module.weight + s.gain_offset  # [d]
        bias = s.module.bias if s.has_bias else 0.0
        torch.testing.assert_close(y, xc / s.divisor(x) * gain + bias, rtol=1e-5, atol=1e-5)
        wrong = norm_divisor(x, centered=not s.centered, eps=s.eps)  # [3, 5, 1]
        assert not torch.allclose(s.divisor(x), wrong, rtol=1e-3)
        x_big = x * 1000.0  # the divisor scales with the input, as a norm must
        torch.testing.assert_close(s.divisor(x_big), s.divisor(x) * 1000.0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_site_order_is_forward_order(arch: str) -> None:
    model = ARCHITECTURES[arch]()
    sites = find_norm_sites(model)
    layout = find_layout(model)
    watched = {s.path: s.module for s in sites}
    watched.update({b.attn_path: b.attn for b in layout.blocks})
    order = _call_order(model, watched, _ids())
    assert [p for p in order if p in {s.path for s in sites}] == [s.path for s in sites]
    # pre-attention norms return before their attention, post-attention norms after it
    for s in sites:
        if s.layer is None or s.role not in ("pre_attn", "post_attn"):
            continue
        attn = layout.blocks[s.layer].attn_path
        assert (order.index(s.path) < order.index(attn)) == (s.role == "pre_attn")


def test_post_ln_and_sequential_variants() -> None:
    """OPT-350m style post-LN blocks and non-parallel GPT-NeoX blocks are placed from the data flow."""
    post = find_norm_sites(tiny_opt(pre_ln=False))
    assert [(s.name, s.role) for s in post] == [
        ("blocks.0.ln1_post", "post_attn"), ("blocks.0.ln2_post", "post_mlp"),
        ("blocks.1.ln1_post", "post_attn"), ("blocks.1.ln2_post", "post_mlp"),
    ]
    seq = find_norm_sites(tiny_gptneox(parallel=False))
    assert [(s.name, s.role) for s in seq] == [
        ("blocks.0.ln1", "pre_attn"), ("blocks.0.ln2", "pre_mlp"),
        ("blocks.1.ln1", "pre_attn"), ("blocks.1.ln2", "pre_mlp"), ("ln_final", "final"),
    ]


def _tiny_from(config_name: str, model_name: str, **kw: object) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=VOCAB_SIZE, **kw)
    return getattr(transformers, model_name)._from_config(config, attn_implementation="eager").eval()


_DEC = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}


@pytest.mark.parametrize("config_name,model_name,kw,expected", [
    # OLMo2: post-norms only (on the attention and MLP outputs) and full-width q/k norms
    ("Olmo2Config", "Olmo2ForCausalLM", _DEC,
     ["blocks.0.attn.q_norm", "blocks.0.attn.k_norm", "blocks.0.ln1_post", "blocks.0.ln2_post", "ln_final"]),
    # Gemma3: sandwich norms plus per-head q/k norms, all with 1 + w gains
    ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_DEC, "head_dim": 16, "num_key_value_heads": 2},
     ["blocks.0.ln1", "blocks.0.attn.q_norm", "blocks.0.attn.k_norm", "blocks.0.ln1_post", "blocks.0.ln2",
      "blocks.0.ln2_post", "ln_final"]),
    # BLOOM: a LayerNorm on the word embeddings; the attention module adds the residual itself
    ("BloomConfig", "BloomForCausalLM", {"hidden_size": 64, "n_layer": 1, "n_head": 4},
     ["embed.ln", "blocks.0.ln1", "blocks.0.ln2", "ln_final"]),
    # Cohere: parallel attention and MLP behind one bias-free LayerNorm
    ("CohereConfig", "CohereForCausalLM", _DEC, ["blocks.0.ln1", "ln_final"]),
])
def test_more_architectures(config_name: str, model_name: str, kw: dict, expected: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _tiny_from(config_name, model_name, **kw)
    sites = find_norm_sites(model)
    assert [s.name for s in sites] == expected
    assert all(s.gain_offset == (1.0 if "Gemma" in model_name else 0.0) for s in sites)
    roles = {"ln1": "pre_attn", "ln2": "pre_mlp", "ln1_post": "post_attn", "ln2_post": "post_mlp",
             "q_norm": "qk_norm", "k_norm": "qk_norm", "ln_final": "final", "ln": "embedding"}
    assert [s.role for s in sites] == [roles[s.name.rsplit(".", 1)[-1]] for s in sites]


def test_encoder_decoder_models_are_refused() -> None:
    model = _tiny_from("T5Config", "T5ForConditionalGeneration", d_model=64, d_ff=128, num_layers=1,
                       num_heads=4, d_kv=16)
    with pytest.raises(NormscopeError, match="encoder-decoder"):
        find_norm_sites(model)


def test_training_mode_and_hooks_are_restored() -> None:
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()
    find_norm_sites(model)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---- detection by class and by numbers ----------------------------------------------------------------
class CustomLayerNorm(nn.Module):
    """An unknown class that centres: must be read as a LayerNorm from its numbers (``epsilon`` attribute)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.epsilon = 1e-4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(-1, keepdim=True)
        return self.weight * xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + self.epsilon)


class OffsetNorm(nn.Module):
    """Gemma-style ``x / rms * (1 + w)`` under a class name that says nothing about it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(d))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class MaxNorm(nn.Module):
    """Named like a norm, has an eps and a gain, but divides by the max: neither LayerNorm nor RMSNorm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / (x.abs().amax(-1, keepdim=True) + self.eps)


def test_unknown_norm_classes_are_read_from_their_numbers() -> None:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    model = tiny_gpt2()
    blocks = model.transformer.h
    blocks[0].ln_1 = T5LayerNorm(64, eps=1e-6)  # "LayerNorm" in the name, but an RMSNorm
    blocks[0].ln_2 = CustomLayerNorm(64)
    blocks[1].ln_1 = OffsetNorm(64)
    blocks[1].ln_2 = MaxNorm(64)
    blocks[1].unused_norm = nn.LayerNorm(64)  # never called: kept, unplaced, last
    blocks[1].bn = nn.BatchNorm1d(64)  # not a token norm
    with pytest.warns(UserWarning, match="neither LayerNorm nor RMSNorm"):
        sites = find_norm_sites(model)
    got = {s.name: (s.role, s.kind, s.eps, s.gain_offset, type(s.module).__name__) for s in sites}
    assert list(got) == ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "ln_final", "blocks.1.unused_norm"]
    assert got["blocks.0.ln1"] == ("pre_attn", "rmsnorm", 1e-6, 0.0, "T5LayerNorm")
    assert got["blocks.0.ln2"] == ("pre_mlp", "layernorm", 1e-4, 0.0, "CustomLayerNorm")
    assert got["blocks.1.ln1"] == ("pre_attn", "rmsnorm", 1e-6, 1.0, "OffsetNorm")
    assert got["blocks.1.unused_norm"][:2] == ("other", "layernorm")
    assert not is_norm_module(blocks[1].bn) and not is_norm_module(nn.GroupNorm(4, 64))
    assert batch_statistics_norms(model) == [("transformer.h.1.bn", "BatchNorm1d")]  # recognised, not analysed
    assert is_norm_module(nn.RMSNorm(64)) and is_norm_module(nn.LayerNorm(64, elementwise_affine=False))
    assert probe_norm(nn.LayerNorm(64, elementwise_affine=False), 64, 1e-5) == (True, 0.0)
    assert probe_norm(nn.RMSNorm(64, eps=1e-6), 64, 1e-6) == (False, 0.0)


def test_a_model_without_norms_or_blocks_is_a_clear_error() -> None:
    model = tiny_gpt2()
    for block in model.transformer.h:
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    model.transformer.ln_f = nn.Identity()
    with pytest.raises(NormscopeError, match="no normalization layers"):
        find_norm_sites(model)
    assert find_layout(model).n_layers == 2  # the blocks are still there
    with pytest.raises(NormscopeError, match="no transformer blocks normscope recognises"):
        find_layout(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


def test_format_sites_table() -> None:
    sites = find_norm_sites(ARCHITECTURES["gemma2"]())
    table = format_sites_table(sites, title="tiny gemma2")
    # kind, eps, gain offset, bias and class are the same for every site: they move to the caption
    assert [c.header for c in table.columns] == ["name", "layer", "role", "path"]
    assert table.caption == "every site: kind rmsnorm, eps 1e-06, gain offset 1, bias no, class Gemma2RMSNorm"
    assert table.row_count == len(sites) == 9
    out = io.StringIO()
    Console(file=out, width=220).print(table)
    text = out.getvalue()
    assert "blocks.1.ln2_post" in text and "model.layers.1.post_feedforward_layernorm" in text
    assert "Gemma2RMSNorm" in text and "1e-06" in text
    narrow = io.StringIO()
    Console(file=narrow, width=80).print(table)  # a narrow console keeps names, roles and paths whole
    assert "blocks.1.ln2_post" in narrow.getvalue() and "post_mlp" in narrow.getvalue()
    assert "model.layers.1.post_" in narrow.getvalue()  # the path folds, but is there
    mixed = format_sites_table(find_norm_sites(ARCHITECTURES["gpt2"]()))  # one column kept when values differ
    assert "path" in [c.header for c in mixed.columns]


# ---- tests.tiny helpers ---------------------------------------------------------------------------------
def test_tiny_tokenizer_and_saved_models_load_offline(tmp_path) -> None:
    from transformers import AutoTokenizer

    from normscope.core.models import load_model

    text = "The cat sat on the mat, twice."
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < VOCAB_SIZE and len(tok) <= VOCAB_SIZE
    for arch in ("llama", "bert"):
        model = ARCHITECTURES[arch]()
        folder = save_tiny(model, tiny_tokenizer(), tmp_path / arch)
        lm = load_model(str(folder), device="cpu")
        assert lm.info.n_layers == 2 and lm.info.is_causal == (arch == "llama")
        x = torch.tensor([ids])  # [1, t]
        with torch.no_grad():
            a, b = model(input_ids=x), lm.model(input_ids=x)
        key = "logits" if arch == "llama" else "last_hidden_state"
        torch.testing.assert_close(a[key], b[key])
        assert [s.name for s in find_norm_sites(lm.model)] == [s[0] for s in _expected_sites(arch)]


# ---- TransformerLens cross-check ----------------------------------------------------------------------
@pytest.mark.parametrize("factory,name", [(tiny_gpt2, "gpt2"), (tiny_llama, "meta-llama/Llama-3.2-1B")])
def test_divisor_matches_transformer_lens_hook_scale(tmp_path, factory, name) -> None:
    """Our divisor on the HF model's captured norm inputs equals TL's ``hook_scale`` on its own copy."""
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens.model_bridge import TransformerBridge

        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))  # TL needs a tokenizer with a path
        bridge = TransformerBridge.boot_transformers(name, hf_model=factory(), tokenizer=tok, device="cpu")
    ids = _ids(seed=3)
    logits_tl, cache = bridge.run_with_cache(ids)
    model = factory()  # its own instance: the bridge rewrote the first one
    sites = {s.name: s for s in find_norm_sites(model)}
    assert set(sites) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"}
    inputs: dict[str, torch.Tensor] = {}
    handles = [s.module.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
               for n, s in sites.items()]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(logits, logits_tl.detach(), rtol=1e-4, atol=1e-4)
    for n, s in sites.items():
        torch.testing.assert_close(s.divisor(inputs[n]), cache[f"{n}.hook_scale"], rtol=1e-5, atol=1e-6)


# ---- the bundled models ---------------------------------------------------------------------------------
PROSE = ("The old house stood at the end of the lane, and every evening the children ran past it on their "
         "way home from school, never daring to look through the broken windows.")


@pytest.mark.slow
def test_smollm2_sites_and_the_massive_activation(smollm2) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    layout = find_layout(model)
    sites = find_norm_sites(model, layout)
    assert len(sites) == 61
    assert [s.name for s in sites] == [f"blocks.{i}.ln{k}" for i in range(30) for k in (1, 2)] + ["ln_final"]
    assert {(s.kind, s.gain_offset, s.has_bias, type(s.module).__name__) for s in sites} == {
        ("rmsnorm", 0.0, False, "LlamaRMSNorm")}
    assert all(s.eps == pytest.approx(1e-5, rel=1e-6) for s in sites)  # 1e-5 stored as float32 in the GGUF
    assert (layout.n_layers, layout.d_model, layout.n_heads, layout.is_causal) == (30, 576, 9, True)
    assert layout.final_norm is not None and layout.final_norm.path == "model.norm"
    by_name = {s.name: s for s in sites}
    watch = ["blocks.2.ln1", "blocks.12.ln1", "blocks.20.ln2"]
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for n in watch:
        m = by_name[n].module
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0])))
        handles.append(m.register_forward_hook(lambda mod, a, o, n=n: outputs.__setitem__(n, o)))
    ids = tok(PROSE, return_tensors="pt")["input_ids"][:, :32]  # [1, 32]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for n in watch:
        s, x = by_name[n], inputs[n][0]  # [32, 576]
        torch.testing.assert_close(outputs[n][0], x / s.divisor(x) * s.module.weight, rtol=1e-4, atol=1e-4)
    # the massive activation in dim 507 at position 0 (~22,500 from layer 12) inflates the RMS divisor there
    x12 = inputs["blocks.12.ln1"][0]  # [32, 576], the residual entering block 12
    assert int(x12[0].abs().argmax()) == 507 and float(x12[0, 507].abs()) > 10_000
    div = by_name["blocks.12.ln1"].divisor(x12)[:, 0]  # [32]
    assert float(div[0] / div[1:].median()) > 50
    div2 = by_name["blocks.2.ln1"].divisor(inputs["blocks.2.ln1"][0])[:, 0]  # [32], dim 507 ~180 at layer 2
    assert float(div[0]) > 20 * float(div2[0])


@pytest.mark.slow
def test_minilm_post_ln_sites(minilm) -> None:
    model = minilm.model
    layout = find_layout(model)
    sites = find_norm_sites(model, layout)
    assert len(sites) == 13
    per_block = (("ln1_post", "post_attn"), ("ln2_post", "post_mlp"))
    assert [(s.name, s.role) for s in sites] == [("embed.ln", "embedding")] + [
        (f"blocks.{i}.{n}", r) for i in range(6) for n, r in per_block]
    assert all(s.kind == "layernorm" and s.has_bias and s.eps == 1e-12 for s in sites)
    assert (layout.n_layers, layout.d_model, layout.n_heads, layout.is_causal) == (6, 384, 12, False)
    assert layout.unembed is None and layout.final_norm is None
    assert all(type(b.attn).__name__ == "BertSelfAttention" and b.mlp is None for b in layout.blocks)
    # post-LN: what leaves each block is exactly the output of its ln2_post
    by_name = {s.name: s for s in sites}
    got: dict[str, torch.Tensor] = {}
    handles = [by_name["blocks.3.ln2_post"].module.register_forward_hook(lambda m, a, o: got.update(ln=o)),
               layout.blocks[3].module.register_forward_hook(lambda m, a, o: got.update(block=o))]
    enc = minilm.tokenizer(PROSE, return_tensors="pt")
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    block_out = got["block"][0] if isinstance(got["block"], tuple) else got["block"]
    assert torch.equal(block_out, got["ln"])


def test_norm_site_dataclass_contract() -> None:
    site = find_norm_sites(tiny_llama())[0]
    assert isinstance(site, NormSite)
    d = site.to_dict()
    assert set(d) >= {"name", "layer", "role", "kind", "centered", "eps", "gain_offset", "has_gain",
                      "has_bias", "path", "class", "dim"}
    assert d["name"] == "blocks.0.ln1" and d["class"] == "LlamaRMSNorm"


def test_layout_stays_causal_when_the_probe_overflows() -> None:
    """A model whose probe pass overflows (NaN attention) is still found causal, not taken for an encoder."""
    model = tiny_llama().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.fill_(float("nan"))  # NaN scores: every pattern entry is NaN
    assert find_layout(model).is_causal
