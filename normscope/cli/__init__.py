"""The ``normscope`` command line: one thin command per analysis (the math lives in the analysis modules)."""

from __future__ import annotations

from typing import Annotated

import typer

from normscope.cli.common import version_callback

app = typer.Typer(
    name="normscope",
    help="Mechanistic analysis of the normalization layers of pretrained transformers.\n\n"
    "Every command writes an HTML report (plotly, opens offline) plus JSON and CSV under reports/MODEL/.\n"
    "Exit codes: 0 ok, 1 failure, 2 bad input.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """normscope: hook every normalization site of a Hugging Face model and measure what the literature measures."""


from normscope.cli import depth as _depth  # noqa: E402,F401
from normscope.cli import dla as _dla  # noqa: E402,F401
from normscope.cli import grads as _grads  # noqa: E402,F401
from normscope.cli import hubness as _hubness  # noqa: E402,F401
from normscope.cli import remove_ln as _remove_ln  # noqa: E402,F401
from normscope.cli import report as _report  # noqa: E402,F401
from normscope.cli import sinks as _sinks  # noqa: E402,F401  (registers commands)
from normscope.cli import sites as _sites  # noqa: E402,F401
