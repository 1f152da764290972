"""remove-ln: frozen sites, schedule, training loop (resume, signals, DDP), export, evaluation, CLI.

Tiny random GPT-2 / Llama / Qwen3 models from ``tests.tiny`` for exactness; the bundled SmolLM2 (slow tests)
for the phenomenon the method has to cope with: position 0's massive activation, which makes a shared
divisor wrong for both position 0 and the other tokens.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from normscope.core.errors import NormscopeError
from normscope.core.sites import find_layout, find_norm_sites, norm_divisor
from normscope.core.text import sample_from_ids
from normscope.removal import evaluate as ev
from normscope.removal.export import DEFAULT_EPS, export_model, fold, folded_gain
from normscope.removal.frozen import Removal, aux_spread, blended_first_divisor, divisor_stats, ema_update
from normscope.removal.pipeline import RemoveLnOptions, model_sites, run, select_sites, site_costs
from normscope.removal.schedule import PHASES, ScheduleOptions, build_schedule
from normscope.removal.train import (
    DataCursor,
    StopFlag,
    TrainingStopped,
    TrainOptions,
    latest_checkpoint,
    list_checkpoints,
    lr_factor,
    next_token_ce,
    next_token_kl,
    train,
    warm_start_checkpoint,
)
from tests.tiny import one_line_error, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen3, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled cabbage "
    "and old rag mats. At one end of it a coloured poster, too large for indoor display, had been tacked to the "
    "wall. It depicted simply an enormous face, more than a metre wide: the face of a man of about forty-five, "
    "with a heavy black moustache and ruggedly handsome features. "
)


def _ids(n: int = 3, t: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (n, t), generator=g)  # [batch, pos]


def _sample(n_seq: int = 32, t: int = 16, batch: int = 4, seed: int = 0):
    return sample_from_ids(_ids(n_seq, t, seed).tolist(), ["x"] * n_seq, batch_size=batch)


def _setup(factory, **kw):
    model = factory(**kw)
    layout = find_layout(model)
    return model, layout, find_norm_sites(model, layout)


# ---- frozen sites ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_qwen3])
def test_live_wrappers_are_bit_identical_and_uninstall_restores(factory):
    model, layout, sites = _setup(factory)
    ids = _ids()
    ref = model(input_ids=ids).logits
    rem = Removal(model, layout, sites)
    assert torch.equal(model(input_ids=ids).logits, ref)
    assert set(model.state_dict()) == set(factory().state_dict())  # same keys: the wrappers share Parameters
    rem.uninstall()
    assert torch.equal(model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_qwen3])
def test_frozen_site_with_the_true_per_token_divisor_gives_the_original_outputs(factory):
    """Every site frozen, each divisor set to the exact per-token divisor: the logits do not change."""
    model, layout, sites = _setup(factory)
    ids = _ids()
    ref = model(input_ids=ids).logits
    rem = Removal(model, layout, sites)
    handles = []
    for w, s in zip(rem, rem.sites, strict=True):
        def pre(mod, args, s=s):
            mod.override = norm_divisor(args[0], centered=s.centered, eps=s.eps)  # independent formula
        handles.append(w.register_forward_pre_hook(pre))
        w.frozen = w.frozen_v = True
    out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - ref).abs().max() < 1e-5
    for h in handles:
        h.remove()


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_split_value_path_feeds_q_k_from_the_frozen_and_v_from_the_live_norm(factory):
    """Between the ln1qk and ln1v removals, Q/K read x/d_frozen*w and V reads the live LN output."""
    model, layout, sites = _setup(factory)
    rem = Removal(model, layout, sites)
    w = rem["blocks.1.ln1"]
    assert w.split_v
    w.ema = 3.7
    w.first_token = False
    w.freeze(5, "main")
    attn = layout.blocks[1].attn
    seen = {}
    x_in = {}
    hooks = [w.register_forward_pre_hook(lambda m, a: x_in.__setitem__("x", a[0]))]
    if hasattr(attn, "v_proj"):
        hooks += [attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0])),
                  attn.v_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("v", a[0]))]
    else:
        hooks.append(attn.c_attn.register_forward_hook(lambda m, a, o: seen.update(qkv=o, inp=a[0])))
    model(input_ids=_ids())
    x = x_in["x"]
    s = next(s for s in sites if s.name == "blocks.1.ln1")
    bias = w.bias if w.bias is not None else 0
    frozen = (x - x.mean(-1, keepdim=True) if s.centered else x) / 3.7 * w.weight + bias
    live = w.original(x)
    if "v" in seen:
        torch.testing.assert_close(seen["q"], frozen, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["v"], live, rtol=1e-5, atol=1e-6)
    else:
        d = x.shape[-1]
        cw, cb = attn.c_attn.weight, attn.c_attn.bias  # Conv1D [d, 3d]
        torch.testing.assert_close(seen["inp"], frozen, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["qkv"][..., 2 * d:], live @ cw[:, 2 * d:] + cb[2 * d:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["qkv"][..., :2 * d], frozen @ cw[:, :2 * d] + cb[:2 * d], rtol=1e-5,
                                   atol=1e-5)
    for h in hooks:
        h.remove()
    w.freeze(6, "v")
    assert w.fully_frozen and rem.n_removed() == 1


def test_ema_tracks_the_mean_divisor_of_ordinary_positions_and_position_zero_apart():
    model, layout, sites = _setup(tiny_llama)
    rem = Removal(model, layout, sites, momentum=0.9, first_token=True)
    seen = {}
    site = next(s for s in sites if s.name == "blocks.1.ln2")
    rem[site.name].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with rem.tracking():
        model(input_ids=_ids(4, 16, 1))
    d = norm_divisor(seen["x"], centered=False, eps=site.eps)[..., 0]  # [batch, pos]
    w = rem[site.name]
    assert w.ema == pytest.approx(float(d[:, 1:].double().mean()), rel=1e-6)
    assert w.ema_first == pytest.approx(float(d[:, 0].double().mean()), rel=1e-6)
    first_ema = w.ema
    with rem.tracking():
        model(input_ids=_ids(4, 16, 2))
    d2 = norm_divisor(seen["x"], centered=False, eps=site.eps)[..., 0]
    assert w.ema == pytest.approx(0.9 * first_ema + 0.1 * float(d2[:, 1:].double().mean()), rel=1e-6)


def test_divisor_helpers_against_direct_formulas():
    div = torch.rand(2, 5, 1) + 0.5
    st = divisor_stats(div, True).tolist()
    assert st[0] == pytest.approx(float(div[:, 1:].sum())) and st[1] == 8
    assert st[2] == pytest.approx(float(div[:, 0].sum())) and st[3] == 2
    st = divisor_stats(div, False).tolist()
    assert st[1] == 10 and st[3] == 0
    assert ema_update(None, 2.0, 0.9) == 2.0
    assert ema_update(2.0, 4.0, 0.9) == pytest.approx(2.2)
    assert blended_first_divisor(100.0, 1.0, 0.0) == pytest.approx(100.0)
    assert blended_first_divisor(100.0, 1.0, 0.5) == pytest.approx(10.0)
    assert blended_first_divisor(100.0, 1.0, 1.0) == pytest.approx(1.0)
    target = float(div[:, 1:].mean())
    assert float(aux_spread(div)) == pytest.approx(float(((div - target) / target).pow(2).mean()), rel=1e-5)


def test_ramp_blends_the_live_and_the_frozen_divisor_geometrically():
    model, layout, sites = _setup(tiny_llama)
    rem = Removal(model, layout, sites)
    w = rem["blocks.0.ln2"]
    w.ema, w.ema_first = 2.0, None
    w.freeze(1)
    x = torch.randn(2, 6, 64) * 3
    live = norm_divisor(x, centered=False, eps=w.eps)  # [2, 6, 1]
    for r in (0.0, 0.25, 1.0):
        w.ramp = r
        torch.testing.assert_close(w(x), x / (live ** (1 - r) * 2.0 ** r) * w.weight, rtol=1e-5, atol=1e-6)
    assert not rem["blocks.0.ln1"].fully_frozen
    w.ramp = 0.5
    assert not w.fully_frozen


def test_first_token_divisor_applies_to_position_zero_only():
    model, layout, sites = _setup(tiny_llama)
    rem = Removal(model, layout, sites)
    w = rem["ln_final"]
    w.ema, w.ema_first = 2.0, 50.0
    w.freeze(1)
    x = torch.randn(2, 6, 64)
    y = w(x)
    torch.testing.assert_close(y[:, 1:], (x[:, 1:] / 2.0 * w.weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[:, :1], (x[:, :1] / 50.0 * w.weight), rtol=1e-5, atol=1e-6)
    w.first_blend = 1.0
    torch.testing.assert_close(w(x), x / 2.0 * w.weight, rtol=1e-5, atol=1e-6)


# ---- schedule -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_qwen3])
def test_schedule_removes_every_site_once_in_the_published_order(factory):
    model, layout, sites = _setup(factory, n_layers=3)
    split = {s.name: s.role == "pre_attn" for s in sites}
    sch = build_schedule(sites, 60, split=split)
    keys = [(e.site, e.path) for e in sch.events]
    assert len(keys) == len(set(keys))
    expected = {(s.name, "main") for s in sites} | {(s.name, "v") for s in sites if s.role == "pre_attn"}
    assert set(keys) == expected
    steps = [e.step for e in sch.events]
    assert steps == sorted(steps) and steps[0] >= 1
    order = [PHASES.index(e.phase) for e in sch.events]
    assert order == sorted(order)
    for phase in ("ln2", "ln1qk", "ln1v"):
        layers = [int(e.site.split(".")[1]) for e in sch.events if e.phase == phase]
        assert layers == sorted(layers) == [0, 1, 2]
    assert sch.events[-1].site == "ln_final"
    assert sch.ramp_steps == 6 and sch.first_token_start == sch.last_removal + sch.ramp_steps
    assert sch.done_by < 60 and sch.blend(sch.done_by) == 1.0 and sch.blend(sch.last_removal) == 0.0
    e = sch.events[0]
    assert [sch.ramp(e, e.step + k) for k in (-1, 0, 2, 5, 9)] == [0.0, 1 / 6, 3 / 6, 1.0, 1.0]


def test_schedule_gaps_in_steps_and_scaling():
    _, _, sites = _setup(tiny_gpt2, n_layers=3)
    split = {s.name: s.role == "pre_attn" for s in sites}
    sch = build_schedule(sites, 200, ScheduleOptions(start=20, gap_ln2=2, gap_ln1qk=2, gap_ln1v=3, gap_final=3,
                                                     first_token_steps=10, ramp_steps=1), split=split)
    st = {(e.site, e.path): e.step for e in sch.events}
    assert [st[(f"blocks.{i}.ln2", "main")] for i in range(3)] == [20, 22, 24]
    assert [st[(f"blocks.{i}.ln1", "main")] for i in range(3)] == [26, 28, 30]
    assert [st[(f"blocks.{i}.ln1", "v")] for i in range(3)] == [33, 36, 39]
    assert st[("ln_final", "main")] == 42
    assert (sch.first_token_start, sch.first_token_end) == (43, 52)
    auto = build_schedule(sites, 300, split=split)
    assert auto.events[0].step == 15 and auto.last_removal <= 150  # 5% .. 50% of the steps
    with pytest.raises(NormscopeError, match="too few"):
        build_schedule(sites, 5, split=split)
    with pytest.raises(NormscopeError, match="too few"):
        build_schedule(sites, 45, ScheduleOptions(start=20, gap_ln2=2, gap_ln1qk=2, gap_ln1v=3, gap_final=3),
                       split=split)
    ramped = build_schedule(sites, 200, ScheduleOptions(start=20, gap_ln2=2, gap_ln1qk=2, gap_ln1v=3, gap_final=3,
                                                        first_token_steps=10, ramp_steps=8), split=split)
    assert (ramped.first_token_start, ramped.first_token_end) == (50, 59)


# ---- pure training helpers ----------------------------------------------------------------------------------
def test_lr_ce_kl_and_data_order():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, 0.1) == pytest.approx(0.1)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    direct = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert float(next_token_ce(logits, ids)) == pytest.approx(float(direct), rel=1e-5)
    teacher = torch.randn(2, 5, 11)
    p = torch.softmax(teacher[:, :-1], -1)
    direct_kl = (p * (torch.log(p) - torch.log_softmax(logits[:, :-1], -1))).sum(-1).mean()
    assert float(next_token_kl(logits, teacher)) == pytest.approx(float(direct_kl), rel=1e-5)
    assert float(next_token_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    cur = DataCursor(5, seed=3)
    first_epoch = [cur.index(i) for i in range(5)]
    assert sorted(first_epoch) == list(range(5))
    assert [DataCursor(5, seed=3).index(i) for i in range(5, 10)] == [cur.index(i) for i in range(5, 10)]


# ---- training: resume, signals ------------------------------------------------------------------------------
def _train(factory, run_dir, steps=8, resume=False, stop_at=None, save_every=3, **kw):
    model, layout, sites = _setup(factory)
    teacher = copy.deepcopy(model) if kw.get("distill_weight") else None
    flag = StopFlag()

    def progress(log):
        if stop_at is not None and log.step + 1 == stop_at:
            flag.request("SIGTERM")  # what the signal handler does

    opts = TrainOptions(steps=steps, lr=2e-3, save_every=save_every, keep_checkpoints=5, **kw)
    res = train(model, layout, sites, _sample().batches, opts, run_dir, teacher=teacher, resume=resume,
                progress=progress, stop=flag)
    return res, model


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_resume_after_a_stop_or_a_kill_gives_the_same_losses(factory, tmp_path):
    kw = {"distill_weight": 0.5, "aux_sites": "all", "grad_accum": 2}
    full, model_full = _train(factory, tmp_path / "full", **kw)
    assert full.removal.n_removed() == len(full.removal.wrappers)
    losses = [h.loss for h in full.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    # SIGTERM-style stop after step 5: checkpoint at 5, then resume to the end
    with pytest.raises(TrainingStopped) as info:
        _train(factory, tmp_path / "stopped", stop_at=5, **kw)
    assert info.value.step == 5 and info.value.path.name == "ckpt-000005"
    resumed, model_res = _train(factory, tmp_path / "stopped", resume=True, **kw)
    assert resumed.resumed_from == 5
    assert [h.loss for h in resumed.history] == losses  # bit-identical on CPU
    for a, b in zip(model_full.state_dict().values(), model_res.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.removal.state() == full.removal.state()
    # a kill after step 7 (no save): only the periodic checkpoint of step 6 survives
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(tmp_path / "full" / "ckpt-000006", killed / "ckpt-000006")
    again, _ = _train(factory, killed, resume=True, **kw)
    assert again.resumed_from == 6 and [h.loss for h in again.history] == losses


def test_warm_start_continues_a_finished_removal_with_nothing_left_to_remove(tmp_path):
    """--init-from: the earlier run's weights and frozen divisors, a fresh optimizer, no schedule; a run whose
    schedule had not finished is refused (it should be resumed instead)."""
    first, model_a = _train(tiny_llama, tmp_path / "A" / "ln-free", steps=8)
    assert first.removal.n_removed() == len(first.removal.wrappers)
    again, model_b = _train(tiny_llama, tmp_path / "B" / "ln-free", steps=4, init_from=str(tmp_path / "A"))
    assert len(again.history) == 4 and not again.schedule.events
    assert all(h.n_removed == len(first.removal.wrappers) and not h.events for h in again.history)
    a_state, b_state = first.removal.state(), again.removal.state()
    assert {n: st["divisor"] for n, st in b_state.items()} == {n: st["divisor"] for n, st in a_state.items()}
    assert all(st["frozen"] and st["ramp"] == 1.0 for st in b_state.values())
    moved = [not torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(),
                                                  strict=True)]
    assert any(moved)  # it trained on from A's weights
    # the first step's loss is the loss of A's final weights with every site frozen (a fresh model is not)
    fresh, _ = _train(tiny_llama, tmp_path / "C", steps=8)
    assert again.history[0].loss != pytest.approx(fresh.history[0].loss, rel=1e-3)
    with pytest.raises(TrainingStopped):
        _train(tiny_llama, tmp_path / "half" / "ln-free", steps=8, stop_at=2)
    with pytest.raises(NormscopeError, match="had not removed every site"):
        _train(tiny_llama, tmp_path / "D" / "ln-free", steps=4, init_from=str(tmp_path / "half"))
    with pytest.raises(NormscopeError, match="holds no checkpoint in control/"):
        warm_start_checkpoint(tmp_path / "A", control=True)


def test_checkpoints_are_atomic_and_pruned_and_resume_refuses_mismatches(tmp_path):
    run_dir = tmp_path / "run"
    _train(tiny_llama, run_dir, steps=8, save_every=2)
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["ckpt-000002", "ckpt-000004", "ckpt-000006", "ckpt-000008"][-5:]
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["done"] and state["step"] == 8 and len(state["history"]) == 8
    with pytest.raises(NormscopeError, match="already holds checkpoints"):
        _train(tiny_llama, run_dir, steps=8)
    with pytest.raises(NormscopeError, match="another model"):
        _train(tiny_gpt2, run_dir, steps=8, resume=True)
    with pytest.raises(NormscopeError, match="lr|steps"):
        model, layout, sites = _setup(tiny_llama)
        train(model, layout, sites, _sample().batches, TrainOptions(steps=9), run_dir, resume=True)
    with pytest.raises(NormscopeError, match="no checkpoint"):
        _train(tiny_llama, tmp_path / "empty", resume=True)


def test_one_control_serves_every_removal_variant_but_not_other_training_settings(tmp_path):
    """A control keeps every norm, so the removal-only settings (sites, schedule, distillation, momentum,
    first-token divisor) do not enter its resume check; the data and optimizer settings do."""
    run_dir = tmp_path / "control"
    model, layout, sites = _setup(tiny_llama)
    train(model, layout, sites, _sample().batches, TrainOptions(steps=8, lr=2e-3), run_dir, control=True)
    other = TrainOptions(steps=8, lr=2e-3, distill_weight=1.0, momentum=0.5, first_token=False,
                         schedule=ScheduleOptions(start=1, gap_ln2=1.0))
    model, layout, sites = _setup(tiny_llama)
    res = train(model, layout, sites, _sample().batches, other, run_dir, control=True, resume=True,
                remove=[sites[0].name], teacher=copy.deepcopy(model))
    assert len(res.history) == 8 and res.removal.n_removed() == 0
    model, layout, sites = _setup(tiny_llama)
    short = train(model, layout, sites, _sample().batches, TrainOptions(steps=3, lr=2e-3), tmp_path / "short",
                  control=True)  # too few steps for any removal schedule: a control needs none
    assert len(short.history) == 3
    model, layout, sites = _setup(tiny_llama)
    with pytest.raises(NormscopeError, match="lr"):
        train(model, layout, sites, _sample().batches, TrainOptions(steps=8, lr=1e-3), run_dir, control=True,
              resume=True)


def test_skipped_nonfinite_steps_are_counted(tmp_path):
    model, layout, sites = _setup(tiny_llama)
    batches = _sample().batches
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")  # any batch holding token 5 gives a NaN loss
    res = train(model, layout, sites, batches, TrainOptions(steps=8, save_every=0), tmp_path / "r")
    assert res.skipped == sum(h.skipped for h in res.history) > 0
    assert all(h.skipped == (not torch.isfinite(torch.tensor(h.loss))) for h in res.history)
    assert res.diverged_at is None
    assert all(w.ema is not None and torch.isfinite(torch.tensor(w.ema)) for w in res.removal)  # never poisoned
    assert all(w.divisor is None or torch.isfinite(torch.tensor(w.divisor)) for w in res.removal)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every batch now overflows: stop early, do not burn steps
    res = train(model, layout, sites, batches, TrainOptions(steps=30, save_every=0, max_nonfinite_run=4),
                tmp_path / "r2")
    assert res.diverged_at == 0 and len(res.history) == 4
    state = json.loads((latest_checkpoint(tmp_path / "r2") / "state.json").read_text())
    assert state["done"] and state["step"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    model, layout, sites = _setup(tiny_llama)
    res = train(model, layout, sites, _sample().batches, TrainOptions(steps=8, lr=2e-3, grad_accum=2, save_every=0),
                Path(out) / "run")
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps({"loss": [h.loss for h in res.history],
                                                        "ema": [w.ema for w in res.removal]}))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and transformers (~15-45 s)
def test_ddp_with_two_gloo_processes_matches_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    model, layout, sites = _setup(tiny_llama)
    single = train(model, layout, sites, _sample().batches, TrainOptions(steps=8, lr=2e-3, grad_accum=2,
                                                                         save_every=0), tmp_path / "single")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor([h.loss for h in single.history]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["ema"]), torch.tensor([w.ema for w in single.removal]), rtol=1e-6,
                               atol=0)


# ---- export -----------------------------------------------------------------------------------------------
def test_folded_gain_formula():
    w = torch.tensor([0.5, -2.0])
    g = folded_gain(w, 4.0, 1e12)
    torch.testing.assert_close(g, w * 1e6 / 4.0)
    g1 = folded_gain(w, 4.0, 1e12, gain_offset=1.0)
    torch.testing.assert_close(g1 + 1.0, (w + 1.0) * 1e6 / 4.0)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_qwen3])
def test_export_and_reload_give_the_logits_of_the_frozen_model(factory, tmp_path):
    from transformers import AutoModelForCausalLM

    res, model = _train(factory, tmp_path / "run", steps=10, save_every=0)
    model.eval()
    ids = _ids(2, 16, 7)
    with torch.no_grad():
        frozen = model(input_ids=ids).logits
        big = model(input_ids=ids * 0 + 9).logits  # a repeated token: other activations than text
    folder, plain = export_model(model, res.removal, tiny_tokenizer(), tmp_path / "export", {"note": "test"})
    re = AutoModelForCausalLM.from_pretrained(folder)
    assert type(re) is type(model)
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors")) == ["model.safetensors"]
    with torch.no_grad():
        out = re(input_ids=ids).logits
        out_big = re(input_ids=ids * 0 + 9).logits
    scale = frozen.abs().max()
    assert (out - frozen).abs().max() <= 1e-5 * scale
    assert (out_big - big).abs().max() <= 1e-5 * big.abs().max()
    manifest = json.loads((folder / "normscope_removal.json").read_text())
    assert manifest["eps"] == DEFAULT_EPS and len(manifest["sites"]) == len(res.removal.wrappers)
    assert all(s["divisor"] > 0 for s in manifest["sites"])
    cfg = json.loads((folder / "config.json").read_text())
    assert DEFAULT_EPS in cfg.values()


def test_export_refuses_live_sites(tmp_path):
    model, layout, sites = _setup(tiny_llama)
    rem = Removal(model, layout, sites)
    with pytest.raises(NormscopeError, match="still live"):
        fold(model, rem)


def test_exported_model_loads_in_transformer_bridge(tmp_path):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    res, model = _train(tiny_llama, tmp_path / "run", steps=10, save_every=0)
    folder, _ = export_model(model, res.removal, tiny_tokenizer(), tmp_path / "export", {})
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    ids = _ids(1, 12, 3)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    from transformers import AutoTokenizer

    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"), tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    scale = cache["ln_final.hook_scale"]  # constant: every norm divides by sqrt(eps)
    torch.testing.assert_close(scale, torch.full_like(scale, DEFAULT_EPS ** 0.5), rtol=1e-6, atol=0)


def test_exported_model_runs_through_dla_with_zero_error_and_through_sinks_and_depth(tmp_path):
    """The interpretability payoff: with every norm a fixed scale, DLA equals the direct effect (NMAE ~0),
    while the original model's live final norm makes them differ."""
    from normscope.analyses import dla, sinks
    from normscope.core.models import load_model
    from tests.tiny import save_tiny

    res, model = _train(tiny_llama, tmp_path / "run", steps=10, save_every=0)
    folder, _ = export_model(model, res.removal, tiny_tokenizer(), tmp_path / "export", {})
    orig = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "orig")
    sample = _sample(4, 16, 2, seed=5)
    got = {}
    for name, path in (("ln_free", folder), ("original", orig)):
        lm = load_model(str(path), device="cpu")
        got[name] = dla.run(lm, sample, dla.DlaOptions(neurons=0, backend="direct")).payload["nmae"]["all"]
    assert got["ln_free"] < 1e-3, got
    assert got["original"] > 100 * got["ln_free"] + 0.1, got
    lm = load_model(str(folder), device="cpu")
    assert sinks.run(lm, sample).headlines["sink_rate_percent"] >= 0
    from normscope.cli import app

    out = CliRunner().invoke(app, ["depth-curse", str(folder), "--text", str(tmp_path / "t.txt"), "--out",
                                   str(tmp_path / "d"), "--quiet", "--seq-len", "16", "--no-skip"]
                             if (tmp_path / "t.txt").write_text(TEXT * 4) else [])
    assert out.exit_code == 0, out.output


