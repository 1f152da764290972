"""remove-ln, full removal (issue 11): the exact BOS treatment, the smooth global gate, the per-site log, the
schedule checks, the outlier measurement. Tiny random models for the mechanics; the bundled SmolLM2 only for
step-0 exactness of the BOS treatment."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from normscope.core.errors import NormscopeError
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import sample_from_ids
from normscope.removal.export import export_model
from normscope.removal.frozen import Removal, aux_spread
from normscope.removal.outliers import measure
from normscope.removal.prefix import PrefixModel, compute_prefix
from normscope.removal.schedule import ScheduleOptions, build_schedule
from normscope.removal.train import TrainOptions, train
from tests.tiny import tiny_llama, tiny_tokenizer

BOS = 2  # tiny_tokenizer's BOS id


def _bos_ids(n: int = 3, t: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (n, t), generator=g)  # [batch, pos]
    ids[:, 0] = BOS
    return ids


def _setup(**kw):
    model = tiny_llama(**kw)
    layout = find_layout(model)
    return model, layout, find_norm_sites(model, layout)


def _freeze_all(rem: Removal, model, ids: torch.Tensor, n_fixed: int = 1) -> None:
    with torch.no_grad(), rem.tracking():
        model(input_ids=ids)
    for w in rem:
        w.n_fixed = n_fixed
        w.freeze(0, "main")
        if w.split_v:
            w.freeze(0, "v")


# ---- exact BOS ------------------------------------------------------------------------------------------------
def test_exact_bos_keeps_position_zero_exact_with_every_site_frozen():
    model, layout, sites = _setup()
    ids = _bos_ids()
    ref = model(input_ids=ids).logits  # [batch, pos, vocab]
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert rem.n_removed() == len(sites)
    assert torch.allclose(got[:, 0], ref[:, 0], atol=1e-5)  # position 0: its own divisor, exact
    assert (got[:, 1:] - ref[:, 1:]).abs().max() > 1e-3  # the rest really divides by the frozen scalars
    for w in rem:  # a frozen position-0 divisor measured on the same fixed BOS is exact too (constant trajectory)
        w.n_fixed, w.first_blend = 0, 0.0
    with torch.no_grad():
        own = model(input_ids=ids).logits
    assert torch.allclose(own[:, 0], ref[:, 0], atol=1e-5)
    for w in rem:  # divided by the shared scalar instead, position 0 changes
        w.first_blend = 1.0
    with torch.no_grad():
        shared = model(input_ids=ids).logits
    assert (shared[:, 0] - ref[:, 0]).abs().max() > 1e-3


def test_prefix_export_reproduces_the_trained_model_after_the_bos(tmp_path):
    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    prefix = compute_prefix(model, [BOS])
    assert len(prefix.keys) == model.config.num_hidden_layers and prefix.keys[0].shape[2] == 1
    out, plain = export_model(model, rem, tiny_tokenizer(), tmp_path / "exp", {}, prefix=prefix)
    manifest = json.loads((out / "normscope_removal.json").read_text())
    assert manifest["export_kind"].startswith("a plain transformers checkpoint plus a BOS")
    assert manifest["prefix_ids"] == [BOS]
    from transformers import AutoModelForCausalLM

    from normscope.removal.prefix import Prefix

    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    pm = PrefixModel(loaded, Prefix.load(out)).eval()
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    with pytest.raises(ValueError, match="fixed prefix"):
        pm(input_ids=ids[:, 1:])


def test_normscope_loads_an_exact_bos_export_as_the_trained_model_bos_included(tmp_path):
    """load_model on the export folder puts the BOS's live divisors back (core/lnfree.py): every position,
    position 0 included, matches the trained model; a text whose windows lack the BOS is refused in one line."""
    from normscope.core.models import load_model

    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    with torch.no_grad():
        want = model(input_ids=ids).logits  # [batch, pos, vocab]
    out, _ = export_model(model, rem, tiny_tokenizer(), tmp_path / "exp", {}, prefix=compute_prefix(model, [BOS]))
    lm = load_model(str(out), device="cpu", dtype="float32")
    assert lm.extra["exact_bos"]["prefix_ids"] == [BOS] and lm.extra["exact_bos"]["sites"] == len(sites)
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        bare = plain(input_ids=ids).logits  # the folded checkpoint alone: the BOS on the ordinary divisor
    assert (bare[:, 0] - want[:, 0]).abs().max() > 1e-2
    from normscope.core.lnfree import check_sample

    check_sample(lm.extra["exact_bos"], sample_from_ids(ids.tolist(), ["x"] * 3, batch_size=3).batches)
    with pytest.raises(NormscopeError, match="--bos yes"):
        check_sample(lm.extra["exact_bos"], sample_from_ids(ids[:, 1:].tolist(), ["x"] * 3, batch_size=3).batches)


def test_aux_spread_leaves_the_fixed_prefix_out_and_takes_a_fixed_target():
    d = torch.tensor([[[100.0], [2.0], [2.0], [4.0]]])  # [1, 4, 1]: position 0 is huge
    base = aux_spread(d)  # position 0 counts (target 8/3 from positions >= 1)
    skip = aux_spread(d, skip=1)
    t = 8.0 / 3.0
    assert skip == pytest.approx(((2 - t) ** 2 * 2 + (4 - t) ** 2) / 3 / t**2)
    assert base > 100 * skip
    fixed = aux_spread(d, skip=1, target=2.0)
    assert fixed == pytest.approx((0 + 0 + 1.0) / 3)
    assert aux_spread(d, "log", skip=1, target=2.0) == pytest.approx(float(torch.log(torch.tensor(2.0)) ** 2 / 3))


# ---- the smooth global gate and the schedule --------------------------------------------------------------------
def test_taper_removes_every_site_at_once_on_a_cosine_gate():
    _, _, sites = _setup()
    s = build_schedule(sites, 40, ScheduleOptions(start=3, ramp_steps=20, ramp_shape="cosine", taper=True),
                       first_token=False)
    assert {e.step for e in s.events} == {3} and len(s.events) == len(sites)
    e = s.events[0]
    r = [s.ramp(e, k) for k in range(2, 25)]
    assert r[0] == 0.0 and r[-1] == 1.0 and all(b >= a for a, b in zip(r, r[1:], strict=False))
    assert s.ramp(e, 3) < 0.01 and s.ramp(e, 12) == pytest.approx(0.5)
    assert s.ramp(e, 7) == pytest.approx(0.5 * (1 - math.cos(math.pi * 5 / 20)))
    assert s.first_token_start is None and s.done_by == 22


def test_a_too_dense_automatic_schedule_is_refused_with_the_steps_it_needs():
    _, _, sites = _setup(n_layers=8)
    with pytest.raises(NormscopeError, match=r"up to \d+ norm paths on one step.*give --steps (\d+)") as info:
        build_schedule(sites, 12, ScheduleOptions(ramp_steps=1, first_frac=0.0))
    need = int(info.value.args[0].split("give --steps ")[1].split()[0])
    build_schedule(sites, need, ScheduleOptions(ramp_steps=1, first_frac=0.0))  # accepted


def test_follow_divisor_tracks_the_ema_while_the_gate_is_open_then_stays():
    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites, momentum=0.0)
    w = rem[sites[0].name]
    with torch.no_grad(), rem.tracking():
        model(input_ids=ids)
    w.follow = True
    w.freeze(0)
    w.ramp = 0.5
    d0 = w.divisor
    with torch.no_grad(), rem.tracking():
        model(input_ids=ids * 0 + 7)  # other text: another mean divisor
    assert w.divisor == w.ema != d0
    w.ramp = 1.0
    d1 = w.divisor
    with torch.no_grad(), rem.tracking():
        model(input_ids=ids)
    assert w.divisor == d1  # the gate is closed: frozen for good


def test_exact_bos_taper_training_logs_sites_and_exports_a_prefix(tmp_path):
    model, layout, sites = _setup()
    ids = _bos_ids(32, 16)
    sample = sample_from_ids(ids.tolist(), ["x"] * 32, batch_size=4, bos_prepended=True)
    opts = TrainOptions(steps=14, lr=1e-3, exact_bos=True, aux_sites="all", aux_form="log", aux_anchor=True,
                        schedule=ScheduleOptions(start=2, ramp_steps=8, ramp_shape="cosine", taper=True))
    res = train(model, layout, sites, sample.batches, opts, tmp_path / "run")
    assert res.removal.n_removed() == len(sites) and res.diverged_at is None
    assert all(w.n_fixed == 1 and w.follow for w in res.removal)
    final = next(w for w in res.removal if w.role == "final")
    assert final.aux_target is not None and final.aux_target > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "sites.jsonl").read_text().splitlines()]
    assert len(lines) == 14 and set(lines[0]["sites"]) == {s.name for s in sites}
    gain, rel, peak, tok, _ = lines[5]["sites"]["blocks.0.ln2"]  # the last: writer_rel_update (test_writer_log)
    assert gain > 0 and 0 < rel < 1 and peak >= 1.0 and 4 <= tok < 100
    assert lines[5]["first_nonfinite_input"] is None
    # position 0 stayed exact: the trained wrapped model's position-0 logits equal a live pass's
    with torch.no_grad():
        got = model(input_ids=ids[:2]).logits[:, 0]
        for w in res.removal:
            w.frozen, w.frozen_v = False, False
        live = model(input_ids=ids[:2]).logits[:, 0]
    assert torch.allclose(got, live, atol=1e-5)


# ---- measurement ------------------------------------------------------------------------------------------------
def test_measure_skips_position_zero_and_finds_a_planted_massive_activation():
    model, layout, sites = _setup()
    ids = _bos_ids(4, 12)
    ids[1, 3] = 50
    hook_layer = layout.blocks[-1].module  # the last block: nothing downstream spreads it

    def plant(module, args, out):  # a massive value at (row 1, pos 3, dim 5) and at position 0
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 0, 7] = 5000.0
        h[1, 3, 5] = 3000.0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = hook_layer.register_forward_hook(plant)
    try:
        sample = sample_from_ids(ids.tolist(), ["x"] * 4, batch_size=4, bos_prepended=True)
        massive, spread = measure(model, layout, sites, sample.batches)
    finally:
        handle.remove()
    table = massive.table(tiny_tokenizer())
    assert list(table.token_id) == [50] and table.hits[0] == 1 and table.dims[0] == "5"
    assert table.positions[0] == "3" and table.max_abs[0] == pytest.approx(3000.0)
    assert massive.pos0_max[-1] == pytest.approx(5000.0)
    st = spread.table(tiny_tokenizer())
    row = st[st.site == "ln_final"].iloc[0]
    assert row.max_over_mean > 4 and row.position0_over_mean > 4 and "x1" in row.tokens_over_bar


# ---- the bundled model: step-0 exactness -------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_step0_exact_bos_matches_the_original_with_bos(smollm2):
    """At step 0, (a) the wrapped model with every site frozen gives position 0 the original's outputs, and (b)
    the BOS replaced by its key/value prefix (computed from the original) gives the original's logits at every
    position, both within 1e-4."""
    tok = smollm2.tokenizer
    text = "It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of"
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:23]] * 2)
    ids[1, 5] = ids[0, 7]  # two different rows
    model = smollm2.model
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits  # [2, 24, vocab]
    prefix = compute_prefix(model, [tok.bos_token_id])
    with torch.no_grad():
        got = PrefixModel(model, prefix)(input_ids=ids).logits
    assert float((got - ref).abs().max()) < 1e-4
    student = copy.deepcopy(model)
    layout = find_layout(student)
    rem = Removal(student, layout, find_norm_sites(student, layout))
    _freeze_all(rem, student, ids)
    assert rem.n_removed() == 61
    with torch.no_grad():  # BOS alone: untrained, the frozen positions >= 1 overflow, and 0 x inf in the
        frozen = student(input_ids=ids[:, :1], use_cache=False).logits  # attention would reach position 0
    assert float((frozen[:, 0] - ref[:, 0]).abs().max()) < 1e-4


# ---- the CLI's failure line ----------------------------------------------------------------------------------
def test_run_failure_says_why_a_finished_run_failed():
    from normscope.cli.remove_ln import run_failure

    ok = {"diverged_at_step": None, "ce_ln_free": 3.5, "export": "runs/x/ln-free-model", "sites_removed": "61 / 61"}
    assert run_failure(ok, export_asked=True) is None
    assert "diverged at step 48" in run_failure({**ok, "diverged_at_step": 48, "export": None}, True)
    assert "CE is inf" in run_failure({**ok, "ce_ln_free": float("inf")}, True)
    assert "removal failed" in run_failure({**ok, "ce_original": 3.73, "ce_ln_free": 6.2e6}, True)
    assert run_failure({**ok, "ce_original": 3.73, "ce_ln_free": 4.0}, True) is None
    assert "none was written" in run_failure({**ok, "export": None, "sites_removed": "25 / 61"}, True)
    assert run_failure({**ok, "export": None}, export_asked=False) is None


def test_damage_at_position_is_the_share_of_the_loss_increase():
    from normscope.removal.evaluate import TokenLosses
    from normscope.removal.pipeline import damage_at_position

    pos = torch.tensor([1, 2, 3, 1, 2, 3])
    z = torch.zeros(6, dtype=torch.long)
    base = TokenLosses(torch.tensor([1.0, 1, 1, 1, 1, 1]), z, z, pos)
    new = TokenLosses(torch.tensor([4.0, 1.5, 1, 2, 1.5, 1]), z, z, pos)
    assert damage_at_position(base, new, 1) == pytest.approx(4.0 / 5.0)
    assert damage_at_position(base, base, 1) is None


def test_guard_caps_a_runaway_token_in_training_only_and_penalises_it():
    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    w = rem["blocks.1.ln2"]
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0)) * w.divisor  # RMS ~ the divisor
    x[1, 3] *= 50.0  # one token far above the frozen divisor
    w.guard = 4.0
    w.train()
    y = w(x)
    ratio = w.live_divisor(x) / w.divisor  # [2, 6, 1]
    assert float(ratio[1, 3]) > 4
    out_rms = (y / w.weight).pow(2).mean(-1).sqrt()  # the normalised token, before the gain
    assert float(out_rms[1, 3]) == pytest.approx(4.0, rel=1e-4)
    assert torch.allclose(y[0, 1:], w._affine(x[0, 1:].float() / w.divisor, x.dtype), atol=1e-6)  # others: frozen
    pen = w.guard_penalty(w.live_divisor(x))
    assert float(pen) == pytest.approx(float(torch.log(ratio[1, 3] / 4) ** 2) / (2 * 5), rel=1e-4)
    w.eval()  # evaluation and export: no guard
    assert float(((w(x) / w.weight).pow(2).mean(-1).sqrt())[1, 3]) > 4.5


# ---- the command, end to end (tiny Llama) -----------------------------------------------------------------------
def test_cli_exact_bos_taper_guard_with_control_exports_a_prefix_model(tmp_path):
    from typer.testing import CliRunner

    from normscope.cli import app
    from tests.test_removal import TEXT
    from tests.tiny import save_tiny

    folder = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")
    (tmp_path / "train.txt").write_text(TEXT * 12)
    (tmp_path / "eval.txt").write_text(TEXT[::-1] * 3)
    args = ["remove-ln", str(folder), "--text", str(tmp_path / "train.txt"), "--eval-text", str(tmp_path / "eval.txt"),
            "--steps", "14", "--seq-len", "32", "--batch-size", "4", "--exact-bos", "--taper", "--ramp-shape",
            "cosine", "--start", "2", "--ramp-steps", "8", "--aux-sites", "all", "--aux-form", "log", "--aux-anchor",
            "--guard", "4", "--distill", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]
    res = CliRunner().invoke(app, [*args, "--only", "ln-free"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*args, "--control", "--only", "control"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*args, "--control", "--resume"])
    assert res.exit_code == 0, res.output
    h = json.loads((tmp_path / "rep" / "remove-ln.json").read_text())["headlines"]
    assert h["sites_removed"] == "5 / 5" and h["export_kind"].endswith("(bos_prefix.safetensors)")
    assert h["export_max_logit_diff"] < 1e-3 and h["gap_vs_control"] is not None
    assert "export: a plain transformers checkpoint plus a BOS key/value prefix" in res.output
    assert (tmp_path / "run" / "ln-free-model" / "bos_prefix.safetensors").exists()
    assert (tmp_path / "run" / "ln-free" / "sites.jsonl").exists()
    # the export loads through normscope like any model, BOS included; without the BOS it is refused in one line
    exp = str(tmp_path / "run" / "ln-free-model")
    common = ["--text", str(tmp_path / "eval.txt"), "--seq-len", "32", "--force"]
    res = CliRunner().invoke(app, ["sinks", exp, *common, "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--bos yes" in res.output
    res = CliRunner().invoke(app, ["dla", exp, *common, "--bos", "yes", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    dla = json.loads((tmp_path / "d" / "dla.json").read_text())["headlines"]
    assert dla["NMAE, all components (%)"] < 1.0  # the final norm is a fixed scale: DLA is exact


@pytest.mark.parametrize("clamp", [(0.0, 0.0, 5, "soft"), (2.0, 6.0, 9, "soft"), (2.0, 0.0, 7, "hard")],
                         ids=["guard", "clamp-loosening", "hard-clamp"])
def test_exact_bos_taper_guard_resume_is_bit_identical(tmp_path, clamp):
    from normscope.removal.train import StopFlag, TrainingStopped

    k0, k1, cut, shape = clamp

    ids = _bos_ids(32, 16)
    sample = sample_from_ids(ids.tolist(), ["x"] * 32, batch_size=4, bos_prepended=True)

    def run(run_dir, stop_at=None, resume=False):
        model, layout, sites = _setup()
        flag = StopFlag()

        def progress(log):
            if stop_at is not None and log.step + 1 == stop_at:
                flag.request("SIGTERM")

        opts = TrainOptions(steps=12, lr=2e-3, exact_bos=True, aux_sites="all", aux_form="log", aux_anchor=True,
                            guard=2.0, clamp=k0, clamp_to=k1, clamp_sites=["blocks.*"] if k0 else [],
                            clamp_shape=shape, save_every=4,
                            schedule=ScheduleOptions(start=2, ramp_steps=6, ramp_shape="cosine", taper=True))
        return train(model, layout, sites, sample.batches, opts, run_dir, resume=resume, progress=progress,
                     stop=flag), model

    full, m_full = run(tmp_path / "full")
    with pytest.raises(TrainingStopped):
        run(tmp_path / "cut", stop_at=cut)
    again, m_again = run(tmp_path / "cut", resume=True)
    assert again.resumed_from == cut
    k_end = k1 or k0
    for w in again.removal:  # loosened to --clamp-to by the last step, at the --clamp-sites only
        assert w.clamp == (k_end if w.site_name.startswith("blocks.") else 0.0), w.site_name
        assert w.clamp_hard == (shape == "hard")
    from normscope.removal.pipeline import final_clamp

    assert final_clamp(again.removal) == k_end  # what the page reports: the clamp it ends with
    assert [h.loss for h in again.history] == [h.loss for h in full.history]
    assert again.removal.state() == full.removal.state()
    for a, b in zip(m_full.state_dict().values(), m_again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ---- the soft clamp kept in the export (--clamp) ---------------------------------------------------------------
def _clamp_case(k: float, hard: bool) -> tuple[Any, float, torch.Tensor, torch.Tensor]:
    """A frozen ``blocks.1.ln2`` clamped at ``k``, a batch around its scale with one runaway token at [1, 3], and
    each token's live divisor."""
    model, layout, sites = _setup()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, _bos_ids())
    w = rem["blocks.1.ln2"]
    d = w.divisor
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1)) * d  # [batch, pos, d_model]
    x[1, 3] *= 200.0  # a runaway token
    w.clamp, w.clamp_hard = k, hard
    live = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + w.eps)  # [2, 6, 1]
    return w, d, x, live


