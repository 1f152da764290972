"""Text input: files, a dataset or the built-in prompts to fixed-length token batches.

Every analysis reads its text through :func:`load_text`. Each document is tokenized without special tokens
and cut into consecutive windows; each window becomes one sequence that starts fresh (its own BOS, or
[CLS] ... [SEP] for encoders). The tail of a document shorter than a window is dropped, and so is a whole
document shorter than one window. Sequences are never padded, so ``attention_mask`` is all ones.

Fixed-length windows follow Gu et al. 2024 ("When Attention Sink Emerges in Language Models: An Empirical
View"), who measure sink rates on prompts of T = 64 tokens and compare natural text with random-token and
repeated-token sequences; the built-in prompt set carries both controls (see :mod:`normscope.core.prompts`).

Files are streamed: read in chunks of :data:`CHUNK_BYTES`, decoded incrementally (strict UTF-8), cut at the
last whitespace run and tokenized piece by piece; reading stops as soon as ``max_tokens`` is reached.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normscope.core.errors import NormscopeError
from normscope.core.options import BOS_POLICIES, TextOptions
from normscope.core.sources import (
    CHUNK_BYTES,
    _dataset_documents,
    _files_documents,
    _source_for_files,
    _Stats,
    collect_files,
    parse_dataset_spec,
    split_at_whitespace,
    stream_text,
)

TOKENIZE_CHARS = 1 << 16  # characters handed to the tokenizer at a time (so early stops stay cheap)
CONTROLS_PER_KIND = 4  # random-token and repeated-token sequences each, built-in set only


@dataclass
class TokenBatch:
    """One batch of fixed-length sequences."""

    input_ids: torch.Tensor  # [batch, seq_len] long
    attention_mask: torch.Tensor  # [batch, seq_len] long, all ones (never padded)
    categories: list[str]  # per sequence: "prose", "code", ..., "random", "repeated", "file:<name>"

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class TextSample:
    """The token batches of one text source, with what a report needs to say about them."""

    batches: list[TokenBatch]
    source: str  # "built-in prompts (N documents)", "3 files under data/", "dataset wikitext:test"
    n_tokens: int  # tokens in all sequences, specials included (= n_sequences * seq_len)
    n_sequences: int
    seq_len: int
    bos_prepended: bool
    categories: dict[str, int]  # sequences per category, in order of first appearance
    specials: str = "none"  # "bos", "cls+sep" or "none"
    n_documents: int = 0  # documents read (controls not included)
    n_documents_dropped: int = 0  # documents shorter than one window that no packed window took
    n_documents_packed: int = 0  # short documents packed together into "packed" windows
    bytes_read: int = 0  # text bytes read from files (0 for the built-in set and datasets)
    truncated: bool = False  # reading stopped because max_tokens was reached
    files: list[str] = field(default_factory=list)  # file names relative to the folder given (no abs paths)
    seed: int = 0
    max_tokens: int = 0
    batch_size: int = 0

    def iter_batches(self) -> Iterator[TokenBatch]:
        """Yield the batches in their fixed order."""
        yield from self.batches

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for reports (file names only, never absolute paths)."""
        return {
            "source": self.source,
            "n_tokens": self.n_tokens,
            "n_sequences": self.n_sequences,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_batches": len(self.batches),
            "bos_prepended": self.bos_prepended,
            "specials": self.specials,
            "categories": dict(self.categories),
            "n_documents": self.n_documents,
            "n_documents_dropped": self.n_documents_dropped,
            "n_documents_packed": self.n_documents_packed,
            "bytes_read": self.bytes_read,
            "truncated": self.truncated,
            "files": list(self.files),
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }


