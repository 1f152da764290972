"""Tests for normscope.core.text (files / dataset / built-in prompts -> fixed-length token batches) and prompts."""

from __future__ import annotations

import json
import re
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from scipy import stats as sstats
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from normscope.core import prompts, sources, text
from normscope.core.errors import NormscopeError
from normscope.core.text import TextOptions, load_text

N_WORDS = 100  # tiny word-level vocabulary: w0 ... w99
SPECIALS = ["[UNK]", "<s>", "</s>", "[CLS]", "[SEP]"]


# -------------------------------------------------------------------------------- fixtures


def _word_vocab() -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for i in range(N_WORDS):
        vocab[f"w{i}"] = len(vocab)
    vocab["é"] = len(vocab)
    return vocab


def _word_tokenizer(post: str | None = None) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer on whitespace; post='bos' adds <s> itself, post='bert' adds [CLS] ... [SEP]."""
    vocab = _word_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    elif post == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    kwargs = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if post == "bert" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", **kwargs
    )


@pytest.fixture(scope="module")
def wtok() -> PreTrainedTokenizerFast:
    return _word_tokenizer()


@pytest.fixture(scope="module")
def wtok_bos() -> PreTrainedTokenizerFast:
    return _word_tokenizer("bos")


@pytest.fixture(scope="module")
def wtok_bert() -> PreTrainedTokenizerFast:
    return _word_tokenizer("bert")


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the built-in documents (so it covers them with real merges)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([d.text for d in prompts.builtin_documents()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", pad_token="<pad>")


def _words(n: int, start: int = 0) -> list[str]:
    return [f"w{(start + i * 7) % N_WORDS}" for i in range(n)]


def _ids(words: list[str]) -> list[int]:
    vocab = _word_vocab()
    return [vocab[w] for w in words]


def _all_rows(sample: text.TextSample) -> torch.Tensor:
    return torch.cat([b.input_ids for b in sample.iter_batches()])  # [n_sequences, seq_len]


def _all_cats(sample: text.TextSample) -> list[str]:
    return [c for b in sample.iter_batches() for c in b.categories]


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 300
    return msg


# -------------------------------------------------------------------------------- windows


def test_windows_match_direct_tokenization(tmp_path: Path, wtok) -> None:
    words = _words(1000)
    (tmp_path / "a.txt").write_text(" ".join(words))
    s = load_text(wtok, TextOptions(paths=[tmp_path / "a.txt"], seq_len=64, batch_size=5))
    direct = torch.tensor(_ids(words))  # [1000]
    n = 1000 // 64
    rows = _all_rows(s)
    assert rows.shape == (n, 64) and rows.dtype == torch.long
    assert torch.equal(rows, direct[: n * 64].view(n, 64))  # tail of 1000 - 15*64 = 40 tokens dropped
    assert s.n_sequences == n and s.n_tokens == n * 64 and s.seq_len == 64
    assert [len(b) for b in s.batches] == [5, 5, 5]
    for b in s.batches:
        assert b.attention_mask.dtype == torch.long and bool((b.attention_mask == 1).all())
        assert b.attention_mask.shape == b.input_ids.shape
    assert s.categories == {"file:a.txt": n} and not s.bos_prepended and s.specials == "none"
    assert s.n_documents == 1 and s.n_documents_dropped == 0 and not s.truncated


def test_a_folder_of_one_line_files_is_packed_into_windows(tmp_path: Path, wtok) -> None:
    d = tmp_path / "lines"
    d.mkdir()
    lines = [_words(10, i) for i in range(20)]  # 20 files of 10 words: none fills a 32-token window
    for i, words in enumerate(lines):
        (d / f"{i:02d}.txt").write_text(" ".join(words))
    s = load_text(wtok, TextOptions(paths=[d], seq_len=32))
    eos = wtok.eos_token_id
    rows = _all_rows(s).tolist()
    assert len(rows) >= 5 and _all_cats(s) == ["packed"] * len(rows)
    flat = [t for r in rows for t in r if t != eos]  # the documents in file order, EOS between them
    assert flat == [t for words in lines for t in _ids(words)][: len(flat)]
    assert any(eos in r for r in rows)
    assert s.n_documents == 20 and s.n_documents_packed + s.n_documents_dropped == 20
    assert s.n_documents_packed >= 18


def test_each_document_starts_fresh_and_short_ones_are_dropped(tmp_path: Path, wtok) -> None:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    a, b, short = _words(150, 1), _words(70, 2), _words(20, 3)
    (d / "a.txt").write_text(" ".join(a))
    (d / "sub" / "b.md").write_text(" ".join(b))
    (d / "c.jsonl").write_text(
        json.dumps({"text": " ".join(short)}) + "\n\n" + json.dumps({"text": " ".join(a), "id": 2}) + "\n"
    )
    (d / "ignored.csv").write_text(" ".join(a))
    (d / ".hidden.txt").write_text(" ".join(a))
    s = load_text(wtok, TextOptions(paths=[d], seq_len=64))
    rows = _all_rows(s)
    # sorted order: a.txt (2 windows), c.jsonl (short record dropped, then 2 windows), sub/b.md (1 window)
    expect = [_ids(a)[:64], _ids(a)[64:128], _ids(a)[:64], _ids(a)[64:128], _ids(b)[:64]]
    assert rows.tolist() == expect
    assert _all_cats(s) == ["file:a.txt"] * 2 + ["file:c.jsonl"] * 2 + ["file:sub/b.md"]
    assert s.files == ["a.txt", "c.jsonl", "sub/b.md"]
    assert s.n_documents == 4 and s.n_documents_dropped == 1
    assert s.source == "3 files under data/"
    info = s.to_dict()
    dumped = json.dumps(info)
    assert str(tmp_path) not in dumped and info["n_sequences"] == 5 and info["n_documents_dropped"] == 1


def test_max_tokens_stops_early_and_keeps_order(tmp_path: Path, wtok) -> None:
    words = _words(2000)
    (tmp_path / "a.txt").write_text(" ".join(words))
    (tmp_path / "b.txt").write_text("")  # never opened: the budget is spent before it
    s = load_text(wtok, TextOptions(paths=[tmp_path], seq_len=32, max_tokens=32 * 10 + 5))
    assert s.n_sequences == 10 and s.truncated
    assert _all_rows(s).tolist() == [_ids(words)[32 * i : 32 * (i + 1)] for i in range(10)]


# -------------------------------------------------------------------------------- BOS / encoders


def test_bos_auto_follows_the_tokenizer(tmp_path: Path, wtok, wtok_bos) -> None:
    words = _words(300)
    (tmp_path / "a.txt").write_text(" ".join(words))
    assert text.tokenizer_adds_bos(wtok_bos) and not text.tokenizer_adds_bos(wtok)
    bos = wtok_bos.bos_token_id
    s = load_text(wtok_bos, TextOptions(paths=[tmp_path / "a.txt"], seq_len=64))
    rows = _all_rows(s)
    assert s.bos_prepended and s.specials == "bos"
    assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()
    n = 300 // 63
    assert rows.shape == (n, 64)
    assert rows[:, 1:].tolist() == [_ids(words)[63 * i : 63 * (i + 1)] for i in range(n)]
    s_no = load_text(wtok, TextOptions(paths=[tmp_path / "a.txt"], seq_len=64))
    assert not s_no.bos_prepended and _all_rows(s_no).tolist()[0] == _ids(words)[:64]


def test_bos_yes_and_no_override(tmp_path: Path, wtok, wtok_bos) -> None:
    words = _words(200)
    (tmp_path / "a.txt").write_text(" ".join(words))
    yes = load_text(wtok, TextOptions(paths=[tmp_path / "a.txt"], seq_len=50, bos="yes"))
    assert yes.bos_prepended and _all_rows(yes)[0].tolist() == [wtok.bos_token_id] + _ids(words)[:49]
    no = load_text(wtok_bos, TextOptions(paths=[tmp_path / "a.txt"], seq_len=50, bos="no"))
    assert not no.bos_prepended and _all_rows(no)[0].tolist() == _ids(words)[:50]
    with pytest.raises(NormscopeError, match="BOS policy") as ei:
        load_text(wtok, TextOptions(paths=[tmp_path / "a.txt"], bos="maybe"))
    _one_line_error(ei)
    nobos = PreTrainedTokenizerFast(tokenizer_object=wtok.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(NormscopeError, match="no BOS token") as ei:
        load_text(nobos, TextOptions(paths=[tmp_path / "a.txt"], bos="yes"))
    _one_line_error(ei)


def test_encoder_windows_get_cls_and_sep(tmp_path: Path, wtok_bert) -> None:
    words = _words(260)
    (tmp_path / "a.txt").write_text(" ".join(words))
    s = load_text(wtok_bert, TextOptions(paths=[tmp_path / "a.txt"], seq_len=32, bos="yes"), is_causal=False)
    rows = _all_rows(s)
    cls, sep = wtok_bert.cls_token_id, wtok_bert.sep_token_id
    n = 260 // 30
    assert rows.shape == (n, 32) and s.specials == "cls+sep" and not s.bos_prepended
    assert (rows[:, 0] == cls).all() and (rows[:, -1] == sep).all()
    assert rows[:, 1:-1].tolist() == [_ids(words)[30 * i : 30 * (i + 1)] for i in range(n)]
    with pytest.raises(NormscopeError, match="at least 4") as ei:
        load_text(wtok_bert, TextOptions(paths=[tmp_path / "a.txt"], seq_len=3), is_causal=False)
    _one_line_error(ei)
    with pytest.raises(NormscopeError, match=r"\[CLS\]") as ei:
        load_text(_word_tokenizer(), TextOptions(paths=[tmp_path / "a.txt"], seq_len=32), is_causal=False)
    _one_line_error(ei)


# -------------------------------------------------------------------------------- streaming


def test_streaming_stops_after_the_first_chunk(tmp_path: Path, wtok) -> None:
    big = tmp_path / "big.txt"
    line = " ".join(_words(N_WORDS)) + "\n"  # ~390 bytes
    with open(big, "w") as f:
        for _ in range(24 * (1 << 20) // len(line)):  # 24 MiB
            f.write(line)
    size = big.stat().st_size
    tracemalloc.start()
    try:
        s = load_text(wtok, TextOptions(paths=[big], seq_len=64, max_tokens=64 * 40))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.n_sequences == 40 and s.truncated
    assert s.bytes_read == text.CHUNK_BYTES < size / 20
    assert peak < 8 * text.CHUNK_BYTES  # a few chunks, never the 24 MiB file
    assert _all_rows(s).view(-1).tolist() == _ids(line.split() * 30)[: 64 * 40]


def test_small_chunks_give_the_same_windows(tmp_path: Path, wtok, monkeypatch) -> None:
    words = _words(3000) + ["é"] * 5 + _words(500)  # multi-byte characters straddle some chunk borders
    p = tmp_path / "a.txt"
    p.write_text("  ".join(words[:10]) + "\n\n" + " ".join(words[10:]) + "\n", encoding="utf-8")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 997)
    monkeypatch.setattr(text, "TOKENIZE_CHARS", 301)
    pieces = list(text.stream_text(p, "a.txt"))
    assert len(pieces) > 10 and "".join(pieces) == p.read_text(encoding="utf-8")
    assert all(piece[:1].isspace() for piece in pieces[1:])  # cut before a whitespace run
    s = load_text(wtok, TextOptions(paths=[p], seq_len=100, max_tokens=10**6))
    n = len(words) // 100
    assert _all_rows(s).tolist() == [_ids(words)[100 * i : 100 * (i + 1)] for i in range(n)]
    assert s.bytes_read == p.stat().st_size


def test_split_at_whitespace() -> None:
    t = "aaa bbb   ccc dddddddddddd e"
    pieces = list(text.split_at_whitespace(t, 8))
    assert "".join(pieces) == t and all(len(x) <= 8 for x in pieces)
    assert pieces[:3] == ["aaa bbb", "   ccc", " ddddddd"]  # runs stay together; no whitespace: hard cut


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "is empty"),
        (b"w1 w2 \x00\x01 w3" * 10, "binary.*offset 6"),
        (b"w1 w2 w3 \xff w4" + b" w5" * 100, "not valid UTF-8.*offset 9"),
        (b"  \n\t \n" * 50, "only whitespace"),
        (b"w1 w2 w3", r"needs at least 64 tokens, got 3 \(.*\); give more text or a smaller --seq-len\.$"),
    ],
)
def test_file_errors(tmp_path: Path, wtok, content: bytes, pattern: str) -> None:
    p = tmp_path / "doc.txt"
    p.write_bytes(content)
    with pytest.raises(NormscopeError, match=pattern) as ei:
        load_text(wtok, TextOptions(paths=[p], seq_len=64))
    msg = _one_line_error(ei)
    if "bad byte" in msg or "binary" in msg or "empty" in msg or "whitespace" in msg:
        assert "doc.txt" in msg and str(tmp_path) not in msg


def test_utf8_error_offset_in_a_later_chunk(tmp_path: Path, wtok, monkeypatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)
    data = ("w1 é " * 60).encode()  # é is 2 bytes: some chunks end inside it
    p = tmp_path / "late.txt"
    p.write_bytes(data + b"\xc3(" + b" w2" * 10)
    with pytest.raises(
        NormscopeError, match=rf"late.txt is not valid UTF-8 \(bad byte at offset {len(data)}\)"
    ):
        load_text(wtok, TextOptions(paths=[p], seq_len=64, max_tokens=10**6))


def test_path_and_folder_errors(tmp_path: Path, wtok) -> None:
    with pytest.raises(NormscopeError, match="does not exist") as ei:
        load_text(wtok, TextOptions(paths=[tmp_path / "nope.txt"]))
    _one_line_error(ei)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(NormscopeError, match=r"nothing/ has no \.txt, \.jsonl or \.md files") as ei:
        load_text(wtok, TextOptions(paths=[empty_dir]))
    _one_line_error(ei)


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([{"text": "w1 " * 80}, "{not json"], r"d\.jsonl line 2 is not valid JSON"),
        ([{"text": "w1 " * 80}, {"text": "w2"}, {"body": "w3"}], r"d\.jsonl line 3 has no field 'text'"),
        ([{"text": 5}], r"d\.jsonl line 1: field 'text' is a int, not a string"),
        ([{"text": "  "}, {"text": "\n"}], r"d\.jsonl has only whitespace in field 'text'"),
    ],
)
def test_jsonl_errors(tmp_path: Path, wtok, lines: list, pattern: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(NormscopeError, match=pattern) as ei:
        load_text(wtok, TextOptions(paths=[p], seq_len=64, max_tokens=10**6))
    _one_line_error(ei)


def test_jsonl_field_option(tmp_path: Path, wtok) -> None:
    p = tmp_path / "d.jsonl"
    words = _words(64)
    p.write_text(json.dumps({"body": " ".join(words)}) + "\n")
    s = load_text(wtok, TextOptions(paths=[p], seq_len=64, jsonl_field="body"))
    assert _all_rows(s).tolist() == [_ids(words)]


@pytest.mark.parametrize(
    ("opts", "kwargs", "pattern"),
    [
        (TextOptions(seq_len=1), {}, "at least 2"),
        (TextOptions(seq_len=600), {"max_positions": 512}, "beyond this model's 512 positions"),
        (TextOptions(seq_len=64, max_tokens=63), {}, "--max-tokens 63 is less than one sequence"),
        (TextOptions(batch_size=0), {}, "--batch-size"),
        (TextOptions(paths=[Path("x.txt")], dataset="wikitext"), {}, "not both"),
        (TextOptions(dataset="a:b:c:d"), {}, "NAME:CONFIG:SPLIT"),
    ],
)
def test_option_errors(wtok, opts: TextOptions, kwargs: dict, pattern: str) -> None:
    with pytest.raises(NormscopeError, match=pattern) as ei:
        load_text(wtok, opts, **kwargs)
    _one_line_error(ei)


def test_dataset_without_the_package_or_offline(wtok, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "datasets", None)  # import fails as if not installed
        with pytest.raises(NormscopeError, match="needs the `datasets` package") as ei:
            load_text(wtok, TextOptions(dataset="wikitext:test"))
        _one_line_error(ei)
    pytest.importorskip("datasets")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(NormscopeError, match="cannot be reached") as ei:
        load_text(wtok, TextOptions(dataset="wikitext:wikitext-2-raw-v1:test"))
    _one_line_error(ei)
    assert text.parse_dataset_spec("wikitext") == ("wikitext", None, "train")
    assert text.parse_dataset_spec("wikitext:cfg:test") == ("wikitext", "cfg", "test")


def test_dataset_from_a_local_folder(tmp_path: Path, wtok) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "mydata"
    folder.mkdir()
    docs = [_words(100, i) for i in range(3)] + [_words(10)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": " ".join(d)}) + "\n" for d in docs))
    s = load_text(wtok, TextOptions(dataset=f"{folder}:train", seq_len=64))
    assert s.source == "dataset mydata:train" and str(tmp_path) not in json.dumps(s.to_dict())
    assert _all_rows(s).tolist() == [_ids(d)[:64] for d in docs[:3]]
    assert s.n_documents == 4 and s.n_documents_dropped == 1 and s.categories == {"dataset:mydata": 3}
    with pytest.raises(NormscopeError, match="no column 'body'") as ei:
        load_text(wtok, TextOptions(dataset=f"{folder}:train", jsonl_field="body"))
    _one_line_error(ei)


# -------------------------------------------------------------------------------- built-in set


def test_builtin_documents_are_varied_and_sized() -> None:
    docs = prompts.builtin_documents()
    assert 28 <= len(docs) <= 40 and len({d.title for d in docs}) == len(docs)
    for d in docs:
        n_words = len([w for w in d.text.split() if re.search(r"\w", w)])
        assert 150 <= n_words <= 400, (d.title, n_words)
    cats = [d.category for d in docs]
    assert set(cats) == set(prompts.CATEGORIES) and all(cats.count(c) >= 4 for c in prompts.CATEGORIES)
    assert cats[:5] == list(prompts.CATEGORIES)  # interleaved, so a small budget still sees every category
    code = " ".join(d.text for d in docs if d.category == "code")
    assert "def " in code and "function " in code and "SELECT" in code and "--" in code and "#" in code


def test_builtin_windows_and_controls(bpe_tok) -> None:
    docs = prompts.builtin_documents()
    s = load_text(bpe_tok, TextOptions(seq_len=64, max_tokens=10**6, seed=3, controls=True))
    rows, cats = _all_rows(s), _all_cats(s)
    expect: list[list[int]] = []
    for d in docs:
        ids = bpe_tok(d.text, add_special_tokens=False)["input_ids"]
        expect += [ids[64 * i : 64 * (i + 1)] for i in range(len(ids) // 64)]
    n_text = len(expect)
    assert rows[:n_text].tolist() == expect
    assert cats[n_text:] == ["random"] * 4 + ["repeated"] * 4 and len(cats) == n_text + 8
    assert s.source == f"built-in prompts ({len(docs)} documents)" and s.categories["random"] == 4
    special = prompts.special_token_ids(bpe_tok)
    ctrl = rows[n_text:]  # [8, 64]
    assert not any(int(t) in special for t in ctrl.view(-1))
    assert all(len(set(r.tolist())) == 1 for r in ctrl[4:])  # one token repeated
    assert len({int(r[0]) for r in ctrl[4:]}) == 4
    assert all(len(set(r.tolist())) > 40 for r in ctrl[:4])  # random: nearly all distinct
    no_ctrl = load_text(bpe_tok, TextOptions(seq_len=64, max_tokens=10**6))  # the default: no controls
    assert "random" not in no_ctrl.categories and no_ctrl.n_sequences == n_text
    small = load_text(bpe_tok, TextOptions(seq_len=64, max_tokens=64 * 16, controls=True))
    assert small.n_sequences == 16 and small.categories["random"] == 2 and small.categories["repeated"] == 2
    assert small.truncated


def test_determinism_and_seed(bpe_tok) -> None:
    a = load_text(bpe_tok, TextOptions(seed=0, controls=True))
    b = load_text(bpe_tok, TextOptions(seed=0, controls=True))
    c = load_text(bpe_tok, TextOptions(seed=1, controls=True))
    ra, rb, rc = _all_rows(a), _all_rows(b), _all_rows(c)
    assert torch.equal(ra, rb) and _all_cats(a) == _all_cats(b) and a.to_dict() == b.to_dict()
    is_rand = torch.tensor([x == "random" for x in _all_cats(a)])
    assert not torch.equal(ra[is_rand], rc[is_rand])
    text_rows = torch.tensor([x not in ("random", "repeated") for x in _all_cats(a)])
    assert torch.equal(ra[text_rows], rc[text_rows])


def test_random_controls_are_uniform_over_ordinary_tokens(wtok_bert) -> None:
    wtok = wtok_bert  # all five specials registered as special tokens
    seqs = torch.tensor(prompts.random_token_sequences(wtok, 100, 300, seed=7))  # [100, 300]
    ordinary = prompts.ordinary_token_ids(wtok)
    assert set(ordinary.tolist()) == set(range(len(wtok))) - set(_word_vocab()[t] for t in SPECIALS)
    counts = torch.bincount(seqs.view(-1), minlength=len(wtok))[ordinary]  # [n_ordinary]
    assert int(counts.sum()) == seqs.numel() and (counts > 0).all()
    assert sstats.chisquare(counts.numpy()).pvalue > 1e-4
    again = prompts.random_token_sequences(wtok, 3, 20, seed=7)
    assert again == prompts.random_token_sequences(wtok, 3, 20, seed=7)
    assert again != prompts.random_token_sequences(wtok, 3, 20, seed=8)


def test_repeated_controls_pick_ordinary_single_tokens(wtok, bpe_tok) -> None:
    seqs = prompts.repeated_token_sequences(bpe_tok, 3, 16, seed=0)
    the = bpe_tok(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1 and all(len(set(s)) == 1 and len(s) == 16 for s in seqs)
    words = {bpe_tok.decode([s[0]]) for s in seqs}
    assert words <= set(prompts.REPEAT_CANDIDATES)
    # the word-level tokenizer knows none of the candidate words: falls back to seeded ordinary ids
    ids = prompts.repeated_token_ids(wtok, 5, seed=0)
    assert len(set(ids)) == 5 and not set(ids) & prompts.special_token_ids(wtok)


# -------------------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    return smollm2.tokenizer


@pytest.mark.slow
def test_builtin_set_with_smollm2_tokenizer(smol_tok) -> None:
    assert not text.tokenizer_adds_bos(smol_tok)  # SmolLM2 adds no BOS: auto keeps position 0 a real word
    s = load_text(smol_tok, TextOptions(max_tokens=16384, controls=True))
    assert s.n_sequences == 256 and s.n_tokens == 16384 and not s.bos_prepended
    assert all(s.categories[c] >= 20 for c in prompts.CATEGORIES)
    assert s.categories["random"] == 4 and s.categories["repeated"] == 4
    default = load_text(smol_tok, TextOptions())  # every command's default: 2,048 tokens at T = 64, no controls
    assert default.n_tokens == 2048 and default.n_sequences == 32 and set(default.categories) <= set(prompts.CATEGORIES)
    first = prompts.builtin_documents()[0].text
    assert s.batches[0].input_ids[0].tolist() == smol_tok(first, add_special_tokens=False)["input_ids"][:64]
    full = load_text(smol_tok, TextOptions(max_tokens=10**6, controls=True))
    assert full.n_sequences - 8 >= 128 and full.n_documents_dropped == 0
    long = load_text(smol_tok, TextOptions(seq_len=128, max_tokens=10**6, controls=True))
    assert long.n_sequences - 8 >= 100
    special = prompts.special_token_ids(smol_tok)
    assert len(special) >= 3 and smol_tok.bos_token_id in special
    ctrl = torch.cat([b.input_ids for b in full.batches])[-8:]  # [8, 64]
    assert not any(int(t) in special for t in ctrl.view(-1))
    assert {smol_tok.decode([int(t)]) for t in ctrl[4:, 0]} <= set(prompts.REPEAT_CANDIDATES)
    assert all(len(set(r.tolist())) == 1 for r in ctrl[4:])
    with_bos = load_text(smol_tok, TextOptions(bos="yes"))
    assert (with_bos.batches[0].input_ids[:, 0] == smol_tok.bos_token_id).all() and with_bos.bos_prepended


@pytest.mark.slow
def test_real_bert_tokenizer_frames_windows(minilm) -> None:
    tok, info = minilm.tokenizer, minilm.info
    assert not info.is_causal and info.max_positions == 512
    s = load_text(tok, TextOptions(seq_len=64, max_tokens=16384, controls=True), max_positions=info.max_positions,
                  is_causal=info.is_causal)
    rows = _all_rows(s)  # [n, 64]
    assert s.specials == "cls+sep" and s.n_sequences >= 200 and s.categories["repeated"] == 4
    assert (rows[:, 0] == tok.cls_token_id).all() and (rows[:, -1] == tok.sep_token_id).all()
    first = prompts.builtin_documents()[0].text
    assert rows[0, 1:-1].tolist() == tok(first, add_special_tokens=False)["input_ids"][:62]
    body = rows[:, 1:-1]
    assert not ((body == tok.cls_token_id) | (body == tok.sep_token_id) | (body == tok.pad_token_id)).any()
    with pytest.raises(NormscopeError, match="beyond this model's 512 positions"):
        load_text(tok, TextOptions(seq_len=1024), max_positions=info.max_positions, is_causal=False)


@pytest.mark.slow
def test_streamed_file_tokenizes_like_the_whole_text(smol_tok, tmp_path: Path, monkeypatch) -> None:
    """Chunked reading + piecewise tokenization with the real byte-level BPE equals one-shot tokenization."""
    body = "\n\n".join(d.text for d in prompts.builtin_documents())
    p = tmp_path / "all.md"
    p.write_text(body, encoding="utf-8")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(text, "TOKENIZE_CHARS", 1000)
    s = load_text(smol_tok, TextOptions(paths=[p], seq_len=128, max_tokens=10**6))
    direct = smol_tok(body, add_special_tokens=False)["input_ids"]
    got = _all_rows(s).view(-1).tolist()
    assert len(got) == len(direct) // 128 * 128 > 10_000 and got == direct[: len(got)]
