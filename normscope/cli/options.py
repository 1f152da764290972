"""Command-line options generated from options dataclasses (see :mod:`normscope.core.options`).

:func:`params` turns a dataclass into Typer parameters (type, default, ``--help`` from the field docstring,
a help panel); :func:`command` builds a command function from several such groups and hands each group back
as its dataclass. Only Typer's public API is used: a function whose signature holds ``Annotated[T,
typer.Option(...)]`` parameters, as a hand-written command would.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from normscope.core.options import ModelOptions, OutputOptions, TextOptions, field_docs, flag_name


@dataclass(frozen=True)
class Group:
    """One options dataclass as it appears on a command: its parameters' prefix and help panel."""

    key: str  # name under which the command body receives the dataclass
    cls: type
    panel: str
    prefix: str = ""  # "sinks" -> --sinks-eps (report and compare carry every analysis' options)
    skip: tuple[str, ...] = ()  # fields left off this command
    defaults: tuple[tuple[str, Any], ...] = ()  # this command's own defaults, e.g. (("seq_len", 128),)
    notes: tuple[tuple[str, str], ...] = ()  # text added to a field's --help here (why the default differs)


def _param_name(group: Group, fname: str) -> str:
    return f"{group.prefix}_{fname}" if group.prefix else fname


def params(group: Group) -> list[inspect.Parameter]:
    """The Typer parameters of ``group``: one option per field (``model`` becomes the positional argument)."""
    hints = typing.get_type_hints(group.cls)
    docs = field_docs(group.cls)
    out = []
    for f in dataclasses.fields(group.cls):
        if f.name in group.skip or not f.metadata.get("cli", True):
            continue
        ann = hints[f.name]
        default = dict(group.defaults).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_text = " ".join(filter(None, (docs.get(f.name, ""), dict(group.notes).get(f.name))))
        if group.cls is ModelOptions and f.name == "model":
            info: Any = typer.Argument(help=help_text, show_default=True)
        else:
            flag = flag_name(f, group.prefix)
            is_bool = ann is bool or ann == (bool | None)
            decls = [flag] if is_bool and default is False else ([f"{flag}/--no-{flag[2:]}"] if is_bool else [flag])
            if f.name == "quiet" and group.cls is OutputOptions:
                decls.append("-q")
            metavar = None
            if f.metadata.get("choices"):
                joined = "|".join(map(str, f.metadata["choices"]))
                metavar = joined if len(joined) <= 14 else "NAME"
                help_text = help_text or f"One of {joined}."
            elif "layers" in f.name:
                metavar = "BLOCKS"
            info = typer.Option(*decls, help=help_text, rich_help_panel=group.panel, metavar=metavar,
                                show_default=default not in (None, False))
        out.append(inspect.Parameter(_param_name(group, f.name), inspect.Parameter.KEYWORD_ONLY,
                                     default=default, annotation=Annotated[ann, info]))
    return out


_ARGUMENT = type(typer.Argument())


def _is_argument(p: inspect.Parameter) -> bool:
    return any(isinstance(a, _ARGUMENT) for a in typing.get_args(p.annotation)[1:])


def command(groups: list[Group], body: Callable[..., None], *, name: str, doc: str,
            extra: list[inspect.Parameter] | None = None) -> Callable[..., None]:
    """A command function with the parameters of ``groups`` (and ``extra``) that calls ``body(**dataclasses)``:
    each group's values come back as an instance of its dataclass under ``group.key``; ``extra`` parameters
    are passed through by name. Instances are built unchecked; the body validates them (one-line errors)."""
    ps = [p for g in groups for p in params(g)] + list(extra or [])
    names = [p.name for p in ps]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"command {name!r} declares {sorted(dup)} twice")
    ps.sort(key=lambda p: not _is_argument(p))  # the positional argument(s) first, in declaration order
    ps = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in ps]

    def cmd(**values: Any) -> None:
        built: dict[str, Any] = {}
        for g in groups:
            fields = {f.name for f in dataclasses.fields(g.cls)}
            kw = {f: values.pop(_param_name(g, f)) for f in fields if _param_name(g, f) in values}
            if g.key in built:  # several groups under one key (report's per-analysis groups)
                built[g.key][g.prefix] = g.cls(**kw)
            else:
                built[g.key] = {g.prefix: g.cls(**kw)} if g.prefix else g.cls(**kw)
        body(**built, **values)

    cmd.__signature__ = inspect.Signature(ps)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in ps}
    cmd.__name__ = cmd.__qualname__ = name.replace("-", "_")
    cmd.__doc__ = doc
    return cmd


MODEL = Group("model_opts", ModelOptions, "Model")
TEXT = Group("text_opts", TextOptions, "Text")
OUTPUT = Group("output_opts", OutputOptions, "Output")