def test_clamp_divides_by_sqrt_d2_plus_live2_over_k2_and_stays_in_eval():
    """FrozenNorm._clamped against the formula computed directly: an ordinary token within 1/(2K^2) of the frozen
    divisor, a runaway normalised down to about K x the site's scale, position 0 on its exact live divisor; and
    unlike the guard, the clamp is the same in training and in evaluation."""
    from normscope.removal.frozen import clamp_ratio

    w, d, x, live = _clamp_case(4.0, hard=False)
    want = x / torch.sqrt(d * d + live.pow(2) / 16.0) * w.weight  # [2, 6, 64]
    want[:, 0] = x[:, 0] / live[:, 0] * w.weight  # the fixed prefix: exact live divisor
    for mode in (w.train, w.eval):
        mode()
        assert torch.allclose(w(x), want, atol=1e-5, rtol=1e-5)
    out_rms = (w(x) / w.weight).pow(2).mean(-1).sqrt()  # [2, 6]
    assert float(out_rms[1, 3]) == pytest.approx(4.0, rel=1e-3)  # normalised to K x the site's scale
    rms = x[0, 1:].pow(2).mean(-1).sqrt()  # [5]: ordinary tokens, near the site's scale
    assert torch.allclose(out_rms[0, 1:], rms / torch.sqrt(d * d + live[0, 1:, 0].pow(2) / 16), rtol=1e-4)
    assert float((out_rms[0, 1:] * d / rms - 1).abs().max()) < 1 / 16  # within ~1/(2K^2) of LN-free
    r = clamp_ratio(live, d, 4.0)
    assert float(clamp_ratio(torch.tensor([d]), d, 4.0)) == pytest.approx(1.0)
    assert float(r[1, 3]) == pytest.approx(float(live[1, 3]) / (4 * d) / math.sqrt(1 + 1 / 16), rel=1e-3)


