"""``normscope grads MODEL``: gradient norms per block and parameter group, and on the residual stream."""

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
    epilog="Cost: one forward and one backward pass per batch (two views per sequence for --loss masked-view); "
    "memory holds one batch's graph plus one gradient per parameter, whatever the number of tokens.\n\n"
    "Examples:\n\n"
    "  normscope grads                                   # bundled SmolLM2-135M, next-token loss\n\n"
    "  normscope grads smollm2-135m --compare minilm-l6  # Pre-LN vs Post-LN on one page, depth 0..1\n\n"
    "  normscope grads minilm-l6                         # encoder without a head: masked-view cosine loss\n\n"
    "  normscope grads gpt2 --text book.txt --max-tokens 8192",
)
@guarded
def grads(
    model: ModelArg = DEFAULT_MODEL,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    max_tokens: MaxTokensOpt = 2048,
    batch_size: BatchSizeOpt = 4,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    loss: Annotated[str, typer.Option(
        "--loss", help="auto: next-token for causal LMs, mlm for encoders with an MLM head, masked-view otherwise "
        "(1 - cos of the mean-pooled output of a sequence and of a copy with tokens masked). next-token is "
        "causal-only.")] = "auto",
    mask_rate: Annotated[float, typer.Option(
        "--mask-rate", help="Share of tokens masked for mlm / masked-view.")] = 0.15,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="A second model measured on the same text and drawn on the same page (depth 0..1).")] = None,
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
    """Gradient flow: L2 gradient norms per block and parameter group, and ||dL/dh|| on the residual stream."""
    from normscope import grads as analysis

    if loss not in analysis.LOSSES:
        raise NormscopeError(f"--loss must be one of {', '.join(analysis.LOSSES)}, not '{loss}'.")
    progress = Progressor(quiet or as_json)
    common = dict(revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code, text=text,
                  dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, seed=seed, bos=bos,
                  progress=progress, allow_pickle=allow_pickle)
    lm, sample = prepare(model, **common)  # type: ignore[arg-type]
    opts = analysis.GradsOptions(loss=loss, mask_rate=mask_rate, seed=seed, include_controls=include_controls)
    other = None
    if compare is not None:
        other = prepare(compare, **common)  # type: ignore[arg-type]
        # each model takes the loss that suits it when the two differ in kind
        if loss != "auto" and other[0].info.is_causal != lm.info.is_causal:
            raise NormscopeError("--loss other than auto cannot serve both a causal LM and an encoder; use --loss auto "
                                 "with --compare.")
    result = analysis.run(lm, sample, opts, progress=progress, compare=other)
    slug = lm.info.slug if other is None else f"{lm.info.slug}-vs-{other[0].info.slug}"
    finish(result, slug, out, quiet=quiet, as_json=as_json, table=_table(result))


def _table(result: object) -> Table:
    r = result  # a normscope.report.Result
    profiles = r.payload["profiles"]  # type: ignore[attr-defined]
    t = Table(title=f"grads: {' vs '.join(p['model'] for p in profiles)}", show_header=True)
    t.add_column("block", justify="right")
    for p in profiles:
        tag = "" if len(profiles) == 1 else f" {p['model']}"
        t.add_column(f"||grad||{tag}", justify="right")
        if len(profiles) == 1:
            for g in ("attention", "mlp", "norm"):
                t.add_column(g, justify="right")
        t.add_column(f"||dL/dh||{tag}", justify="right")
    n = max(p["n_blocks"] for p in profiles)
    for i in range(n):
        cells = [str(i)]
        for p in profiles:
            b = p["blocks"][i] if i < p["n_blocks"] else None
            res = p["residual"][i + 1] if i < p["n_blocks"] else None
            cells.append("" if b is None else f"{b['total']:.3g}")
            if len(profiles) == 1 and b is not None:
                cells += [f"{b[g]:.3g}" if b[g] == b[g] else "" for g in ("attention", "mlp", "norm")]
            cells.append("" if res is None else f"{res['grad_rest']:.3g}")
        t.add_row(*cells)
    return t
