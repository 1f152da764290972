"""Options declared once: the three groups every command composes (model, text, output), and the helpers that
turn any options dataclass into command-line options and check its values.

An options class is a plain dataclass. Each field's type and default become the option, the string literal
under the field (its docstring, read with :mod:`ast`) becomes its ``--help``, and :func:`opt` adds what the
type cannot say: allowed choices, a range, or a flag name different from the field's. The same dataclass is
the library's configuration (``normscope.run("sinks", lm, sample, eps=0.2)``), so nothing is declared twice
(the pattern of EleutherAI sparsify's ``config.py`` and tuned-lens' ``ingredients.py``).

This module imports neither torch nor transformers: the CLI builds its ``--help`` from it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normscope.core.errors import NormscopeError

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_MAPS = ("none", "auto", "balanced", "sequential")
BOS_POLICIES = ("auto", "yes", "no")
MEANINGFUL_SEQ_LEN = 16  # below this, per-position metrics (sink rate, angles) say little; Gu et al. use 64


def opt(default: Any = dataclasses.MISSING, *, choices: tuple[Any, ...] | None = None, lo: float | None = None,
        hi: float | None = None, lo_open: bool = False, hi_open: bool = False, flag: str | None = None,
        cli: bool = True, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with what the CLI and :func:`validate` need beyond its type and default.

    ``choices``: the allowed values; ``lo``/``hi``: a range (``lo_open``/``hi_open`` exclude the bound);
    ``flag``: the option name when it is not the field's (``--text`` for ``paths``); ``cli=False``: a library
    setting with no command-line option.
    """
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "flag": flag, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and of its dataclass bases), as one line each."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # pragma: no cover - classes made at run time have no source
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag_name(f: dataclasses.Field[Any], prefix: str = "") -> str:
    """``--seq-len`` for field ``seq_len`` (``--depth-skip-layers`` with prefix ``depth``)."""
    name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return f"--{prefix}-{name[2:]}" if prefix else name


def _fmt_range(m: dict[str, Any]) -> str:
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"{'(' if m.get('lo_open') else '['}{lo:g}, {hi:g}{')' if m.get('hi_open') else ']'}"
    if lo is not None:
        return f"{'above' if m.get('lo_open') else 'at least'} {lo:g}"
    return f"{'below' if m.get('hi_open') else 'at most'} {hi:g}"


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field of options dataclass ``obj`` against its :func:`opt` choices and range, then run the
    class's own ``check()`` if it has one. Raises :class:`NormscopeError` naming the flag (exit code 2)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        m = f.metadata
        if v is None or not m:
            continue
        if m.get("choices") and v not in m["choices"]:
            raise NormscopeError(f"{flag_name(f, prefix)} must be one of {', '.join(map(str, m['choices']))}, "
                                 f"not '{v}'.")
        lo, hi = m.get("lo"), m.get("hi")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (lo is not None or hi is not None):
            bad = (isinstance(v, float) and math.isnan(v)) or (
                lo is not None and (v <= lo if m.get("lo_open") else v < lo)) or (
                hi is not None and (v >= hi if m.get("hi_open") else v > hi))
            if bad:
                raise NormscopeError(f"{flag_name(f, prefix)} must be {_fmt_range(dict(m))}, got {v:g}.")
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except NormscopeError as exc:
            if not prefix:
                raise
            msg = str(exc)
            for f in dataclasses.fields(obj):  # name the flags as this command spells them (--depth-skip-layers)
                msg = re.sub(rf"(?<![\w-]){re.escape(flag_name(f))}(?![\w-])", flag_name(f, prefix), msg)
            raise NormscopeError(msg) from None


