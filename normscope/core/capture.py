"""The capture engine: forward hooks that reduce statistics on the fly.

Hook points are named in TransformerLens style so that the statistics they feed read like TL code:

==================================  =============================================================
``blocks.{i}.hook_resid_pre``       residual stream entering block ``i``  ``[batch, pos, d_model]``
``blocks.{i}.hook_resid_post``      residual stream leaving block ``i``   ``[batch, pos, d_model]``
``blocks.{i}.attn.hook_pattern``    attention probabilities ``[batch, head, query, key]`` (eager)
``blocks.{i}.attn.hook_col_sum``    the pattern summed over queries ``[batch, head, key]`` (any path, below)
``blocks.{i}.attn.hook_out``        attention module output ``[batch, pos, d_model]``
``blocks.{i}.mlp.hook_out``         MLP module output ``[batch, pos, d_model]``
``{site}.hook_in``                  a norm site's input ``[batch, pos, d]`` (e.g. ``blocks.3.ln1.hook_in``)
``{site}.hook_scale``               its per-token divisor (std or RMS) ``[batch, pos, 1]``
``{site}.hook_out``                 its output ``[batch, pos, d]``
==================================  =============================================================

A *reducer* is any object with ``update(x, ctx)`` (``x`` the tensor at the hook point, ``ctx`` the current
:class:`BatchContext`) that folds the tensor into running sums, maxima or top-k; it never keeps the
tensor. An *intervention* is ``fn(x, ctx) -> x`` and replaces the tensor (for ablations). Memory therefore
grows with layers, heads and sites, never with the number of tokens.

``hook_col_sum`` comes from one of two paths, chosen when the hooks are registered (:attr:`Capture.attention`):
*chunked* (SDPA forward; the column sums are computed in query chunks from the queries and keys, see
:mod:`normscope.core.attn_chunks`, so no T x T pattern exists) unless a reducer or intervention reads whole patterns
at ``hook_pattern`` or the model cannot switch its attention, and *eager* (the pattern summed) otherwise.

The inf/NaN check costs no host sync per hook: each dispatch adds one device-side sum to a list, and the list is read
once per batch (:meth:`Capture.settle`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from normscope.core.attn_chunks import attention_implementation, chunked_attention, pattern_col_sum, unsupported
from normscope.core.errors import NormscopeError
from normscope.core.placement import execution_device, input_device


@dataclass
class BatchContext:
    """What a reducer may need to know about the batch its tensor came from."""

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    categories: list[str]
    index: int  # batch number within the run
    extra: dict[str, Any] = field(default_factory=dict)
    _copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[batch, pos]`` on ``x``'s device, copied there once per batch.

        With ``--device-map`` the blocks' activations sit on different devices while the ids and mask stay on the
        embedding's: a reducer that combines them with an activation takes them from here."""
        dev = x.device
        if dev == self.attention_mask.device:
            return self.input_ids, self.attention_mask
        if dev not in self._copies:
            self._copies[dev] = (self.input_ids.to(dev), self.attention_mask.to(dev))
        return self._copies[dev]


class Reducer(Protocol):
    def update(self, x: torch.Tensor, ctx: BatchContext) -> None: ...


Intervention = Callable[[torch.Tensor, BatchContext], torch.Tensor]
ATTENTION_PATHS = ("auto", "chunked", "eager")


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"cannot find the hidden state in a {type(out).__name__}")


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    raise TypeError(f"cannot replace the hidden state in a {type(out).__name__}")


def _pattern_index(out: Any) -> int | None:
    """Index of the ``[batch, head, q, k]`` attention pattern in an attention module's output tuple."""
    if isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            if i > 0 and isinstance(o, torch.Tensor) and o.ndim == 4:
                return i
    return None