# ---- evaluation ---------------------------------------------------------------------------------------------
def test_loss_summary_and_grown_tokens_against_direct_computations():
    import numpy as np

    x = torch.rand(10_000) * 5
    s = ev.loss_summary(x)
    xn = x.double().numpy()
    assert s["mean"] == pytest.approx(xn.mean()) and s["median"] == pytest.approx(np.median(xn))
    assert s["p99"] == pytest.approx(np.quantile(xn, 0.99)) and s["p99_9"] == pytest.approx(np.quantile(xn, 0.999))
    assert s["max"] == pytest.approx(xn.max()) and s["n_tokens"] == 10_000
    assert ev.loss_summary(torch.tensor([1.0, float("nan")]))["max"] == float("inf")
    sample = _sample(4, 8, 2)
    n = 4 * 7
    base = ev.TokenLosses(torch.ones(n), torch.arange(n), torch.arange(n) // 7, torch.arange(n) % 7 + 1)
    new = ev.TokenLosses(torch.ones(n), base.targets, base.seq, base.pos)
    new.losses[9] = 7.0
    g = ev.grown_tokens(base, new, sample, tiny_tokenizer(), k=3)
    assert g.iloc[0]["growth"] == pytest.approx(6.0) and g.iloc[0]["position"] == 3


def test_per_token_losses_match_the_model_loss():
    model = tiny_llama()
    sample = _sample(8, 16, 4)
    tl = ev.per_token_losses(model, sample)
    assert tl.losses.numel() == 8 * 15
    direct = torch.stack([model(input_ids=b.input_ids, labels=b.input_ids).loss for b in sample.batches]).mean()
    assert float(tl.losses.mean()) == pytest.approx(float(direct), rel=1e-5)


# ---- the whole command --------------------------------------------------------------------------------------
def test_run_end_to_end_with_control_distill_and_report(tmp_path):
    from normscope.core.models import load_model
    from normscope.report import write_report
    from tests.tiny import save_tiny

    folder = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")
    lm = load_model(str(folder), device="cpu")
    ref = {k: v.clone() for k, v in lm.model.state_dict().items()}
    opts = RemoveLnOptions(train=TrainOptions(steps=10, lr=2e-3, distill_weight=1.0, save_every=0), control=True,
                           run_dir=tmp_path / "run", site_costs=True)
    result = run(lm, _sample(32, 16, 4), _sample(8, 16, 4, seed=9), opts)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in ref.items())  # the original is untouched
    ce = {r["model"]: r for r in result.payload["ce"]}
    assert set(ce) == {"original", "control", "LN-free"}
    assert ce["LN-free"]["gap_vs_control"] == pytest.approx(ce["LN-free"]["mean"] - ce["control"]["mean"])
    assert result.headlines["sites_removed"] == "5 / 5"
    assert result.payload["export_max_logit_diff"] < 1e-4
    assert (tmp_path / "run" / "ln-free-model" / "config.json").exists()
    assert len(result.tables["sites"]) == 5 and result.tables["sites"]["cost"].notna().all()
    paths = write_report(result, tmp_path / "report")
    assert paths.html.name == "remove-ln.html" and "Training curves" in paths.html.read_text()