def test_clamped_export_is_a_plain_rmsnorm_per_site_eps_and_loads_exactly(tmp_path):
    """The clamped sites fold into RMSNorms with their own eps (K^2 d^2 + eps0) and gain K w: the export, loaded
    through normscope (per-site eps from the manifest, BOS divisors back) or through plain transformers plus the
    prefix, gives the trained model's logits; with the config's one eps alone it does not."""
    from transformers import AutoModelForCausalLM

    from normscope.core.lnfree import apply_site_eps
    from normscope.core.models import load_model
    from normscope.removal.prefix import Prefix

    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    for w in rem:  # tight enough that the clamp changes the logits measurably; the final norm a constant
        w.clamp = 0.0 if w.site_name == "ln_final" else 2.0
    with torch.no_grad():
        want = model(input_ids=ids).logits  # [batch, pos, vocab]
        with rem.without_clamp():
            unclamped = model(input_ids=ids).logits
        with pytest.raises(RuntimeError), rem.without_clamp():
            raise RuntimeError("an evaluation that fails midway")
    assert all(w.clamp == (0.0 if w.site_name == "ln_final" else 2.0) for w in rem)  # restored, even after the error
    assert (want - unclamped).abs().max() > 1e-3
    out, _ = export_model(model, rem, tiny_tokenizer(), tmp_path / "exp", {}, prefix=compute_prefix(model, [BOS]))
    manifest = json.loads((out / "normscope_removal.json").read_text())
    assert "per-site eps" in manifest["export_kind"]
    s0 = manifest["sites"][0]
    final = next(s for s in manifest["sites"] if s["name"] == "ln_final")
    assert final["clamp"] is None and final["folded_eps"] == pytest.approx(manifest["eps"])  # a pure constant
    assert s0["clamp"] == 2.0 and s0["folded_eps"] == pytest.approx(4 * s0["divisor"] ** 2 + s0["original_eps"])
    lm = load_model(str(out), device="cpu", dtype="float32")
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    pm = PrefixModel(plain, Prefix.load(out)).eval()
    with torch.no_grad():
        bare = pm(input_ids=ids).logits  # the config's single eps: not the trained model
    assert (bare[:, 1:] - want[:, 1:]).abs().max() > 1e-2
    assert apply_site_eps(plain, out) == len(sites) - 1  # the clamped ones; the final norm keeps the config's eps
    with torch.no_grad():
        fixed = pm(input_ids=ids).logits
    assert torch.allclose(fixed[:, 1:], want[:, 1:], atol=1e-4, rtol=1e-4)


