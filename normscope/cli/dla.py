"""``normscope dla MODEL``: direct logit attribution with the cached final-norm scale against the direct effect."""

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
from normscope.models import DEFAULT_MODEL


@app.command(
    epilog="Examples:\n\n"
    "  normscope dla                                   # bundled SmolLM2-135M, TransformerLens bridge\n\n"
    "  normscope dla gpt2 --text book.txt --neurons 10\n\n"
    "  normscope dla runs/lnfree/export                # an LN-free export: NMAE should be about 0\n\n"
    "  normscope dla smollm2-135m --backend direct     # normscope's own hooks only\n\n"
    "Memory: with the bridge, a deep copy of the model plus the per-head outputs of one micro-batch of 512 tokens "
    "(heads x 512 x d_model floats: about 0.3 GB for SmolLM2-135M); the direct path holds one batch's attention "
    "inputs and MLP outputs. Statistics are reduced per batch, so memory does not grow with --max-tokens.",
)
@guarded
def dla(
    model: ModelArg = DEFAULT_MODEL,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 128,
    max_tokens: MaxTokensOpt = 2048,
    batch_size: BatchSizeOpt = 4,
    seed: SeedOpt = 0,
    bos: BosOpt = "auto",
    neurons: Annotated[int, typer.Option("--neurons", min=0, help="Entropy-neuron candidates of the last MLP to "
                                         "mean-ablate (0: skip).")] = 5,
    backend: Annotated[str, typer.Option("--backend", help="auto (TransformerLens bridge where it supports the "
                                         "model), bridge, or direct (normscope's own hooks).")] = "auto",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """DLA of every head and MLP layer with the cached final-norm scale against the true direct effect (NMAE),
    and the confidence (entropy) neurons of the last MLP."""
    from normscope import dla as analysis

    progress = Progressor(quiet or as_json)
    lm, sample = prepare(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         text=text, dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                         seed=seed, bos=bos, progress=progress)
    result = analysis.run(lm, sample, analysis.DlaOptions(neurons=neurons, backend=backend, seed=seed),
                          progress=progress)
    finish(result, lm.info.slug, out, quiet=quiet, as_json=as_json, table=headlines_table(result, "dla"))
