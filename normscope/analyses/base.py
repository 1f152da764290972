"""The analysis contract: an analysis is an :class:`AnalysisSpec` in :data:`REGISTRY`.

A spec names the analysis, its options dataclass (whose fields, types, defaults and field docstrings become
the CLI options and their ``--help``), the function that runs it, whether it needs a causal LM, and the papers
it follows. The CLI commands, ``report --only``, ``compare`` and :func:`normscope.run` are all generated from
the registry, so adding an analysis is one package under ``normscope/analyses/`` and one line in
``normscope/analyses/__init__.py``.

Where this departs from the design sketch: ``AnalysisSpec.runner`` is a ``"module:function"`` string, imported
on first use, not a function object, so that building the command line (and ``--help``) never imports torch,
transformers or plotly. The module that holds an analysis' ``run`` is ``analysis.py``, not ``run.py``: importing
a submodule named ``run`` would replace the package's ``run`` function (``normscope.sinks.run(lm, sample)``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from normscope.core import options as _options
from normscope.core.errors import NormscopeError

if TYPE_CHECKING:
    from normscope.core.models import LoadedModel
    from normscope.core.sites import ModelLayout as Layout
    from normscope.core.sites import NormSite
    from normscope.core.text import TextSample
    from normscope.report.result import Result

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class AnalysisSpec(Generic[OptionsT]):
    """One analysis: everything the CLI, ``report``, ``compare`` and the Python API need to know about it."""

    name: str  # "sinks": the --only key, page stem and JSON "analysis"
    command: str  # "sinks", "depth-curse": the CLI command
    title: str  # one line: the command's help and the index card
    options: type[OptionsT]  # a dataclass: see normscope.core.options
    runner: str  # "normscope.analyses.sinks.analysis:run", imported on first use
    needs_causal: bool = False
    references: tuple[str, ...] = ()
    epilog: str = ""  # cost and examples, shown under the command's --help
    terminal: str = ""  # "module:function" building the rich table printed after a run (default: headlines)

    def run(self, ctx: RunContext, opts: OptionsT | None = None) -> Result:
        """Run on ``ctx`` with ``opts`` (defaults when None), refusing a model the analysis cannot serve."""
        if self.needs_causal and not ctx.lm.info.is_causal:
            raise NormscopeError(f"{self.name} needs a causal LM with an unembedding; {ctx.lm.info.name} is an "
                                 "encoder.")
        opts = self.options() if opts is None else opts
        _options.validate(opts)
        module, func = self.runner.split(":")
        fn: Callable[[RunContext, OptionsT], Result] = getattr(importlib.import_module(module), func)
        t0 = time.perf_counter()
        result = fn(ctx, opts)
        result.timings = {**result.timings, self.name: time.perf_counter() - t0}
        return result

    def make_options(self, **values: Any) -> OptionsT:
        """The options dataclass from keyword values, unknown names and bad values refused in one line."""
        built: OptionsT = _options.build(self.options, values, what=self.name)
        return built


@dataclass
class RunContext:
    """What every analysis runs on: the loaded model, its layout and norm sites (probed once), the text sample
    and a progress sink (``None`` in the Python API: silent)."""

    lm: LoadedModel
    sample: TextSample
    layout: Layout
    sites: list[NormSite]
    progress: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, lm: LoadedModel, sample: TextSample, progress: Any = None) -> RunContext:
        """Probe the layout and norm sites of ``lm`` once (one forward pass) for every analysis that follows."""
        from normscope.core.lnfree import check_sample
        from normscope.core.sites import find_layout, find_norm_sites

        check_sample(lm.extra.get("exact_bos"), sample.batches)
        layout = find_layout(lm.model)
        return cls(lm, sample, layout, find_norm_sites(lm.model, layout), progress)


REGISTRY: dict[str, AnalysisSpec[Any]] = {}


def register(spec: AnalysisSpec[Any]) -> AnalysisSpec[Any]:
    """Add ``spec`` to the registry (names and commands must be unique)."""
    if spec.name in REGISTRY or any(s.command == spec.command for s in REGISTRY.values()):
        raise ValueError(f"analysis {spec.name!r} (command {spec.command!r}) is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> AnalysisSpec[Any]:
    """The spec called ``name`` (or whose command is ``name``); one line naming the choices otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    for spec in REGISTRY.values():
        if spec.command == name:
            return spec
    raise NormscopeError(f"Unknown analysis '{name}'; choose from {', '.join(REGISTRY)}.")


def parse_only(only: str | None) -> list[str]:
    """``--only sinks,depth`` -> ["sinks", "depth"]; None or empty -> every registered analysis."""
    if not only or not only.strip():
        return list(REGISTRY)
    names = [get(n.strip()).name for n in only.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def as_context(lm_or_ctx: Any, sample: Any = None, progress: Any = None) -> RunContext:
    """Accept either a :class:`RunContext` or a loaded model and a text sample (the older two-argument API)."""
    if isinstance(lm_or_ctx, RunContext):
        if progress is not None:
            lm_or_ctx.progress = progress
        return lm_or_ctx
    if sample is None:
        raise NormscopeError("Give a text sample: normscope.run(name, lm, sample) or build a RunContext.")
    return RunContext.build(lm_or_ctx, sample, progress)


def run(name: str, lm: Any, sample: Any = None, opts: Any = None, *, progress: Any = None,
        **options: Any) -> Result:
    """Run analysis ``name`` on a loaded model and a text sample (or a :class:`RunContext`).

    ``opts`` is the analysis' options dataclass; keyword ``options`` build one instead
    (``normscope.run("sinks", lm, sample, eps=0.2)``). Returns a :class:`~normscope.report.Result`.
    """
    spec = get(name)
    if opts is not None and options:
        raise NormscopeError("Give either an options object or keyword options, not both.")
    opts = spec.make_options(**options) if opts is None else opts
    return spec.run(as_context(lm, sample, progress), opts)


def package_run(name: str) -> Callable[..., Result]:
    """The ``run`` function of an analysis package: ``normscope.sinks.run(lm, sample, opts, progress=...)``."""

    def run_analysis(lm: Any, sample: Any = None, opts: Any = None, progress: Any = None, **options: Any) -> Result:
        return run(name, lm, sample, opts, progress=progress, **options)

    run_analysis.__doc__ = f"Run ``{name}`` on a loaded model and a text sample (or a RunContext); see normscope.run."
    return run_analysis


def lazy_exports(package: str, modules: tuple[str, ...]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that finds a name in the package's submodules, imported on first use (so that
    importing ``normscope.analyses.sinks.options`` stays free of torch and plotly)."""

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for mod in modules:
            m = importlib.import_module(f"{package}.{mod}")
            if hasattr(m, attr):
                return getattr(m, attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__