def test_select_sites_and_model_without_norm_sites():
    model, layout, sites = _setup(tiny_llama)
    assert [s.name for s in select_sites(sites, ["blocks.1.*", "ln_final"])] == ["blocks.1.ln1", "blocks.1.ln2",
                                                                                "ln_final"]
    with pytest.raises(NormscopeError, match="matches no norm site"):
        select_sites(sites, ["nothing*"])
    bare = tiny_gpt2()
    for blk in bare.transformer.h:
        blk.ln_1, blk.ln_2 = torch.nn.Identity(), torch.nn.Identity()
    bare.transformer.ln_f = torch.nn.Identity()
    with pytest.raises(NormscopeError, match="no norm sites"):
        model_sites(bare, "bare-gpt2")


# ---- CLI --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("rl")
    save_tiny(tiny_llama(), tiny_tokenizer(), root / "llama")
    save_tiny(tiny_gpt2(), tiny_tokenizer(), root / "gpt2")
    save_tiny(tiny_bert(), tiny_tokenizer(), root / "bert")
    (root / "train.txt").write_text(TEXT * 12)
    (root / "eval.txt").write_text(TEXT[::-1] * 3)
    (root / "short.txt").write_text("Too short.")
    return root


def _cli(args):
    from normscope.cli import app

    return CliRunner().invoke(app, ["remove-ln", *map(str, args)])


