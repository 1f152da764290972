"""remove-ln across processes and in less memory: collectives on the model's device, the process-group start,
resume onto the rank's device, a stop that every rank agrees on, the site-cost pass split over the ranks, FSDP2
sharding, bf16 autocast and gradient checkpointing.

Two gloo processes stand in for two GPUs (``mp.spawn``). gloo accepts host tensors where NCCL refuses them,
so the placement of the tensors handed to collectives is checked twice: with a fake process group and a
``meta`` device (what reaches ``all_reduce``), and in the real gloo run (every collective goes through
:mod:`normscope.removal.dist`, which places it).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.removal import dist as D
from normscope.removal.frozen import Removal, divisor_stats
from normscope.removal.pipeline import _NullProgress, site_costs
from normscope.removal.train import StopFlag, TrainingStopped, TrainOptions, latest_checkpoint, train
from tests.test_removal import TEXT, _cli, _free_port, _sample, _setup
from tests.tiny import save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


@pytest.fixture
def one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


# ---- placement and process-group start (fake process group) ---------------------------------------------------
def test_collectives_get_tensors_on_the_model_device_not_the_host(monkeypatch):
    """The step's losses are summed on the host; NCCL takes only device tensors. What reaches all_reduce must
    be on the model's device (``meta`` here, standing in for a GPU), whatever device the tensor was built on."""
    import torch.distributed as dist

    seen: list[tuple[torch.device, Any]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append((t.device, op)))
    host = torch.zeros(4, dtype=torch.float64)  # [loss, ce, aux, kl], as the loop builds them
    out = D.all_reduce(host, torch.device("meta"))
    assert seen == [(torch.device("meta"), dist.ReduceOp.SUM)] and out.device.type == "meta"
    D.all_reduce(host, torch.device("meta"), op="max")
    assert seen[-1] == (torch.device("meta"), dist.ReduceOp.MAX)
    assert host.device.type == "cpu"  # the caller's tensor is untouched


