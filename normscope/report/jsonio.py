"""Deterministic JSON: plain types, NaN/inf as null, key order as given (byte-identical for identical inputs)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON types, deterministically.

    numpy / torch scalars -> Python numbers; arrays and tensors -> nested lists; NaN, +-inf, ``pd.NA`` and
    ``NaT`` -> None; tuples -> lists; sets -> sorted lists; ``Path`` -> POSIX string; dataclasses -> dicts;
    enums -> their value; DataFrames -> list of row dicts; Series -> list; mapping keys -> ``str``.
    Anything else raises TypeError, so that a stray object is caught rather than stringified.
    """
    if isinstance(obj, np.generic):  # before the Python types: np.float64 subclasses float, np.str_ str
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return to_jsonable(float(obj))
        if isinstance(obj, (np.str_, np.bytes_)):
            return str(obj)
        if isinstance(obj, (np.datetime64, np.timedelta64)):
            return None if np.isnat(obj) else str(obj)
        return to_jsonable(obj.item())
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.tolist())
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, (pd.Timestamp, _dt.datetime, _dt.date)):
        return obj.isoformat()
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(obj, torch_tensor):
        t = obj.detach().cpu()
        return to_jsonable(t.item() if t.ndim == 0 else t.tolist())
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ModelInfo, NormSite, ...
        return to_jsonable(obj.to_dict())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, np.bool_)):
        return "true" if key else "false"
    if isinstance(key, (int, np.integer)):
        return str(int(key))
    if isinstance(key, enum.Enum):
        return str(key.value)
    if isinstance(key, (float, np.floating, PurePath)):
        return str(to_jsonable(key))
    raise TypeError(f"cannot use {type(key).__name__} as a JSON key")


def _torch_tensor_type() -> Any:
    import sys

    torch = sys.modules.get("torch")  # no import: if torch was never imported there can be no tensor
    return getattr(torch, "Tensor", None)


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text: :func:`to_jsonable`, key order as given, indent 2, UTF-8, final newline."""
    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