# ----------------------------------------------------------------------------------------------------------
# Tokenizer helpers
# ----------------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    out = tokenizer(
        text, add_special_tokens=False, verbose=False,
        return_attention_mask=False, return_token_type_ids=False,
    )
    return list(out["input_ids"])


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself puts its BOS token first when encoding with special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("hello", add_special_tokens=True, verbose=False)["input_ids"]
    without = tokenizer("hello", add_special_tokens=False, verbose=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


@dataclass(frozen=True)
class _Specials:
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    label: str  # "bos", "cls+sep", "none"

    @property
    def bos_prepended(self) -> bool:
        return self.label == "bos"


def _resolve_specials(tokenizer: Any, bos: str, is_causal: bool) -> _Specials:
    if not is_causal:
        cls_id = getattr(tokenizer, "cls_token_id", None)
        sep_id = getattr(tokenizer, "sep_token_id", None)
        if cls_id is None or sep_id is None:
            raise NormscopeError(
                "This encoder's tokenizer has no [CLS]/[SEP] token, so windows cannot be framed; "
                "use a tokenizer that defines cls_token and sep_token."
            )
        return _Specials((int(cls_id),), (int(sep_id),), "cls+sep")
    if bos not in BOS_POLICIES:
        raise NormscopeError(f"Unknown BOS policy '{bos}'; choose auto, yes or no.")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "yes":
        if bos_id is None:
            raise NormscopeError("--bos yes was given but this tokenizer has no BOS token; use --bos no.")
        return _Specials((int(bos_id),), (), "bos")
    if bos == "auto" and tokenizer_adds_bos(tokenizer) and bos_id is not None:
        return _Specials((int(bos_id),), (), "bos")
    return _Specials((), (), "none")


# ----------------------------------------------------------------------------------------------------------
# Windowing and batching
# ----------------------------------------------------------------------------------------------------------


class _Collector:
    """Turns windows into TokenBatches; knows when the token budget is spent."""

    def __init__(self, seq_len: int, batch_size: int, max_sequences: int) -> None:
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_sequences = max_sequences
        self.batches: list[TokenBatch] = []
        self._rows: list[list[int]] = []
        self._cats: list[str] = []
        self.counts: Counter[str] = Counter()
        self.n_sequences = 0

    @property
    def full(self) -> bool:
        return self.n_sequences >= self.max_sequences

    def add(self, ids: list[int], category: str) -> None:
        assert len(ids) == self.seq_len and not self.full
        self._rows.append(ids)
        self._cats.append(category)
        self.counts[category] += 1
        self.n_sequences += 1
        if len(self._rows) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        input_ids = torch.tensor(self._rows, dtype=torch.long)  # [batch, seq_len]
        self.batches.append(TokenBatch(input_ids, torch.ones_like(input_ids), list(self._cats)))
        self._rows, self._cats = [], []


def _window_document(
    pieces: Iterable[str],
    category: str,
    tokenizer: Any,
    specials: _Specials,
    text_len: int,
    collector: _Collector,
    stats: _Stats,
) -> None:
    """Cut one document, given as text pieces, into windows of ``text_len`` tokens framed by the specials."""
    buf: list[int] = []
    produced = 0
    n_tok = 0
    stats.n_documents += 1
    prefix, suffix = list(specials.prefix), list(specials.suffix)
    it = iter(pieces)
    try:
        for piece in it:
            for sub in split_at_whitespace(piece, TOKENIZE_CHARS):
                ids = encode(tokenizer, sub)
                n_tok += len(ids)
                buf.extend(ids)
                while len(buf) >= text_len and not collector.full:
                    collector.add(prefix + buf[:text_len] + suffix, category)
                    del buf[:text_len]
                    produced += 1
                if collector.full:
                    break
            if collector.full:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a streamed file stops being read here
    stats.longest = max(stats.longest, n_tok)
    if produced == 0 and buf:
        _pack(buf, tokenizer, specials, text_len, collector, stats)


PACKED = "packed"  # the category of windows made of several short documents


def _pack(ids: list[int], tokenizer: Any, specials: _Specials, text_len: int, collector: _Collector,
          stats: _Stats) -> None:
    """Add a document shorter than one window to the pack of short documents, separated by EOS where the
    tokenizer has one; every full window of the pack becomes a sequence of category ``packed`` (a folder of
    one-line files is still text). Documents of an unfinished pack count as dropped until a window takes them."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if stats.pack and eos is not None:
        stats.pack.append(int(eos))
    stats.pack.extend(ids)
    stats.pack_docs += 1
    stats.n_dropped += 1
    while len(stats.pack) >= text_len and not collector.full:
        collector.add(list(specials.prefix) + stats.pack[:text_len] + list(specials.suffix), PACKED)
        del stats.pack[:text_len]
        stats.n_packed += stats.pack_docs  # a document cut in two counts once, in its first window
        stats.n_dropped -= stats.pack_docs
        stats.pack_docs = 0


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def _validate(opts: TextOptions, max_positions: int | None, is_causal: bool) -> None:
    min_len = 2 if is_causal else 4
    if not isinstance(opts.seq_len, int) or opts.seq_len < min_len:
        kind = "causal models" if is_causal else "encoders (which add [CLS] and [SEP])"
        raise NormscopeError(f"--seq-len must be at least {min_len} for {kind}, got {opts.seq_len}.")
    if max_positions is not None and opts.seq_len > max_positions:
        raise NormscopeError(
            f"--seq-len {opts.seq_len} is beyond this model's {max_positions} positions; "
            f"use --seq-len {max_positions} or less."
        )
    if opts.batch_size < 1:
        raise NormscopeError(f"--batch-size must be at least 1, got {opts.batch_size}.")
    if opts.max_tokens < opts.seq_len:
        raise NormscopeError(
            f"--max-tokens {opts.max_tokens} is less than one sequence of {opts.seq_len} tokens; "
            "raise --max-tokens."
        )
    if opts.paths and opts.dataset:
        raise NormscopeError("Give either text files or a dataset, not both.")


def load_text(
    tokenizer: Any, opts: TextOptions, *, max_positions: int | None = None, is_causal: bool = True
) -> TextSample:
    """Read the text that ``opts`` names and cut it into fixed-length token batches.

    Sources: ``opts.paths`` (files and folders), ``opts.dataset`` or, when neither is given, the built-in
    prompt set of :mod:`normscope.core.prompts` (plus random-token and repeated-token controls when
    ``opts.controls``). Windows hold ``seq_len`` tokens: a BOS and ``seq_len - 1`` text tokens when BOS is
    prepended, ``[CLS]`` + ``seq_len - 2`` + ``[SEP]`` for encoders (``is_causal=False``), else ``seq_len``
    text tokens. The order of sequences is fixed; ``opts.seed`` drives the controls.
    """
    _validate(opts, max_positions, is_causal)
    specials = _resolve_specials(tokenizer, opts.bos, is_causal)
    text_len = opts.seq_len - len(specials.prefix) - len(specials.suffix)
    max_sequences = opts.max_tokens // opts.seq_len
    stats = _Stats()
    files: list[str] = []
    documents: Iterator[tuple[str, Iterable[str]]]
    controls: list[tuple[str, list[int]]] = []

    if opts.paths:
        found = collect_files(list(opts.paths))
        files = [name for _, name in found]
        source = _source_for_files(list(opts.paths), found)
        documents = _files_documents(found, opts, stats)
        text_budget = max_sequences
    elif opts.dataset:
        name, config, split = parse_dataset_spec(opts.dataset)
        shown = Path(name).name if Path(name).expanduser().exists() else name  # no local absolute paths
        source = f"dataset {':'.join(x for x in (shown, config, split) if x)}"
        documents = _dataset_documents(opts.dataset, opts.jsonl_field)
        text_budget = max_sequences
    else:
        from normscope.core import prompts

        docs = prompts.builtin_documents()
        source = f"built-in prompts ({len(docs)} documents)"
        documents = ((d.category, [d.text]) for d in docs)
        n_each = min(CONTROLS_PER_KIND, max_sequences // 8) if opts.controls else 0
        if n_each:
            controls = prompts.control_sequences(
                tokenizer, n_each, text_len, seed=opts.seed, prefix=specials.prefix, suffix=specials.suffix
            )
        text_budget = max_sequences - len(controls)

    collector = _Collector(opts.seq_len, opts.batch_size, text_budget)
    try:
        while not collector.full:  # check before pulling the next document, so unread files are not opened
            nxt = next(documents, None)
            if nxt is None:
                break
            _window_document(nxt[1], nxt[0], tokenizer, specials, text_len, collector, stats)
    finally:
        close = getattr(documents, "close", None)
        if close is not None:
            close()
    truncated = collector.full
    if collector.n_sequences == 0:
        raise NormscopeError(
            f"The text needs at least {text_len} tokens, got {stats.longest} (longest document, "
            f"--seq-len {opts.seq_len}); give more text or a smaller --seq-len."
        )
    collector.max_sequences = max_sequences
    for category, ids in controls:
        collector.add(ids, category)
    collector.flush()
    return TextSample(
        batches=collector.batches,
        source=source,
        n_tokens=collector.n_sequences * opts.seq_len,
        n_sequences=collector.n_sequences,
        seq_len=opts.seq_len,
        bos_prepended=specials.bos_prepended,
        categories=dict(collector.counts),
        specials=specials.label,
        n_documents=stats.n_documents,
        n_documents_dropped=stats.n_dropped,
        n_documents_packed=stats.n_packed,
        bytes_read=stats.bytes_read,
        truncated=truncated,
        files=files,
        seed=opts.seed,
        max_tokens=opts.max_tokens,
        batch_size=opts.batch_size,
    )


def sample_from_ids(
    rows: list[list[int]], categories: list[str], *, batch_size: int = 8, source: str = "token ids",
    bos_prepended: bool = False,
) -> TextSample:
    """Wrap ready-made fixed-length token rows (e.g. from a test or another tool) as a TextSample."""
    if not rows:
        raise NormscopeError("No token sequences were given; give at least one.")
    seq_len = len(rows[0])
    if any(len(r) != seq_len for r in rows) or len(categories) != len(rows):
        raise NormscopeError("Token sequences must all have the same length and one category each.")
    collector = _Collector(seq_len, batch_size, len(rows))
    for r, c in zip(rows, categories, strict=True):
        collector.add(list(r), c)
    collector.flush()
    return TextSample(
        batches=collector.batches, source=source, n_tokens=len(rows) * seq_len, n_sequences=len(rows),
        seq_len=seq_len, bos_prepended=bos_prepended, categories=dict(collector.counts),
        specials="bos" if bos_prepended else "none", batch_size=batch_size,
    )


__all__: list[str] = [
    "TextOptions", "TokenBatch", "TextSample", "load_text", "encode", "tokenizer_adds_bos",
    "split_at_whitespace", "stream_text", "collect_files", "parse_dataset_spec", "sample_from_ids",
    "CHUNK_BYTES",
]