def test_clamp_usage_counts_what_a_direct_count_of_each_sites_input_gives():
    from normscope.removal.evaluate import clamp_usage
    from normscope.removal.frozen import clamp_ratio

    model, layout, sites = _setup()
    ids = _bos_ids(n=4, t=12)
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    for w in rem:
        w.clamp = 1.0
    seen: dict[str, torch.Tensor] = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, n=w.site_name: seen.__setitem__(n, a[0].detach()))
             for w in rem]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    hit_any = torch.zeros(4, 11, dtype=torch.bool)
    direct = {}
    for w in rem:
        r = clamp_ratio(w.live_divisor(seen[w.site_name])[:, 1:], w.divisor, 1.0)[..., 0]  # [batch, pos - 1]
        direct[w.site_name] = float((r > 1.1).float().mean())
        hit_any |= r > 1.1
    info = clamp_usage(model, rem, sample_from_ids(ids.tolist(), ["x"] * 4, batch_size=2))
    assert info["tokens"] == 44
    assert info["share_any_site"] == pytest.approx(float(hit_any.float().mean()))
    assert {s["site"]: s["share"] for s in info["sites"]} == pytest.approx(direct)
    assert 0 < info["share_any_site"] < 1


def test_hard_clamp_is_the_constant_below_its_knee_and_normalises_above():
    """--clamp-shape hard against max(d, live / K) computed directly: every token up to K x the site's scale is
    divided by the frozen constant exactly (LN-free), a runaway leaves at K x, the fixed prefix keeps its live
    divisor, and clamp_ratio is 1 below the knee."""
    from normscope.removal.frozen import clamp_ratio

    w, d, x, live = _clamp_case(2.0, hard=True)
    want = x / torch.maximum(torch.full_like(live, d), live / 2.0) * w.weight  # [2, 6, 64]
    want[:, 0] = x[:, 0] / live[:, 0] * w.weight  # the fixed prefix: exact live divisor
    for mode in (w.train, w.eval):
        mode()
        assert torch.allclose(w(x), want, atol=1e-5, rtol=1e-5)
    below = (live[:, 1:, 0] < 2.0 * d)  # [2, 5]
    assert int(below.sum()) == 9  # every token but the runaway
    const = (x[:, 1:] / d * w.weight)[below]  # [9, 64]: the frozen constant, no dependence on the token's RMS
    assert torch.allclose(w(x)[:, 1:][below], const, rtol=1e-6, atol=1e-7)
    out_rms = (w(x) / w.weight).pow(2).mean(-1).sqrt()  # [2, 6]
    assert float(out_rms[1, 3]) == pytest.approx(2.0, rel=1e-3)
    r = clamp_ratio(live, d, 2.0, hard=True)
    assert bool((r[:, 1:][below] == 1.0).all()) and float(r[1, 3]) == pytest.approx(float(live[1, 3]) / (2 * d))


