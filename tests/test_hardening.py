"""Hardening: what a careless or hostile user tries (the README's table lists each case and its test).

Cases already covered elsewhere: binary / non-UTF-8 / empty / whitespace-only text, folders with no text,
JSONL with a missing field (test_text.py); pickle-only checkpoints, corrupted GGUF, unknown models, offline hub
ids, --device cuda without CUDA, a failed run keeping the previous report (test_cli.py); byte-identical JSON
for the same seed (test_suite.py); escaping inside the report writer (test_report.py).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from normscope.analyses import depth, dla, grads
from normscope.analyses import hubness as hb
from normscope.cli import app
from normscope.core.errors import NormscopeError
from normscope.core.models import LoadedModel, ModelInfo, check_memory, estimate_batch_bytes, slugify
from normscope.core.text import TextOptions, load_text
from normscope.report import Result, write_report
from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_llama(), tiny_tokenizer(), tmp_path_factory.mktemp("h") / "llama")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("../../etc/passwd", "etc-passwd"),
        ("/abs/path/to/model", "to-model"),
        ("meta-llama/Llama-3.2-1B", "meta-llama-Llama-3.2-1B"),
        ("..", "model"),
        ("a b<script>", "a-b-script"),
        ("weights/SmolLM2.gguf", "weights-SmolLM2"),
    ],
)
def test_report_folder_names_stay_under_reports(spec, expected) -> None:
    slug = slugify(spec)
    assert slug == expected
    assert "/" not in slug and ".." not in slug and not slug.startswith(".")
    assert (Path("reports") / slug).resolve().parent == Path("reports").resolve()


def test_hostile_tokens_are_escaped_in_the_page(llama_dir, tmp_path) -> None:
    """A text full of markup goes through tokenizer, tables and plots without reaching the page raw."""
    hostile = ('</script><script>alert("x")</script> <img src=x onerror=alert(1)> "quotes" & \'single\' ' * 40)
    f = tmp_path / "hostile.txt"
    f.write_text(hostile)
    out = tmp_path / "rep"
    res = runner.invoke(app, ["sinks", str(llama_dir), "--text", str(f), "--seq-len", "16", "--out", str(out),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    page = (out / "sinks.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert page.count("<script") == page.count("</script>")  # only our own script elements
    from tests.browser import chromium_path, screenshot

    if chromium_path():
        assert screenshot(out / "sinks.html", tmp_path / "hostile.png") == []  # no dialog, no error


def test_two_gigabyte_file_is_streamed_not_read(tmp_path) -> None:
    """A 2 GB text file: reading stops once --max-tokens is reached (the file is sparse: no disk is used)."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.write(("The quick brown fox jumps over the lazy dog. " * 40_000).encode())
        fh.truncate(2 * 1024**3)
    assert big.stat().st_size == 2 * 1024**3
    sample = load_text(tiny_tokenizer(), TextOptions(paths=[big], seq_len=32, max_tokens=4096))
    assert sample.n_tokens == 4096 and sample.truncated
    assert sample.bytes_read < 8 * 1024**2


def test_memory_estimate_refuses_what_cannot_fit(llama_dir) -> None:
    from normscope.core.models import load_model

    lm = load_model(str(llama_dir), device="cpu")
    check_memory(lm, 8, 64)  # a tiny model fits
    info = ModelInfo(spec="big", name="big", slug="big", source="hub", architecture="llama", n_layers=80,
                     d_model=8192, n_heads=64, is_causal=True, max_positions=131072, dtype="float32", device="cpu")
    need = estimate_batch_bytes(info, 128_256, 64, 8192)
    assert need > 1e12  # 64 x 8192 tokens of a 70B-shaped model: terabytes of eager attention
    lm.info = info
    with pytest.raises(NormscopeError, match="--batch-size|--seq-len"):
        check_memory(lm, 64, 8192)


def test_concurrent_writers_never_leave_a_torn_file(tmp_path) -> None:
    """Two runs writing the same report folder at once: every file is always one whole version."""
    import pandas as pd

    def result(tag: int) -> Result:
        df = pd.DataFrame({"layer": range(200), "v": [tag] * 200})
        return Result(analysis="sinks", title="t", meta={"model": {"name": "m"}},
                      payload={"tag": tag, "big": [tag] * 5000}, tables={"layers": df})

    errors: list[BaseException] = []

    def writer(tag: int) -> None:
        try:
            for _ in range(15):
                write_report(result(tag), tmp_path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        p = tmp_path / "sinks.json"
        if p.exists():
            data = json.loads(p.read_text())  # never a half-written file
            assert set(data["big"]) == {data["tag"]}
            seen.add(data["tag"])
    for t in threads:
        t.join()
    assert not errors
    assert seen and seen <= {1, 2}  # the reader really read whole files while both wrote
    final = json.loads((tmp_path / "sinks.json").read_text())
    assert set(final["big"]) == {final["tag"]} and final["tag"] in (1, 2)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or p.startswith("tmp")]


def test_trust_remote_code_is_off_and_explained() -> None:
    res = runner.invoke(app, ["sinks", "--help"], env={"COLUMNS": "200"})
    assert "--trust-remote-code" in res.stdout and "Off by default" in res.stdout


