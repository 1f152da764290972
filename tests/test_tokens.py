"""Tokens shown readably: byte-level pieces of one character are shown by their bytes, not as U+FFFD."""

from __future__ import annotations

import pytest

from normscope.core.tokens import REPLACEMENT, token_bytes, token_text


def test_token_bytes_of_byte_level_and_sentencepiece_pieces() -> None:
    assert token_bytes("\u0120the") == b" the"  # GPT-2's "Ġ" is the space byte
    assert token_bytes("<0xF0>") == b"\xf0"
    assert token_bytes("hello\u4e16") is None  # not a byte-level string


@pytest.mark.slow
def test_emoji_pieces_on_the_bundled_tokenizer(smollm2) -> None:
    tok = smollm2.tokenizer
    ids = tok(" \U0001f917 caf\u00e9", add_special_tokens=False)["input_ids"]
    plain = [tok.decode([i]) for i in ids]
    shown = [token_text(tok, i) for i in ids]
    assert any(REPLACEMENT in p for p in plain)  # decoding the pieces alone gives replacement characters
    assert not any(REPLACEMENT in s for s in shown)
    assert "".join(shown).startswith(" \\xf0\\x9f") and shown[-1] == " caf\u00e9"
    assert len(set(shown)) == len(set(ids))  # different byte tokens never look alike