def test_process_group_starts_on_the_rank_gpu_with_a_timeout(monkeypatch):
    import torch.distributed as dist

    calls: list[tuple[str, Any]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    assert D.init_distributed(torch.device("cuda", 1))
    assert calls[0] == ("set_device", 1)  # before the group, so NCCL's communicator lands on GPU 1, not GPU 0
    assert calls[1] == ("nccl", {"timeout": D.DIST_TIMEOUT, "device_id": torch.device("cuda", 1)})
    calls.clear()
    assert D.init_distributed(torch.device("cpu"))
    assert calls == [("gloo", {"timeout": D.DIST_TIMEOUT})]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.rank_device("auto") == "cuda:1" and D.rank_device("cuda") == "cuda:1"
    assert D.rank_device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.rank_device("auto") == "auto" and not D.init_distributed(torch.device("cpu"))


def test_resume_loads_the_trainer_state_onto_the_model_device(tmp_path, monkeypatch, one_process):
    """Without map_location every rank would load the optimizer state onto the GPU rank 0 saved it from."""
    model, layout, sites = _setup(tiny_llama)
    opts = TrainOptions(steps=8, lr=2e-3, save_every=4, keep_checkpoints=5, log_sites=False)
    full = train(model, layout, sites, _sample().batches, opts, tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "ckpt-000004", tmp_path / "b" / "ckpt-000004")
    seen: list[dict[str, Any]] = []
    real = torch.load

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    model, layout, sites = _setup(tiny_llama)
    again = train(model, layout, sites, _sample().batches, opts, tmp_path / "b", resume=True)
    assert seen and seen[0].get("map_location") == next(model.parameters()).device
    assert [h.loss for h in again.history] == [h.loss for h in full.history]


# ---- two gloo processes: DDP ----------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """Site costs over two ranks, then a long run that the test stops with a SIGTERM to rank 1 only."""
    _env(rank, world, port)
    import torch.distributed as dist

    calls: list[tuple[str, str]] = []
    real = dist.all_reduce

    def spy(t: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls.append((str(t.device), Path(sys._getframe(1).f_code.co_filename).name))
        return real(t, *a, **k)

    dist.all_reduce = spy  # type: ignore[assignment]
    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    D.init_distributed(torch.device("cpu"))
    model, layout, sites = _setup(tiny_llama)
    costs = site_costs(model, layout, sites, _sample().batches[:2], _NullProgress(), True)
    if rank == 0:
        costs.to_json(Path(out, "costs.json"))
    model, layout, sites = _setup(tiny_llama)
    opts = TrainOptions(steps=3000, lr=2e-3, grad_accum=2, save_every=0, log_sites=False)
    rec: dict[str, Any] = {"rank": rank}
    try:
        train(model, layout, sites, _sample().batches, opts, Path(out) / "run")
    except TrainingStopped as exc:
        rec.update(step=exc.step, signame=exc.signame, path=str(exc.path) if exc.path else None)
    rec["calls"] = calls
    rec["device"] = str(next(model.parameters()).device)
    Path(out, f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    saved = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False)
    log = out / "run" / "steps.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.kill(int((out / "pid1").read_text()), signal.SIGTERM)  # rank 1 only: rank 0 never sees a signal
    while not ctx.join(timeout=120):
        pass
    for k, v in saved.items():
        if v is not None:
            os.environ[k] = v
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # two spawned processes import torch and transformers (~15-45 s)
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_a_resumable_checkpoint(ddp_run, tmp_path,
                                                                                             one_process):
    out, (r0, r1) = ddp_run
    assert r0.get("signame") == r1.get("signame") == "SIGTERM"
    assert r0["step"] == r1["step"] >= 3  # the same step on both ranks: nobody waits alone at the barrier
    step = r0["step"]
    ck = latest_checkpoint(out / "run")
    assert ck is not None and ck.name == f"ckpt-{step:06d}" and r0["path"] == str(ck) and r1["path"] is None
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == step and not state["done"] and len(state["history"]) == step
    # resumable: one process continues the two-process run with the losses of an uninterrupted run
    opts = TrainOptions(steps=3000, lr=2e-3, grad_accum=2, save_every=0, log_sites=False)

    def until(n: int, run_dir: Path, resume: bool) -> list[float]:
        flag = StopFlag()
        model, layout, sites = _setup(tiny_llama)
        with pytest.raises(TrainingStopped) as info:
            train(model, layout, sites, _sample().batches, opts, run_dir, resume=resume, stop=flag,
                  progress=lambda log: flag.request() if log.step + 1 == n else None)
        assert info.value.step == n
        return [h["loss"] for h in json.loads((info.value.path / "state.json").read_text())["history"]]

    shutil.copytree(out / "run", tmp_path / "resumed")
    resumed = until(step + 2, tmp_path / "resumed", resume=True)
    reference = until(step + 2, tmp_path / "reference", resume=False)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_every_collective_goes_through_the_placing_helper_on_the_model_device(ddp_run):
    _out, ranks = ddp_run
    for r in ranks:
        assert r["calls"], "no collective was recorded"
        assert {f for _d, f in r["calls"]} == {"dist.py"}  # placed by normscope.removal.dist.all_reduce
        assert {d for d, _f in r["calls"]} == {r["device"]}
        # site costs, calibration, then two a step (losses + statistics, the stop request)
        assert len(r["calls"]) == 2 + 2 * r["step"]


@pytest.mark.slow
def test_site_costs_split_over_two_ranks_equal_one_process(ddp_run, one_process):
    out, _ranks = ddp_run
    import pandas as pd

    model, layout, sites = _setup(tiny_llama)
    one = site_costs(model, layout, sites, _sample().batches[:2], _NullProgress(), True)
    two = pd.read_json(out / "costs.json")
    assert list(two["site"]) == list(one["site"])
    for col in ("ce_frozen_alone", "cost", "cost_with_first_token_divisor"):
        torch.testing.assert_close(torch.tensor(two[col].to_numpy()), torch.tensor(one[col].to_numpy()),
                                   rtol=1e-6, atol=1e-7, equal_nan=True)


# ---- two gloo processes: FSDP2 ----------------------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    _env(rank, world, port)
    import torch.distributed as dist

    opts = TrainOptions(steps=8, lr=2e-3, grad_accum=2, save_every=4, keep_checkpoints=5, fsdp=True,
                        aux_sites="all", log_sites=False)
    model, layout, sites = _setup(tiny_llama)
    res = train(model, layout, sites, _sample().batches, opts, Path(out) / "run")
    rec: dict[str, Any] = {"loss": [h.loss for h in res.history], "ema": [w.ema for w in res.removal]}
    if rank == 0:
        assert res.full_state is not None
        torch.save(res.full_state, Path(out, "full.pt"))
        (Path(out) / "resumed").mkdir()
        shutil.copytree(Path(out) / "run" / "ckpt-000004", Path(out) / "resumed" / "ckpt-000004")
    else:
        assert res.full_state is None
    dist.barrier()
    model, layout, sites = _setup(tiny_llama)
    again = train(model, layout, sites, _sample().batches, opts, Path(out) / "resumed", resume=True)
    rec["resumed_loss"] = [h.loss for h in again.history]
    if rank == 0:
        Path(out, "fsdp.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_with_two_gloo_processes_matches_one_process_and_resumes(tmp_path, one_process):
    """Sharded over two ranks, the live norms must read the gains FSDP gathers onto the wrapper (a wrapper that
    called the original module would train nothing of them and drift from the one-process run)."""
    import torch.multiprocessing as mp

    from normscope.removal.dist import plain_copy

    model, layout, sites = _setup(tiny_llama)
    opts = TrainOptions(steps=8, lr=2e-3, grad_accum=2, save_every=0, aux_sites="all", log_sites=False)
    single = train(model, layout, sites, _sample().batches, opts, tmp_path / "single")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "fsdp.json").read_text())
    want = [h.loss for h in single.history]
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["resumed_loss"]), torch.tensor(got["loss"]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(got["ema"]), torch.tensor([w.ema for w in single.removal]), rtol=1e-6,
                               atol=0)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    ref = model.state_dict()
    assert set(ref) - set(full) == D.tied_names(model)  # the tied alias is dropped, as safetensors does
    gains = [k for k in full if "norm" in k]
    assert gains
    for k, v in full.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-6)
    untrained, _, _ = _setup(tiny_llama)
    assert all(not torch.equal(full[k], untrained.state_dict()[k]) for k in gains)  # every gain was trained
    # rank 0 continues on an unsharded copy: same weights, same wrappers, same logits as the one-process model
    res = copy.copy(single)
    res.full_state = full
    plain, removal = plain_copy(untrained, res, opts)
    assert removal.state() == single.removal.state()
    ids = _sample().batches[0].input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_the_live_path_reads_the_wrapper_parameter_not_the_original_module():
    """FSDP replaces a module's Parameter by the gathered one before each forward; the live path must use it."""
    model, layout, sites = _setup(tiny_llama)
    rem = Removal(model, layout, sites)
    w = rem[sites[0].name]
    x = torch.randn(2, 5, 64)  # [batch, pos, d_model]
    new = nn.Parameter(w.weight.detach() * 2 + 0.5)
    w._parameters["weight"] = new  # what FSDP2 does on every unshard
    y = w(x)
    rms = x.pow(2).mean(-1, keepdim=True).add(w.eps).rsqrt()
    torch.testing.assert_close(y, x * rms * new, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    rem.uninstall()
    assert model.get_submodule(sites[0].path).weight is new  # the trained Parameter goes back to the model


# ---- bf16 autocast, gradient checkpointing ----------------------------------------------------------------------
def test_bf16_autocast_keeps_fp32_master_weights_and_fp32_statistics(tmp_path, one_process):
    runs = {}
    for prec in ("float32", "bfloat16"):
        model, layout, sites = _setup(tiny_llama)
        opts = TrainOptions(steps=8, lr=2e-3, save_every=0, precision=prec, aux_sites="all", log_sites=False)
        runs[prec] = (train(model, layout, sites, _sample().batches, opts, tmp_path / prec), model)
    (r32, _), (r16, m16) = runs["float32"], runs["bfloat16"]
    a, b = torch.tensor([h.loss for h in r32.history]), torch.tensor([h.loss for h in r16.history])
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # autocast ran
    assert ((a - b).abs() / a.abs()).max() < 5e-3  # within 0.5% of fp32 at every step (measured: 0.03%)
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    tr = torch.load(latest_checkpoint(tmp_path / "bfloat16") / "trainer.pt", weights_only=True)
    moments = [t for st in tr["optimizer"]["state"].values() for t in (st["exp_avg"], st["exp_avg_sq"])]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    torch.testing.assert_close(torch.tensor([w.ema for w in r16.removal]), torch.tensor([w.ema for w in r32.removal]),
                               rtol=2e-2, atol=0)
    # the divisor statistics of a bf16-autocast forward: fp64 sums of fp32 divisors of the real input
    rem, w = r16.removal, r16.removal[r16.removal.sites[0].name]
    seen: list[torch.Tensor] = []
    h = w.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    rem.set(tracking=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m16(input_ids=_sample().batches[0].input_ids)
    h.remove()
    rem.set(tracking=False)
    acc = w.pending()
    x = seen[0].double()  # [batch, pos, d_model]
    direct = x.pow(2).mean(-1, keepdim=True).add(w.eps).sqrt()
    assert acc.dtype == torch.float64 and w.live_divisor(seen[0].bfloat16()).dtype == torch.float32
    torch.testing.assert_close(acc, divisor_stats(direct, True), rtol=1e-6, atol=0)
    w.discard()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_gradient_checkpointing_gives_the_same_losses_statistics_and_weights(factory, tmp_path, one_process):
    out = {}
    for ckpt in (False, True):
        model, layout, sites = _setup(factory)
        calls = [0]
        opts = TrainOptions(steps=8, lr=2e-3, grad_accum=2, save_every=0, aux_sites="all", distill_weight=0.5,
                            gradient_checkpointing=ckpt, log_sites=False)
        teacher = copy.deepcopy(model)
        res = train(model, layout, sites, _sample().batches, opts, tmp_path / str(ckpt), teacher=teacher)
        for w in res.removal:
            w.register_forward_pre_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
        model.train()
        ids = _sample().batches[0].input_ids
        model(input_ids=ids).logits.sum().backward()  # one more forward and backward, counting norm calls
        out[ckpt] = (res, model, calls[0])
    (r0, m0, n0), (r1, m1, n1) = out[False], out[True]
    on = [getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing for m in (m0, m1)]
    assert on == [False, True]
    assert n1 > n0  # the blocks' norms ran again in the backward pass
    torch.testing.assert_close(torch.tensor([h.loss for h in r1.history]), torch.tensor([h.loss for h in r0.history]),
                               rtol=1e-6, atol=1e-7)
    assert [w.ema for w in r1.removal] == pytest.approx([w.ema for w in r0.removal], rel=1e-6)
    for (k, a), b in zip(m0.named_parameters(), m1.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_checkpointing_is_refused_in_one_line_where_the_model_has_none(tmp_path, one_process):
    model, layout, sites = _setup(tiny_llama)
    model.supports_gradient_checkpointing = False
    with pytest.raises(NormscopeError, match="does not support gradient checkpointing"):
        train(model, layout, sites, _sample().batches, TrainOptions(steps=8, gradient_checkpointing=True),
              tmp_path / "r")


# ---- the command ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    save_tiny(tiny_llama(), tiny_tokenizer(), root / "llama")
    (root / "train.txt").write_text(TEXT * 12)
    (root / "eval.txt").write_text(TEXT[::-1] * 3)
    return root


def test_cli_bf16_with_gradient_checkpointing_trains_and_reports(tiny_folders, tmp_path, one_process):
    r = tiny_folders
    res = _cli([r / "llama", "--text", r / "train.txt", "--eval-text", r / "eval.txt", "--steps", 10, "--seq-len",
                32, "--batch-size", 4, "--dtype", "bfloat16", "--gradient-checkpointing", "--run-dir", tmp_path / "run",
                "--out", tmp_path / "rep", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "rep" / "remove-ln.json").read_text())
    meta = data["meta"]["settings"]
    assert meta["precision"] == "bfloat16" and meta["gradient_checkpointing"] is True
    assert data["headlines"]["sites_removed"] == "5 / 5" and all(torch.isfinite(torch.tensor(
        [h["loss"] for h in data["history"]])))


@pytest.mark.parametrize("case", ["float16", "fsdp_alone", "memory"])
def test_cli_refuses_in_one_line_before_training(tiny_folders, tmp_path, monkeypatch, case, one_process):
    r = tiny_folders
    base = [r / "llama", "--text", r / "train.txt", "--eval-text", r / "eval.txt", "--steps", 10, "--seq-len", 32,
            "--batch-size", 4, "--run-dir", tmp_path / "run", "--out", tmp_path / "rep", "--quiet"]
    extra, want = {"float16": (["--dtype", "float16"], "bfloat16"), "fsdp_alone": (["--fsdp"], "torchrun"),
                   "memory": ([], "is free on")}[case]
    if case == "memory":  # one batch of 4 x 32 tokens does not fit in 64 KiB
        import normscope.core.models as models

        monkeypatch.setattr(models, "available_memory_bytes", lambda device: 64 * 1024)
    res = _cli([*base, *extra])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and want in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()  # refused before any training