def test_cli_runs_and_reports(tiny_folders, tmp_path):
    r = tiny_folders
    res = _cli([r / "llama", "--text", r / "train.txt", "--eval-text", r / "eval.txt", "--steps", 10, "--seq-len",
                32, "--batch-size", 4, "--run-dir", tmp_path / "run", "--out", tmp_path / "rep", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "remove-ln.html").exists()
    data = json.loads((tmp_path / "rep" / "remove-ln.json").read_text())
    assert data["analysis"] == "remove-ln" and data["headlines"]["sites_removed"] == "5 / 5"
    assert (tmp_path / "run" / "ln-free-model" / "model.safetensors").exists()


def test_cli_without_text_trains_on_self_generated_text(tiny_folders, tmp_path):
    r = tiny_folders
    res = _cli([r / "llama", "--eval-text", r / "eval.txt", "--steps", 8, "--seq-len", 16, "--batch-size", 2,
                "--run-dir", tmp_path / "run", "--out", tmp_path / "rep", "--quiet", "--no-export"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "rep" / "remove-ln.json").read_text())
    assert data["train_text"]["n_sequences"] == 16 and "sampled from" in data["data_note"]
    assert data["train_text"]["bos_prepended"]
    assert list((tmp_path / "run").glob("self-generated-16x16-s0.pt"))


@pytest.mark.parametrize("case", ["encoder", "steps", "short_eval", "no_ckpt", "other_model", "same_text",
                                  "two_sources"])
def test_cli_bad_input_is_one_line_and_exit_code_2(tiny_folders, tmp_path, case):
    r = tiny_folders
    base = ["--text", r / "train.txt", "--eval-text", r / "eval.txt", "--seq-len", 32, "--batch-size", 4,
            "--run-dir", tmp_path / "run", "--out", tmp_path / "rep", "--quiet"]
    if case == "other_model":
        ok = _cli([r / "llama", *base, "--steps", 8, "--no-export"])
        assert ok.exit_code == 0, ok.output
    args = {
        "encoder": [r / "bert", *base, "--steps", 10],
        "steps": [r / "llama", *base, "--steps", 3],
        "short_eval": [r / "llama", *base[:2], "--eval-text", r / "short.txt", *base[4:], "--steps", 10],
        "no_ckpt": [r / "llama", *base, "--steps", 10, "--resume"],
        "other_model": [r / "gpt2", *base, "--steps", 8, "--resume"],
        "same_text": [r / "llama", "--text", r / "train.txt", "--eval-text", r / "train.txt", "--steps", 10],
        "two_sources": [r / "llama", *base, "--steps", 10, "--self-generated", 4],
    }[case]
    res = _cli(args)
    assert len(one_line_error(res)) < 400


@pytest.mark.slow  # a CLI subprocess (~10-30 s)
def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_folders, tmp_path):
    r = tiny_folders
    exe = REPO / ".venv" / "bin" / "normscope"
    if not exe.exists():
        pytest.skip("no normscope entry point in .venv")
    args = [str(exe), "remove-ln", str(r / "llama"), "--text", str(r / "train.txt"), "--eval-text",
            str(r / "eval.txt"), "--seq-len", "32", "--batch-size", "4", "--steps", "400", "--max-tokens", "2048",
            "--save-every", "5", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "run" / "ln-free").glob("ckpt-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "--resume" in err
    ck = latest_checkpoint(tmp_path / "run" / "ln-free")
    state = json.loads((ck / "state.json").read_text())
    assert not state["done"] and 5 <= state["step"] < 400 and len(state["history"]) == state["step"]


# ---- SmolLM2: the phenomenon -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_copy(smollm2):
    model = copy.deepcopy(smollm2.model)  # the wrappers edit the module tree: never on the shared fixture
    layout = find_layout(model)
    return model, layout, find_norm_sites(model, layout), smollm2.tokenizer


@pytest.mark.slow
def test_smollm2_first_token_divisor_is_far_above_the_shared_one(smol_copy):
    """Position 0 carries the ~25,000 massive activation in dim 507: its RMS is ~100x that of other tokens
    in the middle layers, so one shared divisor cannot serve both (REFERENCE section 5)."""
    model, layout, sites, tok = smol_copy
    ids = torch.tensor([tok(TEXT)["input_ids"][:48]])  # [1, 48]
    rem = Removal(model, layout, sites)
    try:
        with torch.no_grad(), rem.tracking():
            model(input_ids=ids)
        ratios = {i: rem[f"blocks.{i}.ln1"].ema_first / rem[f"blocks.{i}.ln1"].ema for i in range(12, 21)}
        assert min(ratios.values()) > 50, ratios
        assert rem["blocks.0.ln1"].ema_first / rem["blocks.0.ln1"].ema < 5  # no massive activation yet
    finally:
        rem.uninstall()


@pytest.mark.slow
def test_smollm2_tracked_divisor_matches_transformer_lens_hook_scale(smol_copy):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    model, layout, sites, tok = smol_copy
    ids = torch.tensor([tok(TEXT)["input_ids"][:32]])
    rem = Removal(model, layout, sites)
    try:
        with torch.no_grad(), rem.tracking():
            model(input_ids=ids)
        ours = {i: (rem[f"blocks.{i}.ln1"].ema, rem[f"blocks.{i}.ln1"].ema_first) for i in (2, 15)}
    finally:
        rem.uninstall()
    bridge = TransformerBridge.boot_transformers("smollm2", hf_model=copy.deepcopy(model), tokenizer=tok,
                                                 device="cpu")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    for i, (rest, first) in ours.items():
        scale = cache[f"blocks.{i}.ln1.hook_scale"].double()  # [1, pos, 1]
        assert rest == pytest.approx(float(scale[:, 1:].mean()), rel=1e-4)
        assert first == pytest.approx(float(scale[:, 0].mean()), rel=1e-4)


@pytest.mark.slow
def test_smollm2_late_sites_frozen_without_training_cost_little_with_a_position_zero_divisor(smol_copy):
    """REFERENCE: with a separate position-0 divisor, the final norm plus the pre-attention norms of layers
    12-29 cost only ~+0.03 to +0.07 nats untrained; one shared divisor costs far more."""
    model, layout, sites, tok = smol_copy
    ids = torch.tensor([tok(TEXT * 2)["input_ids"][:96]])
    chosen = select_sites(sites, ["blocks.1[2-9].ln1", "blocks.2[0-9].ln1", "ln_final"])
    assert len(chosen) == 19
    rem = Removal(model, layout, sites, split_value=False)
    try:
        with torch.no_grad():
            base = float(next_token_ce(model(input_ids=ids).logits, ids))
            with rem.tracking():
                model(input_ids=ids)
            for s in chosen:
                rem[s.name].freeze(1)
            own = float(next_token_ce(model(input_ids=ids).logits, ids))
            for s in chosen:
                rem[s.name].first_blend = 1.0
            shared = float(next_token_ce(model(input_ids=ids).logits, ids))
    finally:
        rem.uninstall()
    assert own - base < 0.25, (base, own)
    assert shared - base > 2 * max(own - base, 0.05), (base, own, shared)


@pytest.mark.slow
def test_smollm2_site_costs_are_small_one_at_a_time(smol_copy):
    model, layout, sites, tok = smol_copy
    ids = tok(TEXT * 2)["input_ids"][:64]
    batches = sample_from_ids([ids], ["x"], batch_size=1).batches
    chosen = select_sites(sites, ["blocks.20.ln1", "blocks.20.ln2", "ln_final"])

    class _P:
        from contextlib import contextmanager

        @contextmanager
        def task(self, d, t):
            yield lambda n: None

    with torch.no_grad():
        df = site_costs(model, layout, chosen, batches, _P(), first_token=True)
    assert list(df.site) == ["blocks.20.ln1", "blocks.20.ln2", "ln_final"]
    assert (df["cost_with_first_token_divisor"].abs() < 0.3).all(), df