def test_hard_clamped_export_applies_its_knee_as_a_hook_and_loads_exactly(tmp_path):
    """A hard-clamped site folds like a plain one (the shared eps) and its knee comes back as a forward hook:
    through normscope (BOS included) and through plain transformers plus the prefix, the logits are the trained
    model's; without the hooks they are not."""
    from transformers import AutoModelForCausalLM

    from normscope.core.lnfree import apply_site_eps
    from normscope.core.models import load_model
    from normscope.removal.prefix import Prefix

    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    for w in rem:  # a knee low enough to catch tokens; the final norm a constant
        w.clamp, w.clamp_hard = (0.0, False) if w.site_name == "ln_final" else (0.8, True)
    with torch.no_grad():
        want = model(input_ids=ids).logits  # [batch, pos, vocab]
        with rem.without_clamp():
            unclamped = model(input_ids=ids).logits
    assert (want - unclamped).abs().max() > 1e-3
    out, _ = export_model(model, rem, tiny_tokenizer(), tmp_path / "exp", {}, prefix=compute_prefix(model, [BOS]))
    manifest = json.loads((out / "normscope_removal.json").read_text())
    assert "hard clamp" in manifest["export_kind"] and "Hard-clamped" in manifest["note"]
    s0 = manifest["sites"][0]
    assert s0["clamp_shape"] == "hard" and s0["folded_eps"] == pytest.approx(manifest["eps"])  # folded as plain
    lm = load_model(str(out), device="cpu", dtype="float32")
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    pm = PrefixModel(plain, Prefix.load(out)).eval()
    with torch.no_grad():
        bare = pm(input_ids=ids).logits  # no knee: the weights without the clamp
    assert torch.allclose(bare[:, 1:], unclamped[:, 1:], atol=1e-4, rtol=1e-4)
    assert apply_site_eps(plain, out) == len(sites) - 1  # a hook at each clamped site (the BOS is not in the input)
    with torch.no_grad():
        fixed = pm(input_ids=ids).logits
    assert torch.allclose(fixed[:, 1:], want[:, 1:], atol=1e-4, rtol=1e-4)
    # the README's plain-transformers snippet, run as written (BOS dropped from the input, prefix as the cache)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("Using the export with plain transformers")[1].split("```python")[1].split("```")[0]
    scope = {"path": str(out), "ids": ids[:, 1:], "B": ids.shape[0]}
    with torch.no_grad():
        exec(snippet, scope)  # noqa: S102 - the documented snippet itself
    assert torch.allclose(scope["logits"], want[:, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", ["soft", "hard"])
def test_cli_clamp_reports_its_share_and_the_same_weights_without_it(tmp_path, shape):
    from typer.testing import CliRunner

    from normscope.cli import app
    from tests.test_removal import TEXT
    from tests.tiny import save_tiny

    folder = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")
    (tmp_path / "train.txt").write_text(TEXT * 12)
    (tmp_path / "eval.txt").write_text(TEXT[::-1] * 3)
    res = CliRunner().invoke(app, [
        "remove-ln", str(folder), "--text", str(tmp_path / "train.txt"), "--eval-text", str(tmp_path / "eval.txt"),
        "--steps", "10", "--seq-len", "32", "--batch-size", "4", "--exact-bos", "--taper", "--start", "2",
        "--ramp-steps", "5", "--clamp", "4", "--clamp-shape", shape, "--run-dir", str(tmp_path / "run"),
        "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "remove-ln.json").read_text())
    h = rep["headlines"]
    assert h["clamp"] == 4.0 and 0 <= h["clamp_share_of_tokens"] <= 1 and h["clamp_worst_site"]
    assert h["clamp_shape"] == shape and rep["clamp_usage"]["level"] == (1.0 if shape == "hard" else 1.1)
    manifest = json.loads((tmp_path / "run" / "ln-free-model" / "normscope_removal.json").read_text())
    manifest_kind = manifest["export_kind"]
    kind_words = "per-site eps" if shape == "soft" else "hard clamp"
    assert kind_words in manifest_kind and h["export_kind"] == manifest_kind  # one wording, page and manifest
    models = [r["model"] for r in rep["ce"]]
    assert models == ["original", "LN-free", "LN-free, clamp off"]
    assert h["export_max_logit_diff"] < 1e-3  # the export checked with its per-site eps or knees applied
    summary = " ".join(rep["summary"])
    assert (f"{shape} clamp (--clamp 4" in summary) and ("max(d, live/4)" in summary) == (shape == "hard")
    page = (tmp_path / "rep" / "remove-ln.html").read_text()
    assert "99.9th-percentile token loss, LN-free" in page and "p99 9" not in page  # cards in words
    assert "share of held-out tokens the clamp acts on" in page
    assert ("sites[].folded_eps" if shape == "soft" else "hard knee at K = 4") in summary
    # sinks on the export: its norms are constants for ordinary tokens, so no "outlier-driven rescaling" claim
    exp = str(tmp_path / "run" / "ln-free-model")
    res = CliRunner().invoke(app, ["sinks", exp, "--text", str(tmp_path / "eval.txt"), "--seq-len", "32", "--bos",
                                   "yes", "--force", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    text = " ".join(json.loads((tmp_path / "s" / "sinks.json").read_text())["summary"])
    assert "remove-ln export" in text and "clamp" in text and "Outlier-driven rescaling" not in text


def test_clamp_sites_choose_where_the_clamp_applies_and_a_glob_matching_nothing_is_refused(tmp_path):
    from normscope.removal.train import check_clamp, site_clamp

    assert site_clamp("blocks.3.ln2", 3.0, []) == 3.0 and site_clamp("ln_final", 3.0, []) == 3.0
    assert site_clamp("blocks.3.ln2", 3.0, ["blocks.*"]) == 3.0 and site_clamp("ln_final", 3.0, ["blocks.*"]) == 0
    with pytest.raises(NormscopeError, match="give --clamp K too"):
        check_clamp(0.0, 0.0, ["blocks.*"])
    with pytest.raises(NormscopeError, match="give --clamp K too"):
        check_clamp(0.0, 0.0, [], "hard")
    with pytest.raises(NormscopeError, match="soft or hard"):
        check_clamp(3.0, 0.0, [], "sharp")
    model, layout, sites = _setup()
    sample = sample_from_ids(_bos_ids(8, 12).tolist(), ["x"] * 8, batch_size=4, bos_prepended=True)
    opts = TrainOptions(steps=4, exact_bos=True, clamp=3.0, clamp_sites=["block.*"],
                        schedule=ScheduleOptions(start=1, ramp_steps=1, taper=True))
    with pytest.raises(NormscopeError, match="matches no removed site"):
        train(model, layout, sites, sample.batches, opts, tmp_path / "run")


def test_clamp_at_holds_until_the_gate_closes_then_loosens_geometrically():
    from normscope.removal.train import check_clamp, clamp_at

    assert [clamp_at(s, 4.0, 0.0, 5, 20) for s in (0, 10, 19)] == [4.0, 4.0, 4.0]  # no --clamp-to: it stays
    assert clamp_at(5, 4.0, 64.0, 5, 21) == 4.0 and clamp_at(20, 4.0, 64.0, 5, 21) == pytest.approx(64.0)
    assert clamp_at(10, 4.0, 64.0, 5, 16) == pytest.approx(16.0)  # halfway in log space
    check_clamp(4.0, 16.0)
    with pytest.raises(NormscopeError, match="give --clamp K"):
        check_clamp(0.0, 16.0)
    with pytest.raises(NormscopeError, match="only loosens"):
        check_clamp(8.0, 4.0)


@pytest.mark.parametrize("clamp", [0.0, 2.0], ids=["frozen", "clamped"])
def test_readme_snippet_runs_the_export_with_plain_transformers(tmp_path, clamp):
    """The README's plain-transformers snippet, executed as written, gives the trained model's logits after the
    BOS, for a plain and for a soft-clamped (--clamp) export."""
    import re
    from pathlib import Path

    model, layout, sites = _setup()
    ids = _bos_ids()
    rem = Removal(model, layout, sites)
    _freeze_all(rem, model, ids)
    for w in rem:
        w.clamp = clamp
    with torch.no_grad():
        want = model(input_ids=ids).logits  # [batch, pos, vocab]
    out, _ = export_model(model, rem, tiny_tokenizer(), tmp_path / "exp", {}, prefix=compute_prefix(model, [BOS]))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("Using the export with plain transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    env = {"path": str(out), "B": ids.shape[0], "ids": ids[:, 1:]}
    with torch.no_grad():
        exec(code, env)  # noqa: S102 - the documented snippet itself
    got = env["logits"]  # [batch, pos - 1, vocab]
    assert torch.allclose(got, want[:, 1:], atol=1e-4, rtol=1e-4), float((got - want[:, 1:]).abs().max())