class Capture:
    """Registers hooks for the points that reducers and interventions ask for, and runs batches.

    Use as a context manager so hooks are always removed::

        cap = Capture(model, layout, sites)
        cap.add("blocks.3.hook_resid_post", my_reducer)
        with cap:
            cap.run(sample.iter_batches(), on_output=...)
    """

    def __init__(self, model: nn.Module, layout: Any, sites: Iterable[Any], attention: str = "auto") -> None:
        if attention not in ATTENTION_PATHS:
            raise NormscopeError(f"Unknown attention path '{attention}'; use one of {', '.join(ATTENTION_PATHS)}.")
        self.model = model
        self.attention = attention  # "auto", "chunked" or "eager": how hook_col_sum is computed
        self.layout = layout
        self.sites = {s.name: s for s in sites}
        self._reducers: dict[str, list[Reducer]] = defaultdict(list)
        self._interventions: dict[str, list[Intervention]] = defaultdict(list)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.ctx: BatchContext | None = None
        self._nonfinite: dict[str, dict[str, Any]] = {}  # point -> first batch and count of batches with inf/NaN
        self._pending: list[tuple[str, int, torch.Tensor]] = []  # (point, batch, device-side sum) not yet read
        self._contexts = ExitStack()  # the attention implementation switched for the registered hooks
        self.attention_path: str | None = None  # "chunked" or "eager" once hook_col_sum is registered
        self.attention_reason = ""  # one sentence: why that path

    # ---- registration -------------------------------------------------------------------------------
    def points(self) -> list[str]:
        """Every hook point name this model offers."""
        names: list[str] = []
        for b in self.layout.blocks:
            i = b.index
            names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_post"]
            if b.attn is not None:
                names += [f"blocks.{i}.attn.hook_pattern", f"blocks.{i}.attn.hook_col_sum", f"blocks.{i}.attn.hook_out"]
            if b.mlp is not None:
                names.append(f"blocks.{i}.mlp.hook_out")
        for s in self.sites:
            names += [f"{s}.hook_in", f"{s}.hook_scale", f"{s}.hook_out"]
        return names

    def _check(self, point: str) -> None:
        if point not in set(self.points()):
            raise NormscopeError(f"Unknown hook point '{point}' for this model.")

    def add(self, point: str, reducer: Any) -> Any:
        """Feed the tensor at ``point`` to ``reducer.update`` on every batch; returns the reducer."""
        self._check(point)
        self._reducers[point].append(reducer)
        return reducer

    def intervene(self, point: str, fn: Intervention) -> None:
        """Replace the tensor at ``point`` by ``fn(x, ctx)`` (before reducers at that point see it)."""
        self._check(point)
        if point.endswith(".hook_col_sum"):
            raise NormscopeError(f"'{point}' is a statistic computed beside the attention, not a tensor the model "
                                 "uses; intervene at the attention pattern or output instead.")
        self._interventions[point].append(fn)

    @property
    def nonfinite(self) -> dict[str, dict[str, Any]]:
        """Point -> ``{"point", "first_batch", "batches"}`` for every hook point that saw inf or NaN so far."""
        self.settle()
        return self._nonfinite

    def settle(self) -> None:
        """Read the device-side sums of the hooked tensors (one host transfer per device) and note the points whose
        sum is not finite. Called once per batch; a sum is inf/NaN when a value is (or, for finite values near
        fp32's largest, when they add up past it)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_dev: dict[torch.device, list[int]] = defaultdict(list)
        for j, (_, _, v) in enumerate(pending):
            by_dev[v.device].append(j)
        finite = [True] * len(pending)
        for idx in by_dev.values():
            flags = torch.stack([pending[j][2] for j in idx]).isfinite().tolist()  # the one host read
            for j, ok in zip(idx, flags, strict=True):
                finite[j] = ok
        for (point, batch, _), ok in zip(pending, finite, strict=True):
            if not ok:
                seen = self._nonfinite.setdefault(point, {"point": point, "first_batch": batch, "batches": 0})
                seen["batches"] += 1

    def nonfinite_report(self) -> list[dict[str, Any]]:
        """Hook points where inf or NaN appeared (fp16/bf16 overflow), named by site and layer, in the order the
        forward pass reached them (the first row is where the overflow began)."""
        return sorted(self.nonfinite.values(), key=lambda r: r["first_batch"])  # stable: first-seen order

    def clear(self) -> None:
        self._reducers.clear()
        self._interventions.clear()

    # ---- hooks --------------------------------------------------------------------------------------
    def _dispatch(self, point: str, x: torch.Tensor) -> torch.Tensor | None:
        assert self.ctx is not None
        changed = False
        for fn in self._interventions.get(point, ()):
            x = fn(x, self.ctx)
            changed = True
        reducers = self._reducers.get(point, ())
        if reducers and x.is_floating_point():  # stays on the device until settle(): no host sync per hook
            self._pending.append((point, self.ctx.index, x.detach().sum(dtype=torch.float32)))
        for r in reducers:
            r.update(x.detach(), self.ctx)
        return x if changed else None

    def _wants(self, *points: str) -> bool:
        return any(p in self._reducers or p in self._interventions for p in points)

    def __enter__(self) -> Capture:
        self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._contexts.close()  # the model's own attention implementation again
        self._contexts = ExitStack()

    def _plan_attention(self) -> None:
        """Choose how ``hook_col_sum`` is computed (see the module docstring) and switch the model's attention."""
        blocks = [b for b in self.layout.blocks if b.attn is not None]
        cols = [b for b in blocks if self._wants(f"blocks.{b.index}.attn.hook_col_sum")]
        self.attention_path, self.attention_reason = None, ""
        if not cols:
            return
        why = unsupported(self.model)
        if self.attention == "eager":
            path, reason = "eager", "eager attention was asked for"
        elif any(self._wants(f"blocks.{b.index}.attn.hook_pattern") for b in blocks):
            path, reason = "eager", "another statistic of this pass reads whole T x T attention patterns"
        elif why is not None:
            if self.attention == "chunked":
                raise NormscopeError(f"Chunked attention statistics need transformers' attention interface, but {why}; "
                                     "use the eager path.")
            path, reason = "eager", why
        else:
            path, reason = "chunked", "no statistic of this pass needs a whole T x T pattern"
        self.attention_path, self.attention_reason = path, reason
        if path == "chunked":
            self._contexts.enter_context(chunked_attention(
                self.model, {b.attn: self._col_sum_callback(f"blocks.{b.index}.attn.hook_col_sum") for b in cols}))
        elif why is None:  # eager patterns, whatever implementation the model was loaded with
            self._contexts.enter_context(attention_implementation(self.model, "eager"))

    def _col_sum_callback(self, point: str) -> Callable[..., None]:
        def cb(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
               is_causal: bool, position_bias: torch.Tensor | None) -> None:
            self._dispatch(point, pattern_col_sum(query.detach(), key.detach(), mask, scaling, is_causal,
                                                  position_bias))  # [batch, head, key]

        return cb

    def _register(self) -> None:
        self.remove()
        self._plan_attention()
        eager_cols = self.attention_path == "eager"
        for b in self.layout.blocks:
            i = b.index
            pre, post = f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_post"
            if self._wants(pre):
                self._handles.append(b.module.register_forward_pre_hook(self._pre_hook(pre), with_kwargs=True))
            if self._wants(post):
                self._handles.append(b.module.register_forward_hook(self._out_hook(post)))
            pat, aout = f"blocks.{i}.attn.hook_pattern", f"blocks.{i}.attn.hook_out"
            col = f"blocks.{i}.attn.hook_col_sum" if eager_cols and self._wants(f"blocks.{i}.attn.hook_col_sum") else ""
            if b.attn is not None and (self._wants(pat, aout) or col):
                self._handles.append(b.attn.register_forward_hook(self._attn_hook(pat, aout, col)))
            mout = f"blocks.{i}.mlp.hook_out"
            if b.mlp is not None and self._wants(mout):
                self._handles.append(b.mlp.register_forward_hook(self._out_hook(mout)))
        for name, site in self.sites.items():
            hin, hscale, hout = f"{name}.hook_in", f"{name}.hook_scale", f"{name}.hook_out"
            if self._wants(hin, hscale):
                self._handles.append(
                    site.module.register_forward_pre_hook(self._site_pre_hook(site, hin, hscale), with_kwargs=True)
                )
            if self._wants(hout):
                self._handles.append(site.module.register_forward_hook(self._out_hook(hout)))

    def _pre_hook(self, point: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["hidden_states"]  # [batch, pos, d_model]
            moved = _to_execution_device(module, x)  # where accelerate would move it after this hook
            new = self._dispatch(point, moved)
            if new is None and moved is x:
                return None
            new = moved if new is None else new
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return hook

    def _site_pre_hook(self, site: Any, hin: str, hscale: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = _to_execution_device(module, args[0] if args else kwargs["hidden_states"])  # [batch, pos, d]
            new = self._dispatch(hin, x)
            if hscale in self._reducers:
                self._dispatch(hscale, site.divisor((new if new is not None else x).detach()))  # [batch, pos, 1]
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return hook

    def _out_hook(self, point: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            new = self._dispatch(point, _first_tensor(out))
            return None if new is None else _replace_first(out, new)

        return hook

    def _attn_hook(self, pat: str, aout: str, col: str = "") -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            result = out
            if self._wants(pat) or col:
                idx = _pattern_index(out)
                if idx is None:
                    raise NormscopeError(
                        "The attention module returned no attention pattern; load the model with eager attention "
                        "(normscope does this by default)."
                    )
                new = self._dispatch(pat, out[idx]) if self._wants(pat) else None  # [batch, head, query, key]
                if new is not None:
                    result = tuple(new if j == idx else o for j, o in enumerate(out))
                if col:
                    self._dispatch(col, (new if new is not None else out[idx]).detach().float().sum(dim=2))
            if self._wants(aout):
                new = self._dispatch(aout, _first_tensor(result))
                if new is not None:
                    result = _replace_first(result, new)
            return None if result is out else result

        return hook

    # ---- running ------------------------------------------------------------------------------------
    @contextmanager
    def batch(self, batch: Any, index: int = 0) -> Iterator[BatchContext]:
        """Set the context for one forward pass that the caller runs itself (e.g. with a backward)."""
        self.ctx = BatchContext(batch.input_ids, batch.attention_mask, list(batch.categories), index)
        try:
            yield self.ctx
        finally:
            self.settle()
            self.ctx = None

    def run(
        self,
        batches: Iterable[Any],
        *,
        on_output: Callable[[Any, BatchContext], None] | None = None,
        progress: Callable[[int], None] | None = None,
        device: torch.device | str | None = None,
        logits: bool = True,
    ) -> None:
        """One forward pass per batch under ``torch.no_grad``; every reducer sees every batch once.

        ``on_output(outputs, ctx)`` receives the model's output (logits etc.) for statistics such as the loss.
        ``progress(n_tokens)`` is called after each batch. ``logits=False``: the caller reads no logits, so the
        unembedding runs for the last position only (transformers' ``logits_to_keep=1``, where the model takes
        it): on SmolLM2 the vocabulary projection is a fifth of a forward pass. Every hook still sees every token.
        """
        if not self._handles:
            self._register()
        dev = device or input_device(self.model)  # the embedding's device (with --device-map, not the first weight's)
        extra = {"logits_to_keep": 1} if not logits and accepts_logits_to_keep(self.model) else {}
        with torch.no_grad():
            for i, b in enumerate(batches):
                ids = b.input_ids.to(dev)  # [batch, pos]
                mask = b.attention_mask.to(dev)  # [batch, pos]
                self.ctx = BatchContext(ids, mask, list(b.categories), i)
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
                self.settle()
                if on_output is not None:
                    on_output(out, self.ctx)
                if progress is not None:
                    progress(int(ids.numel()))
                self.ctx = None


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers' causal LMs do; encoders do not)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _to_execution_device(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device accelerate runs ``module`` on (unchanged without a device map): a forward pre-hook runs
    before accelerate moves the inputs, and what reducers see there must sit with the block's other tensors."""
    dev = execution_device(module)
    return x if dev is None or x.device == dev else x.to(dev)


# ---- a few generic reducers ---------------------------------------------------------------------------
class TokenMoments:
    """Running count, sum and sum of squares of a per-token scalar, split into position 0 and the rest.

    ``fn(x) -> [batch, pos]`` turns the hook tensor into one number per token (e.g. an L2 norm).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.n = {"pos0": 0, "rest": 0}
        self.s = {"pos0": 0.0, "rest": 0.0}
        self.s2 = {"pos0": 0.0, "rest": 0.0}

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        v = self.fn(x.float())  # [batch, pos]
        mask = ctx.on(v)[1].bool()
        for key, sel in (("pos0", v[:, :1][mask[:, :1]]), ("rest", v[:, 1:][mask[:, 1:]])):
            self.n[key] += int(sel.numel())
            self.s[key] += float(sel.double().sum())
            self.s2[key] += float(sel.double().pow(2).sum())

    def mean(self, key: str = "rest") -> float:
        return self.s[key] / self.n[key] if self.n[key] else float("nan")

    def var(self, key: str = "rest") -> float:
        if not self.n[key]:
            return float("nan")
        m = self.mean(key)
        return max(self.s2[key] / self.n[key] - m * m, 0.0)
