"""--device-map: a model spread over the CPU and the disk by accelerate gives the numbers of the same model on one
device, for every registered analysis; the device-map options are checked in one line before anything loads.

On this CPU-only machine the placement is CPU plus disk offload: every offloaded block's weights sit on the meta
device between calls and are loaded from the offload folder by accelerate's hook for each forward, so the hooks,
reducers and weight reads run exactly where a GPU model offloaded to the CPU would run them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from normscope.analyses import REGISTRY
from normscope.cli import app
from normscope.core.errors import NormscopeError
from normscope.core.options import ModelOptions, parse_max_memory, validate
from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer

runner = CliRunner()
SMALL = ["--seq-len", "16", "--max-tokens", "128", "--batch-size", "4"]
# dla: the bridge wraps a deep copy of the model, which a spread model cannot give, so a spread model runs
# normscope's own hooks; the single-device run is asked for the same backend
FAST = {"hubness": ["--k", "3"], "dla": ["--neurons", "2", "--backend", "direct"]}
# 3 tiny Llama blocks of ~150 KB each: 400 KB keeps the embeddings, the head and block 0 in memory and sends
# blocks 1-2 and the final norm to the disk
OFFLOAD_MEMORY = "cpu=400KB"
VOLATILE = {"timings", "device", "placement", "versions", "created", "seconds", "load_seconds"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny(tiny_llama(n_layers=3), tiny_tokenizer(), tmp_path_factory.mktemp("placement") / "llama")


def _numbers_agree(a: Any, b: Any, path: str = "", rel: float = 1e-6, abs_: float = 1e-9) -> list[str]:
    """Where two JSON trees differ: numbers beyond rel/abs tolerance, anything else unequal (run-specific keys
    such as timings and the device left out)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) - VOLATILE != set(b) - VOLATILE else []
        for k in a:
            if k not in VOLATILE and k in b:
                out += _numbers_agree(a[k], b[k], f"{path}.{k}", rel, abs_)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _numbers_agree(x, y, f"{path}[{i}]",
                                                                                              rel, abs_)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=abs_) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_the_offloaded_model_really_is_on_cpu_and_disk(llama: Path, tmp_path: Path) -> None:
    from normscope.core.models import load_model
    from normscope.core.placement import input_device, is_offloaded, resident

    lm = load_model(str(llama), device_map="auto", max_memory=OFFLOAD_MEMORY, offload_folder=tmp_path / "off")
    assert lm.info.placement is not None and set(lm.info.placement) == {"cpu", "disk"}, lm.info.placement
    assert is_offloaded(lm.model) and str(input_device(lm.model)) == "cpu"
    last = lm.model.model.layers[-1].self_attn.o_proj
    assert last.weight.device.type == "meta"  # offloaded between calls
    plain = load_model(str(llama), device="cpu")
    w = resident(last)  # read back from the offload folder
    assert w is not None and torch.equal(w, plain.model.model.layers[-1].self_attn.o_proj.weight)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_analysis_gives_the_same_numbers_offloaded(name: str, llama: Path, tmp_path: Path) -> None:
    spec = REGISTRY[name]
    base = [spec.command, str(llama), *SMALL, *FAST.get(name, []), "-q"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    placed = ["--device-map", "auto", "--max-memory", OFFLOAD_MEMORY, "--offload-folder", str(tmp_path / "off")]
    res = runner.invoke(app, [*base, *placed, "--out", str(tmp_path / "spread")])
    if name == "grads":  # a gradient per weight cannot live on the disk: refused in one line, nothing written
        assert res.exit_code == 2 and "offloads some to the CPU or disk" in res.output, res.output
        assert "Traceback" not in res.output and not (tmp_path / "spread" / "grads.json").exists()
        return
    assert res.exit_code == 0, res.output
    one = json.loads((tmp_path / "one" / f"{name}.json").read_text())
    spread = json.loads((tmp_path / "spread" / f"{name}.json").read_text())
    diffs = _numbers_agree(one, spread)
    assert not diffs, diffs[:10]
    assert spread["meta"]["model"]["placement"] == {"cpu": 3, "disk": 4}


def test_max_memory_grammar() -> None:
    assert parse_max_memory("0=20GiB, cuda:1=1.5GB,cpu=200MB,disk=1TB") == {
        0: 20 * 2**30, 1: 1_500_000_000, "cpu": 200_000_000, "disk": 10**12}
    for bad, words in (("cpu", "not DEVICE=SIZE"), ("gpu=3GB", "not DEVICE=SIZE"), ("cpu=2XB", "not DEVICE=SIZE"),
                       ("cpu=1GB,cpu=2GB", "twice"), ("0=0GB", "no memory")):
        with pytest.raises(NormscopeError, match=words):
            parse_max_memory(bad)


@pytest.mark.parametrize("opts, words", [
    (ModelOptions(max_memory="cpu=1GB"), "--max-memory places the model with accelerate, so it needs --device-map"),
    (ModelOptions(offload_folder=Path("/tmp/x")), "--offload-folder places the model"),
    (ModelOptions(device_map="auto", device="cpu"), "drop --device cpu"),
    (ModelOptions(device_map="auto", max_memory="cpu:lots"), "not DEVICE=SIZE"),
])
def test_device_map_options_are_checked_together(opts: ModelOptions, words: str) -> None:
    with pytest.raises(NormscopeError, match=words):
        validate(opts)


@pytest.mark.parametrize("command", ["sinks", "report", "sites", "remove-ln"])
def test_bad_device_map_input_is_one_line_before_loading(command: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")  # had anything loaded, the error would name the model
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cases = [(["--device-map", "everywhere"], "--device-map must be one of"),
             (["--device-map", "auto", "--max-memory", "cpu=lots"], "not DEVICE=SIZE"),
             (["--max-memory", "cpu=1GB"], "needs --device-map"),
             (["--device-map", "auto", "--offload-folder", str(a_file)], "is a file")]
    if not torch.cuda.is_available() and command != "remove-ln":  # remove-ln refuses any --device-map first
        cases.append((["--device-map", "auto", "--max-memory", "0=20GiB,cpu=60GiB"], "names GPU 0 but this machine"))
    if command == "remove-ln":
        cases.append((["--device-map", "auto"], "drop --device-map"))
    for args, words in cases:
        res = runner.invoke(app, [command, missing, *args])
        assert res.exit_code == 2, (command, args, res.output)
        assert words in res.output and "Traceback" not in res.output, (command, args, res.output)
        assert res.output.strip().count("\n") == 0, res.output


def test_a_safetensors_checkpoint_offloads_to_disk_without_a_folder(llama: Path, tmp_path: Path) -> None:
    """transformers reads offloaded safetensors weights from the checkpoint itself, so no --offload-folder is
    needed there (it is for weights that must be written out, see the next test)."""
    res = runner.invoke(app, ["sinks", str(llama), *SMALL, "--device-map", "auto", "--max-memory", OFFLOAD_MEMORY,
                              "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "sinks.json").read_text())["meta"]["model"]["placement"] == {"cpu": 3,
                                                                                                     "disk": 4}


def test_a_model_in_memory_is_placed_like_a_checkpoint(tmp_path: Path) -> None:
    """A model that does not come from a checkpoint folder (dequantized GGUF, built from a config) is spread with
    accelerate's infer_auto_device_map + dispatch_model: its disk part needs a folder, and its outputs are the
    undistributed model's."""
    from normscope.core.models import LoadedModel, ModelInfo
    from normscope.core.placement import is_offloaded, place

    ids = torch.tensor([[5, 17, 23, 42, 61, 7, 11, 13]])
    ref = tiny_llama(n_layers=3)(input_ids=ids).logits  # [1, 8, vocab]
    info = ModelInfo("tiny", "tiny", "tiny", "folder", "llama", 3, 64, 4, True, 64, "float32", "cpu")
    lm = LoadedModel(tiny_llama(n_layers=3), tiny_tokenizer(), info)
    with pytest.raises(NormscopeError, match="give --offload-folder DIR"):
        place(lm, "auto", OFFLOAD_MEMORY)
    lm = LoadedModel(tiny_llama(n_layers=3), tiny_tokenizer(), info)
    place(lm, "auto", OFFLOAD_MEMORY, str(tmp_path / "off"))
    assert is_offloaded(lm.model) and lm.info.placement is not None and "disk" in lm.info.placement
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
