"""Tiny random transformers built from configs, for tests: no downloads, seeded, eager attention.

Every factory returns a model in eval mode with ``requires_grad`` off, small enough to run a forward pass in
milliseconds (2-3 layers, d_model 32-64, 4 heads, vocabulary of 128, 64 positions). The models are untrained:
they have no massive activations or attention sinks, only the architecture of the real thing.

With ``perturb_norms=True`` (the default) every normalization gain and bias is drawn as
``init + 0.1 * N(0, 1)``, so tests see non-trivial gains and biases (transformers initialises them to ones and
zeros, or to zeros for Gemma's ``1 + w`` gain, which would hide a wrong gain formula).

Usage (``from tiny import ...`` works too: pytest puts ``tests/`` on ``sys.path``)::

    from tests.tiny import tiny_llama, tiny_tokenizer, save_tiny
    model = tiny_llama()                      # LlamaForCausalLM, 2 layers, d=64
    folder = save_tiny(model, tiny_tokenizer(), tmp_path / "llama")
    lm = load_model(str(folder))              # normscope.core.models.load_model reads it offline

``ARCHITECTURES`` maps a short name to each factory, for parametrised tests.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB_SIZE = 128
N_POSITIONS = 64
_SPECIAL_IDS = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}  # as in tiny_tokenizer()
_DECODER = {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "max_position_embeddings": N_POSITIONS, **_SPECIAL_IDS}

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPACE = "\u2581"  # SentencePiece's word-boundary mark, used by the Metaspace pre-tokenizer


def _finish(model: nn.Module, seed: int, perturb_norms: bool) -> nn.Module:
    """Eval mode, no gradients, eager attention, and (optionally) perturbed norm gains and biases."""
    if perturb_norms:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in model.modules():
                if "norm" not in type(module).__name__.lower():
                    continue
                for pname in ("weight", "bias"):
                    p = getattr(module, pname, None)
                    if isinstance(p, nn.Parameter) and p.dim() == 1:
                        p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    model.config._attn_implementation = "eager"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _build(model_cls: type, config: object, seed: int, perturb_norms: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return _finish(model, seed, perturb_norms)


def tiny_gpt2(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2) -> nn.Module:
    """GPT2LMHeadModel: pre-LN (``ln_1``, ``ln_2``, ``ln_f``), LayerNorm eps 1e-5, d=64, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=N_POSITIONS, n_embd=64, n_layer=n_layers, n_head=4,
                     **_SPECIAL_IDS)
    return _build(GPT2LMHeadModel, cfg, seed, perturb_norms)


def tiny_llama(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2) -> nn.Module:
    """LlamaForCausalLM: pre-RMSNorm (``input_layernorm``, ``post_attention_layernorm`` = pre-MLP, ``norm``),
    eps 1e-5, d=64, 4 heads / 2 KV heads, tied embeddings like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_DECODER, num_hidden_layers=n_layers, num_key_value_heads=2, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)
    return _build(LlamaForCausalLM, cfg, seed, perturb_norms)


def tiny_qwen3(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2) -> nn.Module:
    """Qwen3ForCausalLM: pre-RMSNorm plus per-head ``q_norm`` / ``k_norm`` (head_dim 16), eps 1e-6, d=64."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**_DECODER, num_hidden_layers=n_layers, num_key_value_heads=2, head_dim=16,
                      rms_norm_eps=1e-6, tie_word_embeddings=True)
    return _build(Qwen3ForCausalLM, cfg, seed, perturb_norms)


