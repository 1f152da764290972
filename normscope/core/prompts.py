"""The built-in prompt set and the control sequences of Gu et al. 2024.

The documents (``normscope/data/prompts.json``) were written for normscope (original text, free to reuse with
the project). They cover prose (narrative, expository, news-like), code (Python, JavaScript, SQL with comments),
numbers and tables, dialogue, and lists or instructions, so that an analysis run with no text of its own still
sees varied English. Each document has 150-400 words.

Controls follow Gu et al. 2024 ("When Attention Sink Emerges in Language Models: An Empirical View",
Sec. 3), who compare sink rates on natural text, on sequences of tokens drawn uniformly from the vocabulary,
and on one token repeated: a random-token sequence is uniform over the vocabulary minus special tokens
(seeded), a repeated-token sequence is one ordinary token repeated.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

CATEGORIES = ("prose", "code", "numbers", "dialogue", "list")
CONTROL_CATEGORIES = ("random", "repeated")
# Common words tried, in a seeded order, as the repeated token; only those that are one ordinary token count.
REPEAT_CANDIDATES = (" the", " water", " house", " and", " time", " light", " of", " stone", "the", "a", ".")


@dataclass(frozen=True)
class Prompt:
    """One built-in document."""

    category: str  # one of CATEGORIES
    title: str
    text: str


def builtin_documents() -> list[Prompt]:
    """All built-in documents from ``normscope/data/prompts.json``, interleaved by category (prose, code,
    numbers, dialogue, list, prose, ...): interleaving keeps every category represented when ``max_tokens``
    cuts the set short."""
    return list(_documents())


@functools.cache
def _documents() -> tuple[Prompt, ...]:
    raw = json.loads(resources.files("normscope").joinpath("data/prompts.json").read_text(encoding="utf-8"))
    return tuple(Prompt(d["category"], d["title"], d["text"]) for d in raw["documents"])


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of all special tokens: the named ones and every added token marked special."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return ids


def ordinary_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the vocabulary without special tokens, ascending.  # [n_ordinary] long"""
    special = special_token_ids(tokenizer)
    keep = [i for i in range(len(tokenizer)) if i not in special]
    return torch.tensor(keep, dtype=torch.long)


def random_token_sequences(tokenizer: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences of ``length`` tokens drawn uniformly (with replacement) from the ordinary vocabulary.

    Gu et al. 2024 (Sec. 3): sink rates on random-token inputs. Seeded with a private generator, so the
    result depends only on the tokenizer, ``n``, ``length`` and ``seed``.
    """
    pool = ordinary_token_ids(tokenizer)  # [n_ordinary]
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, len(pool), (n, length), generator=gen)  # [n, length]
    return pool[idx].tolist()


def repeated_token_ids(tokenizer: Any, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct ordinary tokens to repeat: common words that are one token, then seeded random ids."""
    special = special_token_ids(tokenizer)
    candidates: list[int] = []
    for word in REPEAT_CANDIDATES:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and int(ids[0]) not in special and int(ids[0]) not in candidates:
            candidates.append(int(ids[0]))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    order = torch.randperm(len(candidates), generator=gen).tolist()
    chosen = [candidates[i] for i in order][:n]
    if len(chosen) < n:
        pool = [i for i in ordinary_token_ids(tokenizer).tolist() if i not in chosen]
        extra = torch.randperm(len(pool), generator=gen)[: n - len(chosen)].tolist()
        chosen += [pool[i] for i in extra]
    return chosen


def repeated_token_sequences(tokenizer: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences, each one ordinary token repeated ``length`` times (Gu et al. 2024, Sec. 3)."""
    return [[tok] * length for tok in repeated_token_ids(tokenizer, n, seed)]


def control_sequences(
    tokenizer: Any, n_each: int, text_len: int, *, seed: int = 0,
    prefix: Sequence[int] = (), suffix: Sequence[int] = (),
) -> list[tuple[str, list[int]]]:
    """(category, ids) for ``n_each`` random-token and ``n_each`` repeated-token controls.

    The body holds ``text_len`` tokens and is framed by the same specials as text windows (BOS, or
    [CLS] ... [SEP]), so controls and text differ only in their content.
    """
    out: list[tuple[str, list[int]]] = []
    for body in random_token_sequences(tokenizer, n_each, text_len, seed):
        out.append(("random", [*prefix, *body, *suffix]))
    for body in repeated_token_sequences(tokenizer, n_each, text_len, seed):
        out.append(("repeated", [*prefix, *body, *suffix]))
    return out
