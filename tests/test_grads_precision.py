"""Gradients in half precision and the memory they need: grads sums bfloat16 gradients in float32, ``l2`` never
copies a whole tensor to float64, and the memory check counts the per-parameter training state of grads and
remove-ln."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from normscope.analyses import grads
from normscope.analyses.grads.params import Fp32GradSums
from normscope.core.errors import NormscopeError
from normscope.core.models import LoadedModel, ModelInfo, check_memory, estimate_batch_bytes
from normscope.core.text import sample_from_ids
from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer


def _lm(model: torch.nn.Module) -> LoadedModel:
    info = SimpleNamespace(spec="tiny", slug="tiny", is_causal=True, to_dict=lambda: {"spec": "tiny"})
    return LoadedModel(model, tiny_tokenizer(), info)  # type: ignore[arg-type]


def test_fp32_sums_keep_every_share_a_bf16_grad_loses() -> None:
    """512 backward passes of 1/512 of the same gradient: bf16 .grad stalls far below it, the float32 sum not."""
    w = torch.nn.Parameter(torch.linspace(0.5, 2.0, 64, dtype=torch.bfloat16))
    x = torch.linspace(1.0, 3.0, 64, dtype=torch.bfloat16)
    n = 512
    for _ in range(n):  # the defect: half-precision .grad accumulation
        ((w * x).sum() / n).backward()
    assert w.grad is not None
    stalled = w.grad.double()
    want = x.double()  # d/dw of sum(w * x) = x, summed over n shares of 1/n
    assert float((stalled / want).min()) < 0.75  # whole shares lost once the sum is 2^8 times a share
    w.grad = None
    with Fp32GradSums([w]) as sums:
        for _ in range(n):
            ((w * x).sum() / n).backward()
            assert w.grad is None  # folded into the float32 sum after every backward
    got = sums.grad(w)
    assert got is not None and got.dtype == torch.float32
    # each share is x/n rounded to bf16 (exact here: x/512 is a power-of-two shift), summed without loss
    assert torch.allclose(got.double(), want, rtol=1e-6)
    f32 = torch.nn.Parameter(torch.ones(3))
    with Fp32GradSums([f32]) as s32:  # float32 parameters keep their own .grad
        (f32.sum() * 2).backward()
    assert s32.grad(f32) is f32.grad and not s32.sums


def test_bf16_grads_of_many_batches_equal_those_of_one() -> None:
    """The same sequence 256 times in batches of one is the same mean loss as once: same gradient norms."""
    model = tiny_llama(n_layers=2).to(torch.bfloat16)
    row = torch.randint(4, 100, (1, 16), generator=torch.Generator().manual_seed(0)).tolist()
    once = grads.measure(_lm(model), sample_from_ids(row, ["prose"], batch_size=1))
    many = grads.measure(_lm(model), sample_from_ids(row * 256, ["prose"] * 256, batch_size=1))
    a = once.groups.set_index(["block", "group"])["grad_norm"]
    b = many.groups.set_index(["block", "group"])["grad_norm"]
    # each batch's gradient is computed in bf16 (2^-8 relative steps); their float32 sum keeps the total
    ratio = (b / a).to_numpy()
    assert ratio.min() > 0.995 and ratio.max() < 1.005, ratio  # bf16 .grad accumulation: up to 1.0175
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # left as found


def test_l2_reads_pieces_in_float32_and_matches_float64() -> None:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1000, generator=g).to(torch.bfloat16) * 30, torch.randn(7, 9, generator=g), torch.zeros(0)]
    want = math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))
    assert grads.l2(ts) == pytest.approx(want, rel=1e-6)
    big = torch.full((5000,), 3.0, dtype=torch.bfloat16)
    import normscope.analyses.grads.metrics as metrics

    seen: list[tuple[int, torch.dtype]] = []
    real = torch.linalg.vector_norm

    def spy(x: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        seen.append((x.numel(), x.dtype))
        return real(x, *a, **k)  # type: ignore[arg-type]

    old = metrics.L2_CHUNK
    try:
        metrics.L2_CHUNK = 1024
        torch.linalg.vector_norm = spy  # type: ignore[assignment]
        got = grads.l2([big])
    finally:
        metrics.L2_CHUNK = old
        torch.linalg.vector_norm = real
    assert got == pytest.approx(3.0 * math.sqrt(5000), rel=1e-6)
    assert [n for n, _ in seen] == [1024] * 4 + [904] and all(d == torch.bfloat16 for _, d in seen)


def test_memory_check_counts_the_training_state() -> None:
    info = ModelInfo(spec="m", name="m", slug="m", source="folder", architecture="llama", n_layers=2, d_model=64,
                     n_heads=4, is_causal=True, max_positions=64, dtype="float32", device="cpu", n_params=10**9)
    lm = LoadedModel(SimpleNamespace(config=SimpleNamespace(vocab_size=128)), None, info)  # type: ignore[arg-type]
    import normscope.core.models as models

    batch = estimate_batch_bytes(info, 128, 2, 32, training=True)
    free = int((batch + 5 * 10**9) / 0.9)  # room for one batch and 5 bytes a parameter
    old = models.available_memory_bytes
    models.available_memory_bytes = lambda device: free  # type: ignore[assignment]
    try:
        check_memory(lm, 2, 32, training=True)  # the activations alone fit
        check_memory(lm, 2, 32, training=True, state_bytes_per_param=4)  # grads' float32 sums fit
        with pytest.raises(NormscopeError, match="AdamW state 11.2 GiB, but only") as e:
            check_memory(lm, 2, 32, training=True, state_bytes_per_param=12)  # remove-ln's does not
        assert "bigger machine" in str(e.value)
    finally:
        models.available_memory_bytes = old


@pytest.mark.parametrize("command", ["grads", "remove-ln"])
def test_cli_refuses_when_the_gradients_do_not_fit(tmp_path, monkeypatch, command: str) -> None:
    """Enough memory for a forward pass of one batch, not for the training state: exit 2, one line, no run."""
    import normscope.core.models as models
    from normscope.cli import app

    folder = save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path / "llama")
    n_params = sum(p.numel() for p in tiny_llama().parameters())
    info = SimpleNamespace(dtype="float32", d_model=64, n_heads=4, n_layers=2)
    fwd = estimate_batch_bytes(info, 128, 2, 32, training=True)  # type: ignore[arg-type]
    monkeypatch.setattr(models, "available_memory_bytes", lambda device: int((fwd + 2 * n_params) / 0.9))
    extra = ["--steps", "10", "--run-dir", str(tmp_path / "run")] if command == "remove-ln" else []
    res = CliRunner().invoke(app, [command, str(folder), "--seq-len", "32", "--batch-size", "2", "--out",
                                   str(tmp_path / "rep"), "--quiet", *extra])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and "gradients" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "rep").exists() or not list((tmp_path / "rep").glob("*.json"))