def test_remote_code_model_says_so_in_one_line(tmp_path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my-custom-arch", "architectures": ["MyCustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.MyConfig",
                     "AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"},
    }))
    res = runner.invoke(app, ["sites", str(folder)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--trust-remote-code" in res.output


# ---- fp16/bf16 overflow: named by hook point in every analysis, never silently averaged ---------------------
def _tiny_lm(model: torch.nn.Module) -> LoadedModel:
    cfg = model.config
    info = ModelInfo(spec="tiny", name="tiny", slug="tiny", source="folder", architecture="llama",
                     n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                     is_causal=True, max_positions=64, dtype="float32", device="cpu")
    return LoadedModel(model, tiny_tokenizer(), info)


OVERFLOW_RUNS = {
    "depth": lambda lm, s: depth.run(lm, s, depth.DepthOptions(skip_layers="0", window=1)),
    "hubness": lambda lm, s: hb.run(lm, s, hb.HubnessOptions(k=3)),
    "grads": lambda lm, s: grads.run(lm, s),
    "dla": lambda lm, s: dla.run(lm, s, dla.DlaOptions(backend="direct", neurons=2)),
    "dla-bridge": lambda lm, s: dla.run(lm, s, dla.DlaOptions(backend="bridge", neurons=0)),
}
FIRST_POINT = {"dla-bridge": "blocks.2.attn.hook_z"}  # the bridge caches no residual: the first cached NaN


@pytest.mark.parametrize("analysis", sorted(OVERFLOW_RUNS))
def test_overflow_is_named_by_hook_point_in_every_analysis(analysis: str, tmp_path) -> None:
    """An inf in block 1's output on the first batch only (an fp16 overflow) is reported at
    blocks.1.hook_resid_post, first line of the summary and first headline, and the page still renders; grads
    leaves that batch out instead of averaging NaN into every gradient."""
    model = tiny_llama(n_layers=3)
    sample = load_text(tiny_tokenizer(), TextOptions(seq_len=32, max_tokens=512, batch_size=4), max_positions=64,
                       is_causal=True)
    target = next(iter(sample.iter_batches())).input_ids[0]  # [pos]: the first text row overflows, nothing else
    seen: dict[str, torch.Tensor] = {}

    def note_ids(module, args):
        seen["ids"] = args[0]  # [batch, pos]

    def overflow(module, args, out):
        ids = seen["ids"]
        rows = (ids == target).all(dim=1).nonzero().flatten().tolist() if ids.shape[1] == target.numel() else []
        if not rows:
            return None
        hidden = (out[0] if isinstance(out, tuple) else out).clone()  # [batch, pos, d_model]
        hidden[rows[0], 3, 5] = float("inf")
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    hooks = [model.model.embed_tokens.register_forward_pre_hook(note_ids),
             model.model.layers[1].register_forward_hook(overflow)]
    try:
        result = OVERFLOW_RUNS[analysis](_tiny_lm(model), sample)
    finally:
        for h in hooks:
            h.remove()
    first = FIRST_POINT.get(analysis, "blocks.1.hook_resid_post")
    report = result.payload["nonfinite"]
    assert report[0]["point"] == first
    assert report[0]["first_batch"] == 0 and report[0]["batches"] >= 1
    assert result.summary[0].startswith("Warning: inf/NaN values appeared at ")
    assert f"{first} (batch 0)" in result.summary[0]
    assert next(iter(result.headlines.items())) == ("nonfinite_points", len(report))
    page = write_report(result, tmp_path).html.read_text()
    assert f"{first} (batch 0)" in page
    if analysis == "grads":
        profile = result.payload["profiles"][0]
        assert profile["skipped_batches"] == [0]
        assert all(math.isfinite(r["total"]) for r in profile["blocks"])
        assert "left out of the gradients" in result.summary[0]
    if analysis == "depth":  # the LayerNorm Scaling pass overflows too, and is named apart from the model's pass
        assert result.payload["nonfinite_lns"][0]["point"] == first
        assert any(line.startswith("LayerNorm Scaling what-if: Warning: inf/NaN") for line in result.summary)


def test_nonfinite_report_starts_where_the_overflow_began() -> None:
    """An inf written by block 1's MLP is reported first there, then where it spreads (block 1's output, block
    2's attention norm), in the order the forward pass reached them, not in the order of ``points()``."""
    from normscope.core.capture import Capture
    from normscope.core.sites import find_layout, find_norm_sites
    from normscope.core.text import sample_from_ids

    class Keep:
        def update(self, x: torch.Tensor, ctx: object) -> None:  # x: [batch, pos, d_model]
            pass

    model = tiny_llama(n_layers=3).eval()
    layout = find_layout(model)
    cap = Capture(model, layout, find_norm_sites(model, layout))
    points = ["blocks.2.ln1.hook_in", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_out"]
    for p in points:
        cap.add(p, Keep())

    def overflow(x: torch.Tensor, ctx: object) -> torch.Tensor:
        x = x.clone()
        x[:, 1, 0] = math.inf
        return x

    cap.intervene("blocks.1.mlp.hook_out", overflow)
    with cap:
        cap.run(sample_from_ids([[1, 2, 3, 4]] * 2, ["x"] * 2).iter_batches())
    report = cap.nonfinite_report()
    assert [r["point"] for r in report] == ["blocks.1.mlp.hook_out", "blocks.1.hook_resid_post",
                                            "blocks.2.ln1.hook_in"]
    assert all(set(r) == {"point", "first_batch", "batches"} and r["first_batch"] == 0 for r in report)
