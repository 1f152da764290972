"""``normscope depth-curse MODEL``: variance growth, layer effectiveness and a LayerNorm Scaling what-if."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from normscope.cli import app
from normscope.cli.common import (
    AllowPickleOpt,
    BatchSizeOpt,
    BosOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxTokensOpt,
    ModelArg,
    OutOpt,
    Progressor,
    QuietOpt,
    RevisionOpt,
    SeedOpt,
    TextOpt,
    TrustOpt,
    finish,
    guarded,
    prepare,
)
from normscope.errors import NormscopeError
from normscope.models import DEFAULT_MODEL


@app.command(
    "depth-curse",
    epilog="Cost: the statistics take one forward pass per batch; skip-one-block takes one more forward pass per "
    "skipped block per batch (30 blocks: 30 passes), the LayerNorm Scaling what-if one more, the dropped window "
    "one more.\n\n"
    "Examples:\n\n"
    "  normscope depth-curse                                   # bundled SmolLM2-135M, built-in prompts\n\n"
    "  normscope depth-curse meta-llama/Llama-3.2-1B --text book.txt\n\n"
    "  normscope depth-curse smollm2-135m --layers 0-9,20-29   # skip only these blocks\n\n"
    "  normscope depth-curse smollm2-135m --no-skip --window 8 # no per-block skipping; drop 8 blocks\n\n"
    "  normscope depth-curse minilm-l6                         # encoder: norms, updates, angles (no loss)",
)
@guarded
def depth_curse(
    model: ModelArg = DEFAULT_MODEL,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    max_tokens: MaxTokensOpt = 2048,
    batch_size: BatchSizeOpt = 4,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    skip: Annotated[bool | None, typer.Option(
        "--skip/--no-skip",
        help="Skip each block in turn (identity) and measure the loss: one extra forward pass per block per batch. "
        "Default: on for causal LMs; encoders have no next-token loss.")] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Blocks to skip one at a time, e.g. 0-9,20-29 (default: all).")] = None,
    window: Annotated[int | None, typer.Option(
        "--window", min=0, help="Drop the cheapest window of N consecutive blocks (Gromov et al.) and measure the "
        "loss: one more pass. Default: a quarter of the blocks; 0 = off.")] = None,
    lns: Annotated[bool | None, typer.Option(
        "--lns/--no-lns", help="LayerNorm Scaling what-if: pre-norm outputs times 1/sqrt(layer+1) at inference, "
        "no retraining (one more pass). Default: on when the model has pre-norm sites.")] = None,
    include_controls: Annotated[bool, typer.Option(
        "--include-controls", help="Keep the random / repeated-token control sequences of the built-in text.")] = False,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    allow_pickle: AllowPickleOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Curse of depth: residual norm and variance growth, relative updates, angular distances, skip-one-block loss."""
    from normscope import depth as analysis

    if layers is not None:
        analysis.parse_layers(layers, 1 << 30)  # syntax first, before loading anything
        if skip is False:
            raise NormscopeError("--layers chooses the blocks to skip, so it cannot go with --no-skip; drop one.")
    progress = Progressor(quiet or as_json)
    lm, sample = prepare(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         text=text, dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                         seed=seed, bos=bos, progress=progress, allow_pickle=allow_pickle)
    opts = analysis.DepthOptions(skip=skip, layers=layers, window=window, lns=lns, include_controls=include_controls)
    result = analysis.run(lm, sample, opts, progress=progress)
    finish(result, lm.info.slug, out, quiet=quiet, as_json=as_json, table=_table(result))


def _table(result: object) -> Table:
    r = result  # a normscope.report.Result
    t = Table(title=f"depth-curse: {r.payload['model']}", show_header=True)  # type: ignore[attr-defined]
    for col in ("block", "rel. update", "attn", "MLP", "norm after", "skip dloss"):
        t.add_column(col, justify="right")
    layers = {row["point"]: row for row in r.payload["layers"]}  # type: ignore[attr-defined]
    for row in r.payload["blocks"]:  # type: ignore[attr-defined]
        d = row.get("skip_delta_loss")
        t.add_row(str(row["block"]), f"{100 * row['rel_update']:.1f}%", f"{100 * row['rel_update_attn']:.1f}%",
                  f"{100 * row['rel_update_mlp']:.1f}%", f"{layers[row['block'] + 1]['norm_rest']:.1f}",
                  "" if d is None or d != d else f"{d:+.3f}")
    return t
