"""The one block-selection grammar every command shares (``--layers``, ``--skip-layers``)."""

from __future__ import annotations

import pytest

from normscope.core.errors import NormscopeError
from normscope.core.layers import check_syntax, parse_layers


def test_indices_ranges_words_and_negatives() -> None:
    assert parse_layers("0-3, 7,9-9", 10) == [0, 1, 2, 3, 7, 9]
    assert parse_layers(None, 10) is None and parse_layers("  ", 10) is None
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers("none", 4) == []
    assert parse_layers("-1", 10) == [9] and parse_layers("0,-3--1", 10) == [0, 7, 8, 9]


@pytest.mark.parametrize("bad", ["a-b", "1-", "3,,4", "1.5", "0-x", "5--"])
def test_malformed_is_refused_before_anything_loads(bad: str) -> None:
    with pytest.raises(NormscopeError, match="--skip-layers .* is malformed"):
        check_syntax(bad, "--skip-layers")
    with pytest.raises(NormscopeError, match="malformed"):
        parse_layers(bad, 10)


def test_out_of_range_and_backwards() -> None:
    with pytest.raises(NormscopeError, match="blocks 0-9"):
        parse_layers("5-10", 10)
    with pytest.raises(NormscopeError, match="blocks 0-9"):
        parse_layers("-11", 10)
    with pytest.raises(NormscopeError, match="backwards"):
        check_syntax("5-3", "--layers")
    with pytest.raises(NormscopeError, match="backwards"):
        parse_layers("-1-2", 10)  # block 9 to block 2
