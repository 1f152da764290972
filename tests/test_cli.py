"""The command line as a user meets it: `sites` on every architecture, `sinks` end to end, and bad input
answered with one line and exit code 2 (no traceback, nothing half-written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normscope.cli import app
from tests.tiny import (
    one_line_error,
    tiny_bert,
    tiny_gemma2,
    tiny_gpt2,
    tiny_gptneox,
    tiny_llama,
    tiny_opt,
    tiny_qwen3,
    tiny_tokenizer,
)
from tests.tiny import save_tiny as _save_tiny

runner = CliRunner()

ARCHS = {
    "gpt2": (tiny_gpt2, {"blocks.0.ln1", "blocks.0.ln2", "ln_final"}),
    "llama": (tiny_llama, {"blocks.0.ln1", "blocks.1.ln2", "ln_final"}),
    "bert": (tiny_bert, {"embed.ln", "blocks.0.ln1_post", "blocks.1.ln2_post"}),
    "qwen3": (tiny_qwen3, {"blocks.0.attn.q_norm", "blocks.0.attn.k_norm", "ln_final"}),
    "gemma2": (tiny_gemma2, {"blocks.0.ln1", "blocks.0.ln1_post", "blocks.0.ln2", "blocks.0.ln2_post"}),
    "opt": (tiny_opt, {"blocks.0.ln1", "blocks.0.ln2", "ln_final"}),
    "gptneox": (tiny_gptneox, {"blocks.0.ln1", "blocks.0.ln2", "ln_final"}),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: _save_tiny(fn(), tiny_tokenizer(), root / name) for name, (fn, _) in ARCHS.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_on_every_architecture(tiny_dirs, arch) -> None:
    res = runner.invoke(app, ["sites", str(tiny_dirs[arch]), "--json"])
    assert res.exit_code == 0, res.output
    names = {s["name"] for s in json.loads(res.stdout)["sites"]}
    assert ARCHS[arch][1] <= names


def test_sites_table(tiny_dirs) -> None:
    res = runner.invoke(app, ["sites", str(tiny_dirs["gemma2"])], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "blocks.1.ln2_post" in res.stdout and "normalization sites" in res.stdout


def test_sinks_end_to_end_writes_html_json_csv(tiny_dirs, tmp_path) -> None:
    out = tmp_path / "rep"
    res = runner.invoke(app, ["sinks", str(tiny_dirs["llama"]), "--seq-len", "16", "--max-tokens", "256",
                              "--out", str(out), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sinks.json").read_text())
    for key in ("model", "seq_len", "n_tokens", "bos_prepended", "sink_rate", "layers", "heads",
                "massive_activations", "schema_version"):
        assert key in data
    assert data["seq_len"] == 16 and data["n_tokens"] > 0
    assert {"layer", "sink_rate", "top1_abs", "median_abs", "massive_dims"} <= set(data["layers"][0])
    assert {"layer", "head", "alpha1"} <= set(data["heads"][0])
    assert (out / "sinks.html").stat().st_size > 100_000  # plotly.js inlined
    assert (out / "sinks_heads.csv").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_sinks_json_to_stdout(tiny_dirs, tmp_path) -> None:
    res = runner.invoke(app, ["sinks", str(tiny_dirs["gpt2"]), "--seq-len", "16", "--max-tokens", "128",
                              "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["analysis"] == "sinks"


def test_sinks_report_renders_in_chromium(tiny_dirs, tmp_path) -> None:
    from tests.browser import require_chromium, screenshot

    require_chromium()
    res = runner.invoke(app, ["sinks", str(tiny_dirs["llama"]), "--seq-len", "16", "--max-tokens", "256",
                              "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    problems = screenshot(tmp_path / "sinks.html", tmp_path / "sinks.png")
    assert problems == []


# ---- bad input: one line, exit code 2 ------------------------------------------------------------------
def test_unknown_model_path(tmp_path) -> None:
    msg = one_line_error(runner.invoke(app, ["sinks", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]))
    assert "No model" in msg
    assert not (tmp_path / "o").exists()


def test_invalid_model_id() -> None:
    assert "not a valid model" in one_line_error(runner.invoke(app, ["sites", "bad id!"]))


def test_hub_id_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_error(runner.invoke(app, ["sites", "someone/not-cached-model-xyz"]))
    assert "hub" in msg and "smollm2-135m" in msg


def test_cuda_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "CUDA" in one_line_error(runner.invoke(app, ["sinks", "--device", "cuda", "--out", "/nonexistent-dir/x"]))


def test_corrupted_gguf(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    assert "GGUF" in one_line_error(runner.invoke(app, ["sites", str(bad)]))
    half = tmp_path / "half.gguf"
    half.write_bytes(b"GGUF" + bytes(range(256)) * 4)  # right magic, garbage after it
    assert "GGUF" in one_line_error(runner.invoke(app, ["sites", str(half)]))


def test_folder_without_config(tmp_path) -> None:
    assert "config.json" in one_line_error(runner.invoke(app, ["sites", str(tmp_path)]))


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text(""), "empty"),
        (lambda p: p.write_bytes(b"\x00\x01\x02binary\x00" * 50), "binary"),
        (lambda p: p.write_text("too short"), "at least"),
    ],
    ids=["missing", "empty", "binary", "short"],
)
def test_bad_text_files(tiny_dirs, tmp_path, setup, needle) -> None:
    f = tmp_path / "in.txt"
    setup(f)
    out = tmp_path / "o"
    res = runner.invoke(app, ["sinks", str(tiny_dirs["gpt2"]), "--text", str(f), "--seq-len", "32",
                              "--out", str(out)])
    assert needle in one_line_error(res).lower()
    assert not out.exists() or not any(out.iterdir())


def test_seq_len_beyond_positions(tiny_dirs) -> None:
    res = runner.invoke(app, ["sinks", str(tiny_dirs["gpt2"]), "--seq-len", "100000"])
    assert "seq" in one_line_error(res).lower()


def test_bad_bos_value(tiny_dirs) -> None:
    assert "--bos" in one_line_error(runner.invoke(app, ["sinks", str(tiny_dirs["gpt2"]), "--bos", "maybe"]))


def test_failed_run_keeps_previous_report(tiny_dirs, tmp_path) -> None:
    out = tmp_path / "rep"
    ok = runner.invoke(app, ["sinks", str(tiny_dirs["llama"]), "--seq-len", "16", "--max-tokens", "128",
                             "--out", str(out), "--quiet"])
    assert ok.exit_code == 0
    before = (out / "sinks.json").read_bytes()
    bad = runner.invoke(app, ["sinks", str(tiny_dirs["llama"]), "--text", str(tmp_path / "missing.txt"),
                              "--out", str(out)])
    assert bad.exit_code == 2
    assert (out / "sinks.json").read_bytes() == before


def test_version_and_help() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "normscope" in res.stdout
    res = runner.invoke(app, ["sinks", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "Examples" in res.stdout and "--seq-len" in res.stdout


# ---- the bundled models --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sinks_on_minilm(minilm, tmp_path) -> None:
    res = runner.invoke(app, ["sinks", "minilm-l6", "--max-tokens", "512", "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "sinks.json").read_text())
    assert len(data["layers"]) == 6 and len(data["heads"]) == 6 * 12
    assert 0.0 <= data["sink_rate"] <= 100.0


@pytest.mark.slow
def test_sites_on_bundled_models() -> None:
    res = runner.invoke(app, ["sites", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["sites"]) == 61
    res = runner.invoke(app, ["sites", "minilm-l6", "--json"])
    assert len(json.loads(res.stdout)["sites"]) == 13


def test_pickle_only_checkpoint_needs_allow_pickle(tmp_path) -> None:
    """A folder with only pytorch_model.bin is refused (pickles run code) unless --allow-pickle is given."""
    model = tiny_gpt2()
    folder = tmp_path / "pickled"
    import torch

    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    msg = one_line_error(runner.invoke(app, ["sites", str(folder)]))
    assert "--allow-pickle" in msg
    res = runner.invoke(app, ["sites", str(folder), "--allow-pickle", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["sites"]) == 5
