"""swap: the DyT / Derf / SeeDNorm functions, the per-site fit, training on remove-ln's loop (resume), the CLI.

Tiny random Llama / GPT-2 models from ``tests.tiny``; every function is checked against its formula written out
directly, and the fit against a brute-force least-squares solve on the same activations.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from normscope.core.capture import Capture
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import sample_from_ids
from normscope.swap.fit import GridSums, error_table, fit_sites, make_function
from normscope.swap.functions import Derf, DyT, SeeDNorm, alpha_grid
from normscope.swap.pipeline import SwapOptions, run, swap_train_options
from normscope.swap.site import SwapWrappers, swap_schedule
from tests.tiny import one_line_error, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
        "cabbage and old rag mats. At one end of it a coloured poster had been tacked to the wall. ")


def _sample(n_seq: int = 32, t: int = 16, batch: int = 4, seed: int = 0):
    ids = torch.randint(4, 100, (n_seq, t), generator=torch.Generator().manual_seed(seed))  # [batch, pos]
    return sample_from_ids(ids.tolist(), ["x"] * n_seq, batch_size=batch)


def _setup(factory):
    model = factory()
    layout = find_layout(model)
    return model, layout, find_norm_sites(model, layout)


# ---- the functions -----------------------------------------------------------------------------------------
def test_functions_match_their_formulas_written_out():
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(2, 5, 8, generator=g)  # [batch, pos, d]
    gamma, beta = torch.randn(8, generator=g), torch.randn(8, generator=g)
    f = DyT(8, 0.7, gamma, beta)
    ref = torch.tensor([[[gamma[j] * math.tanh(0.7 * float(x[b, p, j])) + beta[j] for j in range(8)]
                         for p in range(5)] for b in range(2)])
    assert torch.allclose(f(x), ref, atol=1e-6)
    assert DyT(8, 0.7, gamma).beta is None  # the Llama variant: no beta where the norm has no bias
    f = Derf(8, 0.3, gamma, beta, shift=0.2)
    ref = torch.tensor([[[gamma[j] * math.erf(0.3 * float(x[b, p, j]) + 0.2) + beta[j] for j in range(8)]
                         for p in range(5)] for b in range(2)])
    assert torch.allclose(f(x), ref, atol=1e-6)
    f = SeeDNorm(8, 1e-5, gamma)
    with torch.no_grad():
        f.beta.copy_(0.1 * torch.randn(8, generator=g))
        f.alpha.copy_(torch.randn(8, generator=g))
    row = x[1, 3]  # [d]
    rms = math.sqrt(float(row.pow(2).mean()) + 1e-5)
    s = math.tanh(float(row @ f.beta.detach()))
    ref_row = torch.tensor([(s * float(f.alpha[j].detach()) + float(gamma[j])) * float(row[j]) / rms for j in range(8)])
    assert torch.allclose(f(x)[1, 3], ref_row, atol=1e-5)
    assert f(x.to(torch.bfloat16)).dtype == torch.bfloat16  # computed in fp32, returned in the input's dtype


def test_seednorm_at_init_is_the_rmsnorm_site_and_the_swapped_model_gives_the_same_logits():
    model, layout, sites = _setup(tiny_llama)
    ids = _sample(4, 16).batches[0].input_ids  # [batch, pos]
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # [batch, pos, vocab]
    inits = fit_sites(model, layout, sites, "seednorm", [])
    from normscope.removal.frozen import Removal

    rem = Removal(model, layout, sites, split_value=False, wrapper=SwapWrappers({n: i.fn for n, i in inits.items()}))
    for w in rem:
        w.freeze(0)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert all(w.frozen for w in rem) and float((out - ref).abs().max()) < 1e-6
    rem.uninstall()


# ---- the fit --------------------------------------------------------------------------------------------------
def _site_activations(model, layout, site, batches, start=0):
    """Every (input, output) row of one site at positions >= start, kept whole (only a test can afford that)."""
    xs, ys = [], []

    class Keep:
        def __init__(self, into):
            self.into = into

        def update(self, x, ctx):
            self.into.append(x[:, start:].reshape(-1, x.shape[-1]).float())

    cap = Capture(model, layout, [site])
    cap.add(f"{site.name}.hook_in", Keep(xs))
    cap.add(f"{site.name}.hook_out", Keep(ys))
    with cap:
        cap.run(batches)
    return torch.cat(xs), torch.cat(ys)  # [n, d] each


@pytest.mark.parametrize("factory,target", [(tiny_llama, "dyt"), (tiny_gpt2, "dyt"), (tiny_llama, "derf")])
def test_fit_is_the_least_squares_optimum_on_its_grid_and_beats_the_naive_init(factory, target):
    model, layout, sites = _setup(factory)
    batches = _sample(8, 16).batches
    inits = fit_sites(model, layout, sites, target, batches)
    site = sites[1]
    x, y = _site_activations(model, layout, site, batches)  # [n, d]: the fit counts every token
    act = torch.tanh if target == "dyt" else torch.erf
    fn = inits[site.name].fn
    a = float(fn.alpha.detach())
    x0, _ = _site_activations(model, layout, site, batches[:1], start=1)
    grid = alpha_grid(float(x0.pow(2).mean(-1).sqrt().double().mean()))  # the first batch's ordinary tokens
    assert any(abs(a - float(g)) < 1e-6 * abs(a) for g in grid)  # alpha is a grid point (stored as float32)

    def best_sse(alpha):  # a direct least-squares solve per dimension
        t = act(alpha * x).double()  # [n, d]
        cols = [t] + ([torch.ones_like(t)] if site.has_bias else [])
        sse = 0.0
        for j in range(x.shape[1]):
            A = torch.stack([c[:, j] for c in cols], dim=1)  # [n, k]
            sol = torch.linalg.lstsq(A, y[:, j].double()[:, None]).solution
            sse += float((A @ sol - y[:, j].double()[:, None]).pow(2).sum())
        return sse

    sse_fit = float((fn(x).detach() - y).double().pow(2).sum())
    assert sse_fit == pytest.approx(best_sse(a), rel=1e-4)  # closed-form gamma (and beta) = lstsq's
    assert all(sse_fit <= best_sse(float(g)) * (1 + 1e-4) for g in grid[::4])  # and no grid alpha does better
    w = getattr(site.module, "weight", None)
    b = getattr(site.module, "bias", None)
    naive = make_function(target, site, w, b, x.shape[1])
    assert float(naive.alpha.detach()) == 0.5
    sse_naive = float((naive(x).detach() - y).double().pow(2).sum())
    assert sse_fit < 0.5 * sse_naive
    tab = error_table(model, layout, sites, target, inits, _sample(4, 16, seed=3).batches)
    assert (tab["rel_error"] < tab["rel_error_naive"]).all()
    assert set(tab["site"]) == {s.name for s in sites}


def test_grid_sums_match_the_direct_sums():
    from normscope.core.capture import BatchContext

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, generator=g)  # [batch, pos, d]
    y = torch.randn(2, 6, 4, generator=g)
    ctx = BatchContext(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long), ["a", "a"], 0)
    s = GridSums("tanh", with_beta=True, points=5)
    s.add(x, y, ctx)
    xr, yr = x.reshape(-1, 4), y.reshape(-1, 4)  # every token, position 0 included
    assert s.n == 12
    t = torch.tanh(float(s.grid[2]) * xr)
    assert torch.allclose(s.syt[2].float(), (yr * t).sum(0), atol=1e-5)
    assert torch.allclose(s.stt[2].float(), t.pow(2).sum(0), atol=1e-5)


# ---- training -------------------------------------------------------------------------------------------------
def _train(factory, target, run_dir, steps=6, resume=False, stop_at=None, ramp=1):
    from normscope.removal.train import StopFlag, train

    model, layout, sites = _setup(factory)
    teacher = _setup(factory)[0]
    batches = _sample().batches
    inits = fit_sites(teacher, find_layout(teacher), find_norm_sites(teacher), target, batches[:2])
    flag = StopFlag()

    def progress(log):
        if stop_at is not None and log.step + 1 == stop_at:
            flag.request("SIGTERM")

    opts = swap_train_options(steps=steps, lr=2e-3, save_every=2, keep_checkpoints=5)
    res = train(model, layout, sites, batches, opts, run_dir, remove=[s.name for s in sites], teacher=teacher,
                resume=resume, progress=progress, stop=flag, wrapper=SwapWrappers({n: i.fn for n, i in inits.items()}),
                schedule=swap_schedule(sites, steps, ramp), identity_extra={"target": target, "ramp_steps": ramp})
    return res, model


@pytest.mark.parametrize("factory,target", [(tiny_llama, "dyt"), (tiny_gpt2, "derf"), (tiny_llama, "seednorm")])
def test_resume_after_a_stop_gives_the_losses_of_an_uninterrupted_run(factory, target, tmp_path):
    from normscope.removal.train import TrainingStopped

    full, m_full = _train(factory, target, tmp_path / "full", ramp=3)
    assert full.removal.n_removed() == len(full.removal.wrappers)
    assert [h.n_removed for h in full.history][:3] == [0, 0, len(full.removal.wrappers)]  # the gate reaches 1 at 2
    losses = [h.loss for h in full.history]
    assert all(math.isfinite(v) for v in losses) and any(h.kl > 0 for h in full.history)
    with pytest.raises(TrainingStopped):
        _train(factory, target, tmp_path / "stopped", stop_at=3, ramp=3)
    resumed, m_res = _train(factory, target, tmp_path / "stopped", resume=True, ramp=3)
    assert resumed.resumed_from == 3 and [h.loss for h in resumed.history] == losses  # bit-identical on CPU
    for (k, a), b in zip(m_full.state_dict().items(), m_res.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert any(".swap." in k for k in m_full.state_dict())  # the function's parameters are checkpointed
    # the swapped function's parameters did train
    w0 = next(iter(full.removal))
    first = {k: v for k, v in m_full.state_dict().items() if ".swap." in k}
    init = fit_sites(*_setup(factory), target, _sample().batches[:2])[w0.site_name].fn.state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in w0.swap.state_dict().items()) and first


def test_resume_refuses_another_gate_or_function(tmp_path):
    from normscope.core.errors import NormscopeError

    _train(tiny_llama, "dyt", tmp_path / "run", steps=4)
    with pytest.raises(NormscopeError, match="ramp_steps=1"):
        _train(tiny_llama, "dyt", tmp_path / "run", steps=4, resume=True, ramp=2)
    with pytest.raises(NormscopeError, match="another model"):  # Derf has a shift per site: other parameters
        _train(tiny_llama, "derf", tmp_path / "run", steps=4, resume=True)


def test_run_end_to_end_with_control_shared_between_targets(tmp_path):
    from normscope.core.models import load_model
    from normscope.report import write_report
    from tests.tiny import save_tiny

    lm = load_model(str(save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")), device="cpu")
    ref = {k: v.clone() for k, v in lm.model.state_dict().items()}
    opts = SwapOptions(target="dyt", train=swap_train_options(steps=6, lr=2e-3, save_every=0), control=True,
                       run_dir=tmp_path / "run")
    result = run(lm, _sample(), _sample(8, 16, seed=9), opts)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in ref.items())  # the original is untouched
    ce = {r["model"]: r for r in result.payload["ce"]}
    assert set(ce) == {"original", "control", "DyT", "DyT, untrained"}
    assert ce["DyT"]["gap_vs_control"] == pytest.approx(ce["DyT"]["mean"] - ce["control"]["mean"])
    assert result.headlines["sites_swapped"] == "5 / 5"
    assert result.headlines["median_site_error"] < result.headlines["median_site_error_naive"]
    paths = write_report(result, tmp_path / "rep")
    assert paths.html.name == "swap-dyt.html" and "Per-site error before training" in paths.html.read_text()
    # a second target in the same run folder reuses the finished control: the same control CE, no new steps
    ctrl = sorted((tmp_path / "run" / "control").glob("ckpt-*"))
    again = run(lm, _sample(), _sample(8, 16, seed=9), SwapOptions(target="seednorm", train=opts.train,
                                                                    control=True, run_dir=tmp_path / "run"))
    assert sorted((tmp_path / "run" / "control").glob("ckpt-*")) == ctrl
    assert {r["model"]: r for r in again.payload["ce"]}["control"]["mean"] == ce["control"]["mean"]
    seed = {r["model"]: r for r in again.payload["ce"]}
    assert seed["SeeDNorm, untrained"]["mean"] == pytest.approx(ce["original"]["mean"], abs=1e-5)  # exact init


# ---- CLI --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("sw")
    save_tiny(tiny_llama(), tiny_tokenizer(), root / "llama")
    save_tiny(tiny_bert(), tiny_tokenizer(), root / "bert")
    (root / "train.txt").write_text(TEXT * 12)
    (root / "eval.txt").write_text(TEXT[::-1] * 3)
    return root


def _cli(args):
    from normscope.cli import app

    return CliRunner().invoke(app, ["swap", *map(str, args)])


def test_cli_runs_and_writes_json_csv_and_page(folders, tmp_path):
    r = folders
    res = _cli([r / "llama", "--to", "derf", "--text", r / "train.txt", "--eval-text", r / "eval.txt", "--steps", 4,
                "--seq-len", 32, "--batch-size", 4, "--run-dir", tmp_path / "run", "--out", tmp_path / "rep",
                "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "rep" / "swap-derf.json").read_text())
    assert data["analysis"] == "swap-derf" and data["headlines"]["sites_swapped"] == "5 / 5"
    assert (tmp_path / "rep" / "swap-derf_sites.csv").exists() and (tmp_path / "rep" / "swap-derf.html").exists()
    shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("case", ["bhyt", "foo", "none", "encoder", "ramp", "same_text", "resume"])
def test_cli_bad_input_is_one_line_and_exit_code_2(folders, tmp_path, case):
    r = folders
    base = ["--text", r / "train.txt", "--eval-text", r / "eval.txt", "--seq-len", 32, "--batch-size", 4,
            "--steps", 4, "--run-dir", tmp_path / "run", "--out", tmp_path / "rep", "--quiet"]
    args = {
        "bhyt": [r / "llama", "--to", "bhyt", *base],
        "foo": [r / "llama", "--to", "foo", *base],
        "none": [r / "llama", *base],
        "encoder": [r / "bert", "--to", "dyt", *base],
        "ramp": [r / "llama", "--to", "dyt", *base, "--ramp-steps", 9],
        "same_text": [r / "llama", "--to", "dyt", "--text", r / "train.txt", "--eval-text", r / "train.txt"],
        "resume": [r / "llama", "--to", "dyt", *base, "--resume"],
    }[case]
    res = _cli(args)
    assert len(one_line_error(res)) < 400
    if case == "bhyt":
        assert "primary source" in res.output
    if case == "encoder":
        assert "causal LMs" in res.output
