"""The ``normscope`` command line: one generated command per registered analysis, plus ``report``, ``compare``,
``sites``, ``remove-ln``, ``swap`` and ``rewrite`` (the math lives in the analysis packages)."""

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


from normscope.cli import commands as _commands  # noqa: E402,F401  (registers the analysis commands, report, compare)
from normscope.cli import remove_ln as _remove_ln  # noqa: E402,F401
from normscope.cli import rewrite as _rewrite  # noqa: E402,F401
from normscope.cli import sites as _sites  # noqa: E402,F401
from normscope.cli import swap as _swap  # noqa: E402,F401
