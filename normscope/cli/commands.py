"""The analysis commands, ``report`` and ``compare``, generated from the registry (:mod:`normscope.analyses`).

Each analysis command is its options dataclass plus the shared Model, Text and Output groups; ``report`` and
``compare`` carry every analysis' options under its name (``--sinks-eps``, ``--depth-skip-layers``). Nothing
here imports torch: models load inside the command bodies.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace
from typing import Annotated, Any

import typer

from normscope.analyses import REGISTRY, AnalysisSpec
from normscope.analyses.base import parse_only
from normscope.cli import app
from normscope.cli.common import (
    Progressor,
    check_inputs,
    check_output,
    finish,
    guarded,
    headlines_table,
    out_console,
    output_dir,
    prepare,
)
from normscope.cli.options import MODEL, OUTPUT, TEXT, Group, command
from normscope.core.io import slugify
from normscope.core.options import validate


def _terminal_table(spec: AnalysisSpec[Any], result: Any) -> Any:
    if not spec.terminal:
        return headlines_table(result, spec.command)
    module, func = spec.terminal.split(":")
    return getattr(importlib.import_module(module), func)(result)


def _analysis_command(spec: AnalysisSpec[Any]) -> None:
    def body(model_opts: Any, text_opts: Any, output_opts: Any, opts: Any) -> None:
        check_inputs(model_opts, text_opts, opts)
        folder = output_dir(slugify(model_opts.model), output_opts.out)
        check_output(folder, [spec.name], output_opts.force)
        progress = Progressor(output_opts.quiet or output_opts.json)
        lm, sample = prepare(model_opts, text_opts, progress, for_training=spec.name == "grads")
        from normscope.analyses.base import RunContext

        with progress.status("probing the norm sites"):
            ctx = RunContext.build(lm, sample, progress)
        result = spec.run(ctx, opts)
        finish(result, folder, quiet=output_opts.quiet, as_json=output_opts.json, table=_terminal_table(spec, result))

    groups = [MODEL, Group("opts", spec.options, f"{spec.command} options"), TEXT, OUTPUT]
    fn = command(groups, body, name=spec.command, doc=spec.title)
    app.command(spec.command, epilog=spec.epilog, help=spec.title)(guarded(fn))


for _spec in REGISTRY.values():
    _analysis_command(_spec)


# ---- report and compare: every analysis, its options under its name -------------------------------------
def _per_analysis_groups() -> list[Group]:
    return [Group("per_analysis", s.options, f"{s.command} options (report / compare)", prefix=s.name)
            for s in REGISTRY.values()]


_ONLY = inspect.Parameter(
    "only", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[str | None, typer.Option("--only", help="Comma-separated analyses to run (default: all): "
                                                  + ", ".join(REGISTRY) + ".", rich_help_panel="Analyses")])


def _checked_options(per_analysis: dict[str, Any], names: list[str]) -> dict[str, Any]:
    for name in names:
        validate(per_analysis[name], prefix=name)
    return {n: per_analysis[n] for n in names}


def _report_body(model_opts: Any, text_opts: Any, output_opts: Any, per_analysis: dict[str, Any],
                 only: str | None) -> None:
    from normscope.analyses.base import RunContext
    from normscope.analyses.suite import run_suite
    from normscope.report import dumps_json, write_report
    from normscope.report.index import refresh_index

    names = parse_only(only)
    check_inputs(model_opts, text_opts)
    options = _checked_options(per_analysis, names)
    folder = output_dir(slugify(model_opts.model), output_opts.out)
    check_output(folder, names, output_opts.force)
    progress = Progressor(output_opts.quiet or output_opts.json)
    lm, sample = prepare(model_opts, text_opts, progress, for_training="grads" in names)
    with progress.status("probing the norm sites"):
        ctx = RunContext.build(lm, sample, progress)
    runs = run_suite(ctx, names, options)
    for r in runs:
        if r.result is not None:
            write_report(r.result, folder)
    index = refresh_index(folder, {r.name: r.error for r in runs if r.error})
    if output_opts.json:
        import sys

        sys.stdout.write(dumps_json({r.name: r.result.to_json_dict() for r in runs if r.result}) + "\n")
        return
    for r in runs:
        if r.error:
            out_console.print(f"[yellow]{r.name}: not run: {r.error}[/]", highlight=False)
        elif not output_opts.quiet and r.result is not None:
            out_console.print(headlines_table(r.result, f"{REGISTRY[r.name].command} ({r.seconds:.1f} s)"))
    out_console.print(f"[bold green]index:[/] {index}", highlight=False, soft_wrap=True)


app.command(
    "report",
    help="Run every analysis (or --only some) with ONE model load and one text sample; write index.html.",
    epilog="Examples:\n\n"
    "  normscope report                                  # every analysis on the bundled SmolLM2-135M\n\n"
    "  normscope report minilm-l6 --only sinks,depth,grads\n\n"
    "  normscope report gpt2 --text book.txt --max-tokens 4096\n\n"
    "  normscope report --depth-skip-layers 0,10,20,29   # 4 skip passes instead of 30",
)(guarded(command([MODEL, TEXT, OUTPUT, *_per_analysis_groups()], _report_body, name="report",
                  doc="Run every analysis with one model load; write index.html.", extra=[_ONLY])))


def _compare_body(model_opts: Any, text_opts: Any, output_opts: Any, per_analysis: dict[str, Any],
                  only: str | None, model_a: str, model_b: str) -> None:
    from normscope.analyses.base import RunContext
    from normscope.analyses.suite import compare, run_suite

    names = parse_only(only)
    a_opts, b_opts = replace(model_opts, model=model_a), replace(model_opts, model=model_b)
    check_inputs(a_opts, text_opts)
    options = _checked_options(per_analysis, names)
    folder = output_dir(f"{slugify(model_a)}-vs-{slugify(model_b)}", output_opts.out)
    check_output(folder, ["compare"], output_opts.force)
    progress = Progressor(output_opts.quiet or output_opts.json)
    loaded = []
    for mo in (a_opts, b_opts):
        lm, sample = prepare(mo, text_opts, progress, for_training="grads" in names)
        ctx = RunContext.build(lm, sample, progress)
        loaded.append((lm, sample, run_suite(ctx, names, options)))
        del lm, ctx  # the next model loads while only this one's results are kept
    (lm_a, s_a, r_a), (lm_b, s_b, r_b) = loaded
    for tag, runs in (("A", r_a), ("B", r_b)):
        for r in runs:
            if r.error:
                out_console.print(f"[yellow]{tag} {r.name}: not run: {r.error}[/]", highlight=False)
    result = compare(lm_a, s_a, r_a, lm_b, s_b, r_b)
    finish(result, folder, quiet=output_opts.quiet, as_json=output_opts.json,
           table=headlines_table(result, "compare"))


_MODELS = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, typer.Argument(help=h)])
           for n, h in (("model_a", "First model (A): an alias, folder, .gguf or hub id."),
                        ("model_b", "Second model (B)."))]

app.command(
    "compare",
    help="Both models' per-layer curves of every analysis on one page (relative depth 0..1 when depths differ), "
    "with the deltas B - A.",
    epilog="Examples:\n\n"
    "  normscope compare smollm2-135m minilm-l6                      # pre-LN vs post-LN, every analysis\n\n"
    "  normscope compare smollm2-135m runs/remove-ln/smollm2-135m/ln-free-model   # original vs LN-free\n\n"
    "  normscope compare smollm2-135m minilm-l6 --only sinks,depth --depth-no-skip",
)(guarded(command([Group("model_opts", MODEL.cls, "Model", skip=("model",)), TEXT, OUTPUT,
                   *_per_analysis_groups()], _compare_body, name="compare",
                  doc="Compare two models on every analysis.", extra=[_ONLY, *_MODELS])))
