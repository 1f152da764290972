"""``normscope hubness MODEL``: hubs among token representations, before and after each norm, and against W_U."""

from __future__ import annotations

from typing import Annotated

import typer

from normscope.cli import app
from normscope.cli.common import (
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
from normscope.errors import NormscopeError
from normscope.models import DEFAULT_MODEL


@app.command(
    epilog="Examples:\n\n"
    "  normscope hubness                               # bundled SmolLM2-135M, every 3rd block + the last\n\n"
    "  normscope hubness --layers 0,12,29 --k 5        # three blocks, 5-NN lists\n\n"
    "  normscope hubness --text book.txt --max-tokens 20000 --metric cosine\n\n"
    "  normscope hubness minilm-l6                     # an encoder: no context-unembedding part\n\n"
    "Memory: one float32 matrix of tokens x d_model per point analysed in a pass (20,000 x 576 = 46 MB); "
    "--memory-mb caps what one pass holds, more points mean more passes. The k-NN search is exact and blocked "
    "(--block-size query rows at a time), never an N x N matrix.",
)
@guarded
def hubness(
    model: ModelArg = DEFAULT_MODEL,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    max_tokens: MaxTokensOpt = 4096,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    k: Annotated[int, typer.Option("--k", help="Neighbourhood size of the k-NN lists (scikit-hubness: 10).")] = 10,
    metric: Annotated[str, typer.Option("--metric", help="euclidean, cosine or both.")] = "both",
    layers: Annotated[str | None, typer.Option("--layers", help="Blocks to analyse, e.g. 0,3,10-12 or all. "
                                               "Default: every third block plus the last.")] = None,
    no_sites: Annotated[bool, typer.Option("--no-sites", help="Only the block outputs, not each norm's input "
                                           "and output.")] = False,
    top_hubs: Annotated[int, typer.Option("--top-hubs", min=1, help="Hubs named per point and metric.")] = 10,
    memory_mb: Annotated[float, typer.Option("--memory-mb", help="Most memory the captured matrices of one "
                                             "forward pass may take (MB).")] = 1024.0,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Query rows per block of the k-NN "
                                            "search.")] = 1024,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Hubness (k-occurrence skewness, Robin Hood, antihubs, hub occurrence, Gini) of the residual stream and of
    every norm's input and output, the tokens that are hubs, and the hubs of contexts against the unembedding."""
    from normscope import hubness as analysis

    metrics = ("euclidean", "cosine") if metric == "both" else (metric,)
    if any(m not in analysis.METRICS for m in metrics):
        raise NormscopeError(f"--metric must be euclidean, cosine or both, not '{metric}'.")
    progress = Progressor(quiet or as_json)
    lm, sample = prepare(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         text=text, dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                         seed=seed, bos=bos, progress=progress)
    opts = analysis.HubnessOptions(k=k, metrics=metrics, layers=analysis.parse_layers(layers, lm.info.n_layers),
                                   sites=not no_sites, top_hubs=top_hubs, memory_mb=memory_mb, block_size=block_size)
    result = analysis.run(lm, sample, opts, progress=progress)
    table = headlines_table(result, "hubness", timings=True)
    finish(result, lm.info.slug, out, quiet=quiet, as_json=as_json, table=table)
