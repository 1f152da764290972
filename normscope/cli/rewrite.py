"""``normscope rewrite MODEL --to rmsnorm``: the exact Pre-LN -> Pre-RMSNorm conversion, checked and exported.

Hand-written rather than generated from the analysis registry, like ``remove-ln``: it transforms and exports a
model instead of measuring one, so it does not belong in ``report`` (which runs every registered analysis on
every model; most, the bundled SmolLM2 first, are not Pre-LN) or in ``compare``. It composes the same Model,
Text and Output groups, refuses bad input in one line with exit code 2 before loading, and writes its page,
JSON and CSVs through the same report machinery.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import typer

from normscope.cli import app
from normscope.cli.common import (
    Progressor,
    check_inputs,
    check_output,
    eprint,
    finish,
    guarded,
    headlines_table,
    output_dir,
    prepare,
)
from normscope.cli.options import MODEL, OUTPUT, TEXT, Group, command
from normscope.core.io import slugify
from normscope.surgery.options import RewriteOptions, precheck

HELP = ("Rewrite a Pre-LN model into an exactly equivalent Pre-RMSNorm (or Pre-CRMSNorm) one (Jiang et al. 2023), "
        "check it on its own logits and residual stream, and export it.")
EPILOG = ("Folds every LayerNorm's gain and bias into the linears that read it (the final one into the unembedding, "
          "which gains a bias), centres every writer of the residual stream (embeddings, attention and MLP output "
          "projections; tied embeddings are untied first), then swaps each LayerNorm for an RMSNorm with the same "
          "eps. Cost: two copies of the model in memory (three with --to crmsnorm) and two (three) forward passes "
          "per batch. Refused: Post-LN models (minilm-l6), models that are already RMSNorm (smollm2-135m).\n\n"
          "Examples:\n\n"
          "  normscope rewrite gpt2                         # check only: page, JSON\n\n"
          "  normscope rewrite gpt2 --export runs/gpt2-rms  # + a checkpoint\n\n"
          "  normscope rewrite EleutherAI/pythia-160m --to crmsnorm\n\n"
          "  normscope sinks runs/gpt2-rms                  # analyse the export")


def _rewrite(model_opts: Any, text_opts: Any, output_opts: Any, opts: RewriteOptions) -> None:
    from normscope.surgery.pipeline import refuse_dtype

    check_inputs(model_opts, text_opts, opts)
    refuse_dtype(model_opts.dtype)
    precheck(model_opts.model, opts, output_opts.force)
    folder = output_dir(slugify(model_opts.model), output_opts.out)
    check_output(folder, ["rewrite"], output_opts.force)
    progress = Progressor(output_opts.quiet or output_opts.json)
    lm, sample = prepare(replace(model_opts, dtype="float32"), text_opts, progress)
    from normscope.surgery.pipeline import run

    outcome = run(lm, sample, opts, progress=progress)
    finish(outcome.result, folder, quiet=output_opts.quiet, as_json=output_opts.json,
           table=headlines_table(outcome.result, "rewrite"))
    h = outcome.result.headlines
    if not outcome.passed:
        eprint(f"error: the rewritten model's logits differ by {h['max_rel_logit_diff']:.3g} relative (tolerance "
               f"{opts.tolerance:g}); nothing was exported. See the report's residual-mean table.")
        raise typer.Exit(code=1)
    if not output_opts.quiet and not output_opts.json:
        eprint(f"export: {outcome.exported}" if outcome.exported else "export: none (give --export DIR)")


_MODEL = Group("model_opts", MODEL.cls, "Model", notes=(("dtype", "rewrite: float32 only (auto means float32)."),))
_OUTPUT = Group("output_opts", OUTPUT.cls, "Output", notes=(("force", "Also replaces an existing --export folder."),))
rewrite_command = guarded(command([_MODEL, Group("opts", RewriteOptions, "rewrite options"), TEXT, _OUTPUT], _rewrite,
                                  name="rewrite", doc=HELP))
app.command("rewrite", help=HELP, epilog=EPILOG)(rewrite_command)
