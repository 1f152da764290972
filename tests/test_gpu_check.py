"""benchmarks/gpu_check.sh in its CPU mode on a tiny random Llama: the reference it writes holds the numbers of the
commands' own JSON, a check against it finds float32 identical and bfloat16 close, and a step that fails or runs
out of time is recorded while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def _run(mode: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_TINY": "1",
            "OMP_NUM_THREADS": "1", "GPU_CHECK_DEADLINE": "5000", "GPU_CHECK_STEP_BUDGET": "1500", **env}
    return subprocess.run(["bash", str(SCRIPT), *mode], env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpucheck")
    model = save_tiny(tiny_llama(n_layers=4), tiny_tokenizer(), tmp / "llama")
    env = {"GPU_CHECK_MODEL": str(model), "GPU_CHECK_REFERENCE": str(tmp / "ref.json"), "OUT": str(tmp / "ref_out"),
           "GPU_CHECK_WORK": str(tmp / "ref_work")}
    res = _run(["--reference"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"tmp": tmp, "model": model, "env": env, "ref": json.loads((tmp / "ref.json").read_text())}


def test_reference_holds_the_commands_own_numbers(reference) -> None:
    ref, work = reference["ref"], reference["tmp"] / "ref_work" / "float32"
    assert ref["tiny"] and ref["settings"]["skip_layers"] == "0,1,-1" and len(ref["token_sha256"]) == 64
    sinks = json.loads((work / "sinks" / "sinks.json").read_text())
    assert ref["figures"]["sinks"]["alpha1_mean"] == pytest.approx([r["alpha1_mean"] for r in sinks["layers"]],
                                                                    rel=1e-6)
    depth = json.loads((work / "depth" / "depth.json").read_text())
    skipped = [r["block"] for r in depth["blocks"] if r["skip_loss"] is not None]
    assert skipped == [0, 1, 3]  # --skip-layers 0,1,-1 on 4 blocks: three skipped, one not
    assert ref["figures"]["depth"]["loss"] == pytest.approx(depth["loss"], rel=1e-6)
    dla = json.loads((work / "dla" / "dla.json").read_text())
    assert ref["figures"]["dla"]["nmae_all"] == pytest.approx(dla["nmae"]["all"], rel=1e-6)
    rl = json.loads((work / "remove-ln" / "remove-ln.json").read_text())
    assert len(ref["figures"]["remove-ln"]["train_loss"]) == ref["settings"]["rl_steps"] == len(rl["history"])
    assert ref["figures"]["remove-ln"]["sites_removed"] == "9 / 9"  # 2 per block and the final norm, all removed
    assert len(json.dumps(ref)) < 8000  # a few KB, committed


def test_check_against_the_reference_float32_identical_bfloat16_close(reference) -> None:
    tmp = reference["tmp"]
    env = {**reference["env"], "OUT": str(tmp / "out"), "GPU_CHECK_WORK": str(tmp / "work")}
    res = _run([], env)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp / "out" / "gpu_check.json").read_text())
    assert rep["all_steps_ran"] and rep["reference_found"] and not rep["setup"]["errors"]
    f32, bf16 = rep["runs"]["float32"], rep["runs"]["bfloat16"]
    assert f32["same_tokens_as_reference"] and bf16["same_tokens_as_reference"]
    for step in ("sinks", "depth", "dla", "remove-ln"):
        assert f32["steps"][step]["rc"] == 0
        assert f32["steps"][step]["worst_agreement"] == 0.0  # same CPU, same float32 arithmetic: the same numbers
        assert f32["steps"][step]["tokens_per_s"] > 0 and f32["steps"][step]["vs_plain_forward"] > 0
        assert bf16["steps"][step]["rc"] == 0
    for step in ("sinks", "depth", "dla"):  # bfloat16 moves the tables a little, not a lot (README: <= 1.2%)
        figs = bf16["steps"][step]["figures"]
        curves = [v["agreement"] for v in figs.values() if v["kind"] == "curve" and v["n"]]
        assert 0 < max(curves) < 0.1, (step, figs)
    assert f32["steps"]["forward"]["tokens_per_s"] > 0 and f32["steps"]["forward"]["tokens"] == 128
    assert "peak_gpu_bytes" not in f32["steps"]["sinks"]  # no GPU here: no number rather than a wrong one
    assert (tmp / "out" / "gpu_check.log").read_text().count("rc 0") == 10


def test_a_step_that_overruns_or_raises_is_recorded_and_the_next_runs(tmp_path, monkeypatch) -> None:
    def fake(args: list[str]) -> dict:
        if args[0] == "sinks":
            time.sleep(30)  # stopped by the 1 s alarm
        if args[0] == "depth-curse":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"rc": 0, "error": None, "compute_s": 0.1}

    monkeypatch.setattr(gpu_check, "run_cli", fake)
    rows = tmp_path / "steps.jsonl"
    gpu_check.run_steps(rows, "m", "cpu", "float32", tmp_path / "w", True, 1, ["sinks", "depth", "dla"], None)
    gpu_check.run_steps(rows, "m", "cpu", "float32", tmp_path / "w", True, 1, ["remove-ln"], time.time() - 1)
    got = {r["step"]: r for r in map(json.loads, rows.read_text().splitlines())}
    assert got["sinks"]["rc"] == 124 and "budget of 1 s" in got["sinks"]["error"] and got["sinks"]["wall_s"] < 20
    assert got["depth"]["rc"] == 1 and "illegal memory access" in got["depth"]["error"]
    assert got["dla"]["rc"] == 0  # ran after both
    assert got["remove-ln"]["rc"] == 124 and "deadline" in got["remove-ln"]["error"]


def test_a_bad_model_fails_every_step_in_the_json_not_the_script(reference, tmp_path) -> None:
    env = {**reference["env"], "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_DTYPES": "float32", "GPU_CHECK_MODEL": str(tmp_path / "no-such-model")}
    res = _run([], env)
    assert res.returncode == 1  # the JSON is written, and says which steps failed and why
    rep = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = rep["runs"]["float32"]["steps"]
    assert not rep["all_steps_ran"] and set(steps) == set(gpu_check.STEPS)
    assert steps["forward"]["rc"] == 1 and "no-such-model" in steps["forward"]["error"]
    for step in ("sinks", "depth", "dla", "remove-ln"):  # each command's own one-line error, exit code 2
        assert steps[step]["rc"] == 2 and steps[step]["error"].startswith("error:"), steps[step]


def test_agreement_measures() -> None:
    a = gpu_check.agreement
    assert a([1.0, 2.0, None], [1.0, 4.0, None])["agreement"] == pytest.approx(0.5)  # 2 off on a scale of 4
    assert a([1.0], [1.0, 2.0])["agreement"] is None
    assert a(3.0, 2.0)["agreement"] == pytest.approx(0.5) and a("L1H2", "L1H2")["agreement"] == 0.0
    assert a([507], [507])["agreement"] == 0.0 and a([], [3])["agreement"] is None
