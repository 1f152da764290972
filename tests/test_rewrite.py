"""normscope rewrite: the exact Pre-LN -> Pre-RMSNorm (and CRMSNorm) conversion of Jiang et al. 2023.

Oracles: the model's own logits before and after (transformers' forward, not normscope's), direct computations
of LayerNorm, RMSNorm and of a folded linear, and the residual mean measured with plain forward hooks. The
phenomenon the rewrite relies on shows on every tiny model: the original stream's mean is far from zero (so LN
and RMSNorm differ there), the rewritten stream's is float32 rounding, and without the centring step the logits
no longer match.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from normscope.cli import app
from normscope.core.errors import NormscopeError
from normscope.core.sites import find_layout, find_norm_sites
from normscope.surgery import rewrite as rw
from normscope.surgery.options import MANIFEST
from tests.test_contract import SHARED_FLAGS, _bad_inputs, _flags, _help
from tests.tiny import save_tiny, tiny_bert, tiny_gpt2, tiny_gptneox, tiny_llama, tiny_opt, tiny_qwen3, tiny_tokenizer

runner = CliRunner()
SMALL = ["--seq-len", "16", "--max-tokens", "128", "--batch-size", "4"]
PRE_LN = {
    "gpt2": lambda: tiny_gpt2(),
    "opt": lambda: tiny_opt(),
    "gptneox": lambda: tiny_gptneox(parallel=False),
    "pythia": lambda: tiny_gptneox(parallel=True),
}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (3, 24), generator=torch.Generator().manual_seed(seed))  # [batch, pos]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()  # [batch, pos, vocab]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((b - a).norm(dim=-1) / a.norm(dim=-1)).max())


def _plan(model: nn.Module, name: str = "m") -> rw.RewritePlan:
    layout = find_layout(model)
    return rw.find_plan(model, layout, find_norm_sites(model, layout), name)


def _norm_input_mean_ratios(model: nn.Module, paths: list[str], ids: torch.Tensor) -> dict[str, float]:
    """max over tokens of |mean_d h| / rms(h) at the input of each module in ``paths``, by plain hooks."""
    seen: dict[str, float] = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, args, p=p: seen.__setitem__(p, float((args[0].double().mean(-1).abs()
                                                       / args[0].double().pow(2).mean(-1).sqrt()).max())))
        for p in paths]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---- the identity and the building blocks, against direct computations -----------------------------------
def test_layernorm_is_rmsnorm_of_the_centred_input_eps_included() -> None:
    x = torch.randn(5, 7, 32, dtype=torch.float64) * 3 + 2  # [batch, pos, d], a large mean
    for eps in (1e-5, 0.5):
        ln = nn.LayerNorm(32, eps=eps, elementwise_affine=False, dtype=torch.float64)
        rms = nn.RMSNorm(32, eps=eps, elementwise_affine=False, dtype=torch.float64)
        assert torch.allclose(ln(x), rms(x - x.mean(-1, keepdim=True)), atol=1e-12)
        assert not torch.allclose(ln(x), rms(x), atol=1e-3)  # uncentred, the two differ


@pytest.mark.parametrize("conv", [False, True])
def test_folding_a_norm_into_its_reader_equals_norm_then_reader(conv: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    d, out = 16, 12
    gain, bias = torch.randn(d), torch.randn(d)
    reader: nn.Module = Conv1D(out, d) if conv else nn.Linear(d, out, bias=False)
    ref = copy.deepcopy(reader)
    n = torch.randn(4, d)  # a normalised input [tokens, d]
    with torch.no_grad():
        added = rw.fold_into_reader(reader, gain, bias)
        assert torch.allclose(reader(n), ref(n * gain + bias), atol=1e-5)
    assert added is (not conv)  # the bias-free Linear got a bias; Conv1D always has one


def test_centring_a_writer_removes_the_mean_of_what_it_writes() -> None:
    torch.manual_seed(0)
    lin, emb = nn.Linear(8, 16), nn.Embedding(10, 16)
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = lin(x)
        rw.centre_writer(lin)
        rw.centre_writer(emb)
        assert torch.allclose(lin(x), before - before.mean(-1, keepdim=True), atol=1e-6)
        assert float(emb.weight.mean(-1).abs().max()) < 1e-7


def test_crmsnorm_of_the_first_d_minus_1_coordinates_is_rmsnorm_of_the_whole_vector() -> None:
    x = torch.randn(6, 20, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)  # zero mean, as on the rewritten stream
    c = rw.CRMSNorm(20, eps=1e-5).double()
    full = nn.RMSNorm(20, eps=1e-5, elementwise_affine=False, dtype=torch.float64)(x)
    assert torch.allclose(c(x[:, :-1]), full[:, :-1], atol=1e-12)


# ---- whole models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(PRE_LN))
def test_rewrite_keeps_the_logits_and_zeroes_the_residual_mean(arch: str) -> None:
    model = PRE_LN[arch]()
    plan = _plan(model, arch)
    new = copy.deepcopy(model)
    log = rw.rewrite(new, plan)
    ids = _ids()
    assert _max_rel(_logits(model, ids), _logits(new, ids)) < 1e-5
    assert not [p for p, m in new.named_modules() if isinstance(m, nn.LayerNorm)]
    for n in plan.norms:  # same eps, unit gain
        m = new.get_submodule(n.path)
        assert isinstance(m, nn.RMSNorm) and m.eps == n.eps
        assert n.eps == model.get_submodule(n.path).eps
    paths = [n.path for n in plan.norms]
    orig, rewritten = _norm_input_mean_ratios(model, paths, ids), _norm_input_mean_ratios(new, paths, ids)
    assert max(rewritten.values()) < 1e-5  # float32 rounding
    assert min(orig.values()) > 1e-2  # the original stream is not centred: LN and RMSNorm differ there
    assert len(log.centred) == len(plan.embeddings) + 2 * len(find_layout(model).blocks)
    assert log.logit_offset_spread > 0  # the final LN's bias is a per-vocabulary offset, not a softmax no-op


def test_the_plan_finds_each_architectures_readers_writers_and_parallel_blocks() -> None:
    g = _plan(PRE_LN["gpt2"]())
    assert g.tied and g.embeddings == ["transformer.wte", "transformer.wpe"]
    assert g.writers[:2] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    assert g.norms[0].readers == ["transformer.h.0.attn.c_attn"] and g.norms[-1].readers == ["lm_head"]
    o = _plan(PRE_LN["opt"]())
    assert sorted(r.rsplit(".", 1)[-1] for r in o.norms[0].readers) == ["k_proj", "q_proj", "v_proj"]
    assert "model.decoder.embed_positions" in o.embeddings and o.writers[1].endswith("fc2")
    assert _plan(PRE_LN["pythia"]()).parallel_blocks == [0, 1]
    assert _plan(PRE_LN["gptneox"]()).parallel_blocks == []


def test_gpt2_untied_unembedding_keeps_its_own_weights() -> None:
    model = PRE_LN["gpt2"]()
    new = copy.deepcopy(model)
    rw.rewrite(new, _plan(model))
    assert new.lm_head.weight is not new.transformer.wte.weight
    assert new.config.tie_word_embeddings is False
    assert float(new.transformer.wte.weight.mean(-1).abs().max()) < 1e-6  # the embedding is centred ...
    assert float(new.lm_head.weight.mean(-1).abs().max()) > 1e-3  # ... the unembedding is not


def test_without_centring_the_writers_the_swap_is_not_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    model = PRE_LN["gpt2"]()
    plan = _plan(model)
    monkeypatch.setattr(rw, "centre_writer", lambda mod: None)
    new = copy.deepcopy(model)
    rw.rewrite(new, plan)
    assert _max_rel(_logits(model, _ids()), _logits(new, _ids())) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "pythia"])
def test_crmsnorm_drops_one_coordinate_and_keeps_the_logits(arch: str) -> None:
    model = PRE_LN[arch]()
    plan = _plan(model)
    new = copy.deepcopy(model)
    rw.rewrite(new, plan)
    rw.compress(new, plan)
    emb = new.get_input_embeddings()
    assert emb.weight.shape[1] == plan.d_model - 1
    assert _max_rel(_logits(model, _ids()), _logits(new, _ids())) < 1e-5


@pytest.mark.parametrize(("factory", "words"), [
    (tiny_bert, "Post-LN"), (lambda: tiny_opt(pre_ln=False), "Post-LN"),
    (tiny_llama, "already uses RMSNorm"), (tiny_qwen3, "already uses RMSNorm"),
])
def test_models_the_identity_does_not_fit_are_refused_in_one_line(factory, words: str) -> None:
    model = factory()
    with pytest.raises(NormscopeError, match=words) as exc:
        _plan(model)
    assert "\n" not in str(exc.value)


# ---- the command ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_gpt2(), tiny_tokenizer(), tmp_path_factory.mktemp("rw") / "gpt2")


def test_rewrite_help_has_every_shared_option_and_examples() -> None:
    from normscope.surgery.options import RewriteOptions

    text = _help("rewrite")
    for flag in SHARED_FLAGS + _flags(RewriteOptions):
        assert f" {flag}" in text, flag
    assert "Examples" in text and "--export runs/gpt2-rms" in text


def test_rewrite_bad_input_is_one_line_and_exit_2_before_loading(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    cases = [*_bad_inputs(tmp_path), (["--to", "layernorm"], "--to must be one of"),
             (["--dtype", "bfloat16"], "verifies in float32"), (["--tolerance", "0"], "--tolerance must be above 0")]
    for args, words in cases:
        res = runner.invoke(app, ["rewrite", missing, *args])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, (args, res.output)
    for spec, words in (("smollm2-135m", "already uses RMSNorm"), ("minilm-l6", "Post-LN")):
        res = runner.invoke(app, ["rewrite", spec, "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and words in res.output and res.output.strip().count("\n") == 0, res.output
    llama = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")  # refused from its config alone
    res = runner.invoke(app, ["rewrite", str(llama), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "rms_norm_eps" in res.output


def test_rewrite_command_page_json_export_and_reload(gpt2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from normscope.core.models import REWRITE_MANIFEST, load_model

    out, exp = tmp_path / "rep", tmp_path / "gpt2-rms"
    res = runner.invoke(app, ["rewrite", str(gpt2_dir), *SMALL, "--out", str(out), "--export", str(exp), "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads((out / "rewrite.json").read_text())
    h = d["headlines"]
    assert h["passed"] is True and h["max_rel_logit_diff"] <= 1e-4 and h["max_resid_mean_ratio"] < 1e-5
    assert abs(h["ce_original"] - h["ce_rewritten"]) < 1e-4
    text = " ".join(d["summary"])
    assert "untied first" in text and "PASSED" in text and "{" not in text  # no template left unfilled
    assert (out / "rewrite.html").exists() and (out / "rewrite_residual_mean.csv").exists()
    assert 'href="rewrite.html"' in (out / "index.html").read_text()
    assert REWRITE_MANIFEST == MANIFEST and (exp / MANIFEST).exists()
    manifest = json.loads((exp / MANIFEST).read_text())
    assert manifest["to"] == "rmsnorm" and "lm_head" in manifest["biases_added"]
    original, rebuilt = load_model(str(gpt2_dir), device="cpu"), load_model(str(exp), device="cpu")
    assert isinstance(rebuilt.model.transformer.h[0].ln_1, nn.RMSNorm)
    ids = _ids(1)
    z0 = _logits(original.model, ids)
    assert _max_rel(z0, _logits(rebuilt.model, ids)) < 1e-5
    # plain transformers: unit-gain LayerNorms (the same function on a zero-mean stream), lm_head.bias dropped
    plain = AutoModelForCausalLM.from_pretrained(exp).eval()
    assert _max_rel(z0, _logits(plain, ids) + rebuilt.model.lm_head.bias.double()) < 1e-5
    # an existing export folder is never replaced unasked
    before = (exp / "model.safetensors").read_bytes()
    again = ["rewrite", str(gpt2_dir), *SMALL, "--out", str(tmp_path / "r2"), "--export", str(exp), "-q"]
    res = runner.invoke(app, again)
    assert res.exit_code == 2 and "--force" in res.output
    assert (exp / "model.safetensors").read_bytes() == before
    assert runner.invoke(app, [*again, "--force"]).exit_code == 0
    res = runner.invoke(app, ["rewrite", str(exp), "--out", str(tmp_path / "r3")])  # an export is not rewritten
    assert res.exit_code == 2 and "already the output" in res.output


def test_a_failed_check_exits_1_and_exports_nothing(gpt2_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rw, "centre_writer", lambda mod: None)  # sabotage: LN != RMSNorm on the stream
    exp = tmp_path / "exp"
    res = runner.invoke(app, ["rewrite", str(gpt2_dir), *SMALL, "--out", str(tmp_path / "r"), "--export", str(exp),
                              "-q"])
    assert res.exit_code == 1 and "nothing was exported" in res.output
    assert not exp.exists()
    d = json.loads((tmp_path / "r" / "rewrite.json").read_text())
    assert d["headlines"]["passed"] is False and d["headlines"]["max_resid_mean_ratio"] > 1e-2


def test_crmsnorm_export_loads_through_normscope(tmp_path: Path) -> None:
    from normscope.core.models import load_model

    pythia = save_tiny(tiny_gptneox(parallel=True), tiny_tokenizer(), tmp_path / "pythia")
    exp = tmp_path / "crms"
    res = runner.invoke(app, ["rewrite", str(pythia), *SMALL, "--to", "crmsnorm", "--out", str(tmp_path / "r"),
                              "--export", str(exp), "-q"])
    assert res.exit_code == 0, res.output
    h = json.loads((tmp_path / "r" / "rewrite.json").read_text())["headlines"]
    assert h["crms_max_rel_logit_diff"] <= 1e-4
    rebuilt = load_model(str(exp), device="cpu")
    assert rebuilt.model.get_input_embeddings().weight.shape[1] == 63
    original = load_model(str(pythia), device="cpu")
    assert _max_rel(_logits(original.model, _ids()), _logits(rebuilt.model, _ids())) < 1e-5
