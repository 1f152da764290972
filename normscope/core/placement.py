"""Models past one device: accelerate's big-model placement (``--device-map``), and what hooks need to know
about it.

A model loaded with ``device_map`` (transformers' ``from_pretrained``) or placed by :func:`dispatch` (accelerate's
``infer_auto_device_map`` + ``dispatch_model``, for a model already in memory) carries an accelerate hook on each
placed module. The hook moves the module's inputs to its *execution device* before it runs and, for weights
offloaded to the CPU or the disk, loads them from its ``weights_map`` for the duration of the call and leaves
them on the ``meta`` device otherwise. So:

* activations of different blocks can sit on different devices: a reducer combines them with the batch's ids and
  mask only through :meth:`normscope.core.capture.BatchContext.on`;
* a forward pre-hook runs before accelerate moves the inputs: :func:`execution_device` says where they will go;
* a weight read outside a forward pass may be on ``meta``: :func:`resident` gives its value.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError

__all__ = ["dispatch", "execution_device", "input_device", "is_offloaded", "is_placed", "place", "placement_summary",
           "resident"]


def _align_hook(module: nn.Module) -> Any:
    """The module's accelerate ``AlignDevicesHook`` (also when it sits inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", (hook,)):
        if hasattr(h, "execution_device"):
            return h
    return None


def execution_device(module: nn.Module) -> torch.device | None:
    """Where accelerate runs ``module`` (and moves its inputs to), or None when it has no placement hook."""
    hook = _align_hook(module)
    dev = getattr(hook, "execution_device", None) if hook is not None else None
    if dev is None:
        return None
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def is_placed(model: nn.Module) -> bool:
    """Whether the model was spread by accelerate (``hf_device_map`` with more than one device or an offload)."""
    dmap: Any = getattr(model, "hf_device_map", None)
    if not dmap:
        return False
    return len(set(map(str, dmap.values()))) > 1 or any(_align_hook(m) is not None for m in model.modules())


def is_offloaded(model: nn.Module) -> bool:
    """Whether some weights live off their execution device (CPU or disk offload: they read as ``meta``)."""
    return any(p.device.type == "meta" for p in model.parameters())


def input_device(model: nn.Module) -> torch.device:
    """The device the input ids go to: the input embedding's execution device (its weight's device otherwise)."""
    get: Any = getattr(model, "get_input_embeddings", None)
    embed: Any = get() if callable(get) else None
    if embed is not None:
        dev = execution_device(embed)
        if dev is not None:
            return dev
        w = getattr(embed, "weight", None)
        if isinstance(w, torch.Tensor) and w.device.type != "meta":
            return w.device
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def resident(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The value of ``module``'s own tensor ``name`` (detached), read from accelerate's offload when it is on
    ``meta`` (onto the CPU: the caller moves it where it is needed). None when the module has no such tensor."""
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        return None
    if t.device.type != "meta":
        return t.detach()
    hook = _align_hook(module)
    weights = getattr(hook, "weights_map", None) if hook is not None else None
    if weights is None or name not in weights:
        raise NormscopeError(f"The weight {name} of {type(module).__name__} is on the meta device and accelerate has "
                             "no offloaded copy of it; reload the model.")
    return weights[name].detach().to("cpu")


def placement_summary(model: nn.Module) -> dict[str, int] | None:
    """Modules per device of an accelerate device map (``{"cuda:0": 14, "cpu": 3, "disk": 16}``), None without."""
    dmap = getattr(model, "hf_device_map", None)
    if not dmap:
        return None
    counts = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in dmap.values())
    return dict(sorted(counts.items()))


def dispatch(model: nn.Module, device_map: str | dict[str, Any] = "auto",
             max_memory: dict[int | str, int] | None = None, offload_folder: str | None = None) -> nn.Module:
    """Place a model that is already in memory (a GGUF-dequantized model, one built from a config) the way
    ``from_pretrained(device_map=...)`` places a checkpoint: accelerate's ``infer_auto_device_map`` (after
    ``get_balanced_memory`` for ``balanced``), then ``dispatch_model``, with disk offload into ``offload_folder``.
    Blocks are never split (the model's ``_no_split_modules``). Returns the model, placed in place."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        dmap = device_map
    else:
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        mem = max_memory
        if device_map in ("balanced", "balanced_low_0"):
            mem = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                      low_zero=device_map == "balanced_low_0")
        dmap = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split)
    if "disk" in dmap.values() and not offload_folder:
        raise NormscopeError("--max-memory leaves part of the model for the disk; give --offload-folder DIR (or "
                             "raise --max-memory).")
    tie: Any = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # tied embeddings stay one tensor on one device
    placed = dispatch_model(model, dmap, offload_dir=offload_folder)
    placed.hf_device_map = dmap
    return placed


def place(lm: Any, device_map: str | dict[str, Any] = "auto", max_memory: str | dict[int | str, int] | None = None,
          offload_folder: str | None = None) -> Any:
    """:func:`dispatch` for a :class:`~normscope.core.models.LoadedModel` (``max_memory`` also as
    ``"0=20GiB,cpu=60GiB"``); its info then names the input device and the modules per device."""
    from normscope.core.options import parse_max_memory

    mem = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    dispatch(lm.model, device_map, mem, offload_folder)
    lm.info.device = str(input_device(lm.model))
    lm.info.placement = placement_summary(lm.model)
    return lm