def build(cls: type, values: dict[str, Any], *, what: str) -> Any:
    """``cls(**values)`` with unknown names refused in one line (``what`` names the analysis)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise NormscopeError(f"{what} has no option {', '.join(unknown)}; its options are {', '.join(sorted(names))}.")
    obj = cls(**values)
    validate(obj)
    return obj


# ---- the three groups every command composes -------------------------------------------------------------
@dataclass
class ModelOptions:
    """Which model to load and how (the ``Model`` panel of every command)."""

    model: str = DEFAULT_MODEL
    """Bundled alias (smollm2-135m, minilm-l6), a model folder, a .gguf file, or a Hugging Face id (gpt2)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: str = opt("auto", choices=DTYPES)
    """auto (float32 on CPU, bfloat16 on GPUs that have it), float32, bfloat16 or float16. Statistics are summed
    in float32/float64 whatever the model's dtype."""
    device: str = opt("auto", choices=DEVICES)
    """auto, cpu, cuda or mps."""
    device_map: str = opt("none", choices=DEVICE_MAPS)
    """Spread the model over GPUs, CPU and disk with accelerate: auto, balanced or sequential (none: all of it on
    --device)."""
    max_memory: str | None = None
    """Memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB; what does not fit goes to
    --offload-folder."""
    offload_folder: Path | None = None
    """Folder for the weights --device-map sends to disk (a safetensors checkpoint is read in place instead)."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model repository. Off by default: that code runs with your rights."""
    allow_pickle: bool = False
    """Load pickle-only checkpoints (.bin). Off by default: a pickle can run code."""

    def check(self) -> None:
        """The device-map options make sense together (checked before anything loads)."""
        if self.device_map == "none":
            for flag, value in (("--max-memory", self.max_memory), ("--offload-folder", self.offload_folder)):
                if value is not None:
                    raise NormscopeError(f"{flag} places the model with accelerate, so it needs --device-map auto "
                                         "(or balanced, sequential).")
            return
        if self.device != "auto":
            raise NormscopeError(f"--device-map {self.device_map} chooses the devices itself; drop --device "
                                 f"{self.device} (limit the devices with --max-memory).")
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)
        if self.offload_folder is not None and Path(self.offload_folder).exists() \
                and not Path(self.offload_folder).is_dir():
            raise NormscopeError(f"--offload-folder {self.offload_folder} is a file; give a folder (it is created if "
                                 "missing).")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: 21474836480, "cpu": 60 * 2**30}``: accelerate's ``max_memory``, in bytes.

    Keys are GPU indices (``0``, ``cuda:1``), ``cpu``, ``mps`` or ``disk``; sizes are a number with an optional
    unit (B, KB, MB, GB, TB in powers of ten; KiB, MiB, GiB, TiB in powers of two). One line on a bad entry."""
    out: dict[int | str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(?:cuda:)?(\d+|cpu|mps|disk)\s*[=:]\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", part, re.I)
        if m is None:
            raise NormscopeError(f"--max-memory entry '{part}' is not DEVICE=SIZE; write e.g. 0=20GiB,cpu=60GiB "
                                 "(devices: GPU numbers, cpu, mps, disk).")
        key, num, unit = m.group(1).lower(), float(m.group(2)), (m.group(3) or "").lower()
        dev: int | str = int(key) if key.isdigit() else key
        if dev in out:
            raise NormscopeError(f"--max-memory names {key} twice; give each device once.")
        out[dev] = int(num * _UNITS[unit])
        if out[dev] <= 0:
            raise NormscopeError(f"--max-memory gives {key} no memory ({part}); give it a size above 0 or leave it "
                                 "out.")
    return out


@dataclass
class TextOptions:
    """What text to read and how to cut it (the ``Text`` panel of every command; one policy for every analysis)."""

    paths: list[Path] | None = opt(None, flag="--text")
    """Text files (.txt, .jsonl, .md) or folders; repeat for several. Default: the built-in prompt set."""
    dataset: str | None = None
    """A datasets NAME[:split], when online."""
    seq_len: int = opt(64, lo=2)
    """Tokens per sequence T, specials included (Gu et al. measure sink rates at T = 64)."""
    max_tokens: int = opt(2048, lo=1)
    """Stop after this many tokens in total."""
    batch_size: int = opt(8, lo=1)
    """Sequences per forward pass (memory only: no statistic depends on it)."""
    seed: int = 0
    """Seed of the control sequences and of any sampling (masking, ablation means)."""
    bos: str = opt("auto", choices=BOS_POLICIES)
    """Prepend BOS: auto (as the tokenizer does), yes or no."""
    controls: bool = False
    """Add Gu et al.'s random-token and repeated-token control sequences to the built-in prompts (4 of each):
    every analysis then measures them too, and every page says how many sequences of each kind went in."""
    jsonl_field: str = opt("text", cli=False)
    """Field of a .jsonl record that holds the text."""


@dataclass
class OutputOptions:
    """Where results go (the ``Output`` panel of every command)."""

    out: Path | None = None
    """Output folder. Default: reports/MODEL/."""
    force: bool = False
    """Overwrite this command's earlier files in the output folder (otherwise it refuses before loading)."""
    quiet: bool = opt(False, flag="--quiet")
    """No progress bar or summary table."""
    json: bool = False
    """Print the JSON result to stdout."""


__all__ = ["DEFAULT_MODEL", "ModelOptions", "OutputOptions", "TextOptions", "build", "field_docs", "flag_name",
           "opt", "parse_max_memory", "validate"]
