"""Tokens as a reader can see them on a page or a terminal.

Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) split an emoji or an accented letter into several tokens,
and decoding one of them alone gives the replacement character U+FFFD. :func:`token_text` shows such a token
by its bytes instead (``\\xf0\\x9f``), so that two different byte tokens never look alike.
"""

from __future__ import annotations

import functools
from typing import Any

REPLACEMENT = "\ufffd"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(piece: str) -> bytes | None:
    """The bytes of a byte-level BPE token string (``"Ġthe"`` -> ``b" the"``), or None if it is not one."""
    table = _unicode_to_byte()
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # sentencepiece byte fallback
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    if not piece or any(c not in table for c in piece):
        return None
    return bytes(table[c] for c in piece)


def token_text(tokenizer: Any, token_id: int) -> str:
    """``tokenizer.decode([token_id])``, or the token's bytes escaped (``\\xe2\\x80``) when the decoded text is
    a replacement character (part of a multi-byte character); ``<id>`` when the tokenizer cannot decode it."""
    try:
        text = str(tokenizer.decode([int(token_id)]))
    except Exception:
        return f"<{int(token_id)}>"
    if REPLACEMENT not in text:
        return text
    try:
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
    except Exception:
        piece = None
    raw = token_bytes(piece) if isinstance(piece, str) else None
    if raw is None:
        return text.replace(REPLACEMENT, f"<{int(token_id)}>")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)