def tiny_gemma2(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2) -> nn.Module:
    """Gemma2ForCausalLM: sandwich RMSNorms with ``1 + w`` gains (input, post-attention, pre-feedforward,
    post-feedforward, final), eps 1e-6, d=64, 4 heads / 2 KV heads, head_dim 16."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**_DECODER, num_hidden_layers=n_layers, num_key_value_heads=2, head_dim=16,
                       query_pre_attn_scalar=16, sliding_window=32, rms_norm_eps=1e-6)
    return _build(Gemma2ForCausalLM, cfg, seed, perturb_norms)


def tiny_bert(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2) -> nn.Module:
    """BertModel (encoder, no head, like MiniLM): post-LN, ``embeddings.LayerNorm`` plus two LayerNorms per
    layer (after attention and after the MLP), eps 1e-12, d=64, 4 heads."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                     num_attention_heads=4, max_position_embeddings=N_POSITIONS, layer_norm_eps=1e-12,
                     pad_token_id=0)
    return _build(BertModel, cfg, seed, perturb_norms)


def tiny_opt(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2, pre_ln: bool = True) -> nn.Module:
    """OPTForCausalLM: pre-LN by default (``self_attn_layer_norm``, the layer's ``final_layer_norm`` =
    pre-MLP, ``decoder.final_layer_norm``), LayerNorm eps 1e-5, d=64, 4 heads. ``pre_ln=False`` builds the
    post-LN variant of OPT-350m (``do_layer_norm_before=False``, no final norm)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=n_layers,
                    num_attention_heads=4, max_position_embeddings=N_POSITIONS, word_embed_proj_dim=64,
                    do_layer_norm_before=pre_ln, **_SPECIAL_IDS)
    return _build(OPTForCausalLM, cfg, seed, perturb_norms)


def tiny_gptneox(seed: int = 0, perturb_norms: bool = True, n_layers: int = 2,
                 parallel: bool = True) -> nn.Module:
    """GPTNeoXForCausalLM (Pythia): pre-LN with parallel attention and MLP by default (``input_layernorm``,
    ``post_attention_layernorm`` = pre-MLP, ``final_layer_norm``), eps 1e-5, d=64, 4 heads."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**_DECODER, num_hidden_layers=n_layers, rotary_pct=0.25, layer_norm_eps=1e-5,
                        use_parallel_residual=parallel)
    return _build(GPTNeoXForCausalLM, cfg, seed, perturb_norms)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "qwen3": tiny_qwen3,
    "gemma2": tiny_gemma2,
    "bert": tiny_bert,
    "opt": tiny_opt,
    "gptneox": tiny_gptneox,
}


def tiny_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level tokenizer (about 100 tokens, all ids < ``VOCAB_SIZE``) that round-trips English text.

    Ids 0-3 are ``<pad> <unk> <bos> <eos>`` (matching the tiny configs); then the word-boundary mark and the
    printable ASCII characters. Spaces become the Metaspace mark, so ``decode(encode(text)) == text`` for
    ASCII text without runs of spaces. It adds no BOS (like SmolLM2); prepend ``bos_token_id`` yourself.
    Built from scratch with ``tokenizers``, so no download is involved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [SPACE] + [c for c in string.printable if c not in string.whitespace]
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *chars])}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, model_max_length=N_POSITIONS)


def tiny_tokenizer_dir(tmp_path: str | os.PathLike[str]) -> Path:
    """Save :func:`tiny_tokenizer` into ``tmp_path/tokenizer``; returns that folder for ``AutoTokenizer``."""
    folder = Path(tmp_path) / "tokenizer"
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_tiny(model: nn.Module, tokenizer: object, path: str | os.PathLike[str]) -> Path:
    """Save a tiny model and its tokenizer as one transformers folder that ``load_model(str(path))`` reads.

    Written under a temporary name next to ``path`` and renamed into place, so a half-written folder never
    exists under ``path``. An existing ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def one_line_error(result: Any, exit_code: int = 2) -> str:
    """Assert a CLI result is the one-line refusal every command gives bad input (exit code 2, a line that starts
    with "error:", no traceback); returns the message."""
    out = result.output
    assert result.exit_code == exit_code, out
    assert "Traceback" not in out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), out
    return " ".join(lines)
