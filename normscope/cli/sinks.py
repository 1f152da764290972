"""``normscope sinks MODEL``: attention sinks, massive activations and outlier-driven rescaling."""

from __future__ import annotations

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
    headlines_table,
    prepare,
)
from normscope.models import DEFAULT_MODEL


@app.command(
    epilog="Examples:\n\n"
    "  normscope sinks                               # bundled SmolLM2-135M, built-in prompts, T = 64\n\n"
    "  normscope sinks gpt2 --text book.txt --seq-len 128\n\n"
    "  normscope sinks smollm2-135m --ablate         # + causal checks (3 more forward passes)\n\n"
    "  normscope sinks minilm-l6                     # encoder: alpha over all queries",
)
@guarded
def sinks(
    model: ModelArg = DEFAULT_MODEL,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence T (Gu et al. use 64).")] = 64,
    max_tokens: MaxTokensOpt = 8192,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    eps: Annotated[float, typer.Option("--eps", help="Sink threshold on alpha_1 (Gu et al.: 0.3).")] = 0.3,
    ablate: Annotated[bool, typer.Option("--ablate", help="Causal checks: zero / mean the massive dims and cut "
                                         "attention to position 0 (three more forward passes).")] = False,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    allow_pickle: AllowPickleOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Attention sinks (alpha_1, Sink_1^0.3), massive activations and how outliers rescale each norm."""
    from normscope import sinks as analysis

    progress = Progressor(quiet or as_json)
    lm, sample = prepare(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         text=text, dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                         seed=seed, bos=bos, progress=progress, allow_pickle=allow_pickle)
    result = analysis.run(lm, sample, analysis.SinksOptions(eps=eps, ablate=ablate), progress=progress)
    finish(result, lm.info.slug, out, quiet=quiet, as_json=as_json, table=headlines_table(result, "sinks"))
