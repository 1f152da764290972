"""``normscope report MODEL`` and ``normscope compare A B``: several analyses with one model load."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from normscope.cli import app
from normscope.cli.common import (
    AllowPickleOpt,
    BatchSizeOpt,
    BosOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    MaxTokensOpt,
    ModelArg,
    OutOpt,
    Progressor,
    QuietOpt,
    RevisionOpt,
    SeedOpt,
    TextOpt,
    TrustOpt,
    default_out,
    guarded,
    out_console,
    prepare,
)
from normscope.models import DEFAULT_MODEL

OnlyOpt = Annotated[str | None, typer.Option("--only", help="Comma-separated subset: sinks,depth,grads,hubness,dla.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence, shared by every analysis.")]
DepthLayersOpt = Annotated[str | None, typer.Option(
    "--depth-layers", help="Blocks depth skips one at a time (one forward pass each), e.g. 0-9,20-29; 'none' for no "
    "skip passes. Default: every block.")]


@app.command(
    epilog="Examples:\n\n"
    "  normscope report                              # every analysis on the bundled SmolLM2-135M\n\n"
    "  normscope report minilm-l6 --only sinks,depth,grads\n\n"
    "  normscope report gpt2 --text book.txt --max-tokens 4096\n\n"
    "  normscope report --depth-layers 0,10,20,29    # 4 skip passes instead of 30",
)
@guarded
def report(
    model: ModelArg = DEFAULT_MODEL,
    only: OnlyOpt = None,
    depth_layers: DepthLayersOpt = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: SeqLenOpt = 64,
    max_tokens: MaxTokensOpt = 2048,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    allow_pickle: AllowPickleOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run every analysis (or --only some) with ONE model load and one text sample; write index.html."""
    from normscope import suite

    names = suite.parse_only(only)
    options = suite.depth_overrides(depth_layers)
    progress = Progressor(quiet)
    t0 = time.perf_counter()
    lm, sample = prepare(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         text=text, dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                         seed=seed, bos=bos, progress=progress, allow_pickle=allow_pickle)
    load_s = time.perf_counter() - t0
    runs = suite.run_analyses(lm, sample, names, progress=progress, options=options)
    index = suite.write_suite(lm, sample, runs, default_out(lm.info.slug, out), load_seconds=load_s)
    for r in runs:
        if r.error:
            out_console.print(f"[yellow]{r.name}: not run: {r.error}[/]", highlight=False)
        elif not quiet:
            out_console.print(f"{r.name}: {r.seconds:.1f} s", highlight=False)
    out_console.print(f"[bold green]index:[/] {index}", highlight=False)


@app.command(
    epilog="Examples:\n\n"
    "  normscope compare smollm2-135m runs/remove-ln/smollm2-135m/export   # original vs LN-free\n\n"
    "  normscope compare smollm2-135m minilm-l6 --only sinks,depth        # pre-LN vs post-LN",
)
@guarded
def compare(
    model_a: Annotated[str, typer.Argument(help="First model (A).")],
    model_b: Annotated[str, typer.Argument(help="Second model (B).")],
    only: OnlyOpt = "sinks,depth",
    depth_layers: DepthLayersOpt = None,
    text: TextOpt = None,
    seq_len: SeqLenOpt = 64,
    max_tokens: MaxTokensOpt = 2048,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    allow_pickle: AllowPickleOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Both models' per-layer curves on one page (depth 0..1 when layer counts differ) and the deltas B - A."""
    from normscope import suite
    from normscope.report import write_report

    names = suite.parse_only(only)
    options = suite.depth_overrides(depth_layers)
    progress = Progressor(quiet)
    loaded = []
    for spec in (model_a, model_b):
        lm, sample = prepare(spec, revision=None, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                             text=text, dataset=None, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                             seed=seed, bos=bos, progress=progress, allow_pickle=allow_pickle)
        loaded.append((lm, sample, suite.run_analyses(lm, sample, names, progress=progress, options=options)))
        del lm  # the next model loads while only this one's results are kept
    (lm_a, s_a, r_a), (lm_b, s_b, r_b) = loaded
    result = suite.compare(lm_a, s_a, r_a, lm_b, s_b, r_b)
    folder = default_out(f"{lm_a.info.slug}-vs-{lm_b.info.slug}", out)
    paths = write_report(result, folder)
    if not quiet:
        for line in result.summary:
            out_console.print(line, highlight=False)
    out_console.print(f"[bold green]report:[/] {paths.html}", highlight=False)
