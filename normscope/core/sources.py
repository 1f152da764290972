"""Where text comes from: files and folders (streamed, checked for binary and bad encodings, one line per
error) and datasets (when online). :mod:`normscope.core.text` cuts what these yield into token windows."""

from __future__ import annotations

import codecs
import json
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normscope.core.errors import NormscopeError
from normscope.core.options import TextOptions

CHUNK_BYTES = 1 << 20  # bytes read from a file at a time
SNIFF_BYTES = 1024  # bytes checked for NUL to spot binary files
TEXT_SUFFIXES = (".txt", ".jsonl", ".md")


def _whitespace_run_start(text: str) -> int:
    """Index where the last run of whitespace in ``text`` begins, or -1 if there is none."""
    i = len(text) - 1
    while i >= 0 and not text[i].isspace():
        i -= 1
    if i < 0:
        return -1
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i


def split_at_whitespace(text: str, max_chars: int) -> Iterator[str]:
    """Yield consecutive pieces of ``text`` of at most about ``max_chars``, each cut before a whitespace run.

    Cutting before the run keeps the run with the word that follows it, which is how byte-level BPE and
    SentencePiece pre-tokenizers group them, so the pieces tokenize like the whole text (a piece with no
    whitespace at all is cut hard).
    """
    start = 0
    n = len(text)
    while n - start > max_chars:
        window = text[start : start + max_chars]
        cut = _whitespace_run_start(window)
        if cut <= 0:
            cut = max_chars
        yield text[start : start + cut]
        start += cut
    if start < n:
        yield text[start:]


@dataclass
class _Stats:
    n_documents: int = 0
    n_dropped: int = 0
    n_packed: int = 0
    pack: list[int] = field(default_factory=list)  # tokens of short documents waiting to fill a window
    pack_docs: int = 0  # documents in ``pack``
    longest: int = 0  # most tokens seen in one document
    bytes_read: int = 0


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------


def _check_text_file(path: Path, name: str) -> None:
    size = path.stat().st_size
    if size == 0:
        raise NormscopeError(f"The file {name} is empty; give a file with text in it.")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise NormscopeError(f"The file {name} looks binary (NUL byte at offset {nul}); give UTF-8 text.")


def stream_text(
    path: Path, name: str, stats: _Stats | None = None, chunk_bytes: int | None = None
) -> Iterator[str]:
    """Yield a UTF-8 file's text in pieces cut before a whitespace run, reading ``chunk_bytes`` at a time.

    Never reads the whole file: memory stays at a few chunks. Raises NormscopeError naming the file and the
    byte offset of the first invalid UTF-8 byte, and for files that hold only whitespace.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    stats = stats if stats is not None else _Stats()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # bytes handed to the decoder so far
    carry = ""
    first = True
    seen_text = False
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            stats.bytes_read += len(raw)
            final = not raw
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                pos = offset - pending + exc.start
                raise NormscopeError(
                    f"The file {name} is not valid UTF-8 (bad byte at offset {pos}); convert it to UTF-8."
                ) from None
            offset += len(raw)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            buf = carry + text
            if not seen_text and buf.strip():
                seen_text = True
            if final:
                if not seen_text:
                    raise NormscopeError(f"The file {name} contains only whitespace; give a file with text.")
                if buf:
                    yield buf
                return
            cut = _whitespace_run_start(buf)
            if cut <= 0:
                if len(buf) <= 4 * chunk_bytes:
                    carry = buf
                    continue
                cut = len(buf)  # a huge run with no whitespace at all: cut it hard
            if seen_text:
                yield buf[:cut]
            carry = buf[cut:]


def iter_jsonl(path: Path, name: str, fld: str, stats: _Stats) -> Iterator[str]:
    """Yield the ``fld`` string of each JSON line; one line is one document. Errors name the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            stats.bytes_read += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise NormscopeError(
                    f"The file {name} is not valid UTF-8 (line {lineno}, byte {exc.start} of the line); "
                    "convert it to UTF-8 first."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NormscopeError(
                    f"{name} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line."
                ) from None
            if not isinstance(record, dict) or fld not in record:
                raise NormscopeError(
                    f"{name} line {lineno} has no field '{fld}'; set the JSONL field option to that field."
                )
            value = record[fld]
            if not isinstance(value, str):
                raise NormscopeError(
                    f"{name} line {lineno}: field '{fld}' is a {type(value).__name__}, not a string; fix it."
                )
            yield value


def collect_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """Expand files and folders (recursively *.txt, *.jsonl, *.md) to sorted (path, display name) pairs."""
    out: list[tuple[Path, str]] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise NormscopeError(f"The text path {p} does not exist; check the path.")
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            if not found:
                raise NormscopeError(
                    f"The folder {p.name}/ has no .txt, .jsonl or .md files; give a folder with text files."
                )
            out.extend((q, q.relative_to(p).as_posix()) for q in found)
        else:
            out.append((p, p.name))
    return out


def _files_documents(
    files: list[tuple[Path, str]], opts: TextOptions, stats: _Stats
) -> Iterator[tuple[str, Iterable[str]]]:
    for path, name in files:
        _check_text_file(path, name)
        category = f"file:{name}"
        if path.suffix.lower() == ".jsonl":
            seen = False
            for text in iter_jsonl(path, name, opts.jsonl_field, stats):
                seen = seen or bool(text.strip())
                yield category, [text]
            if not seen:
                raise NormscopeError(
                    f"The file {name} has only whitespace in field '{opts.jsonl_field}'; give text."
                )
        else:
            yield category, stream_text(path, name, stats)


def _source_for_files(paths: list[Path], files: list[tuple[Path, str]]) -> str:
    n = len(files)
    noun = "file" if n == 1 else "files"
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return f"{n} {noun} under {Path(paths[0]).expanduser().resolve().name}/"
    if n == 1:
        return f"file {files[0][1]}"
    return f"{n} {noun}"


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 (a quick check before `datasets` retries for minutes)."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """'NAME' -> (NAME, None, 'train'); 'NAME:split'; 'NAME:CONFIG:split'."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise NormscopeError(
            f"Bad dataset '{spec}'; write NAME, NAME:SPLIT or NAME:CONFIG:SPLIT (e.g. wikitext:test)."
        )
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _dataset_documents(spec: str, fld: str) -> Iterator[tuple[str, Iterable[str]]]:
    name, config, split = parse_dataset_spec(spec)
    try:
        import datasets
    except ImportError:
        raise NormscopeError(
            "--dataset needs the `datasets` package, which is not installed; install it or give text files."
        ) from None
    local = Path(name).expanduser().exists()
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not local and not offline and not _hub_reachable():
        raise NormscopeError(
            f"The dataset '{spec}' must come from the Hugging Face hub, which cannot be reached (offline); "
            "give local text files instead."
        )
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        records = iter(ds)
        category = f"dataset:{Path(name).name if local else name}"
        first = next(records, None)
    except NormscopeError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise NormscopeError(f"Could not load the dataset '{spec}' ({type(exc).__name__}: {msg}).") from None
    if first is None:
        raise NormscopeError(f"The dataset '{spec}' is empty; choose another split.")
    if fld not in first:
        raise NormscopeError(
            f"The dataset '{spec}' has no column '{fld}' (columns: {', '.join(map(str, first))}); "
            "set the JSONL field option to the text column."
        )
    record: dict[str, Any] | None = first
    while record is not None:
        value = record[fld]
        if isinstance(value, str):
            yield category, [value]
        try:
            record = next(records, None)
        except Exception as exc:
            raise NormscopeError(
                f"Reading the dataset '{spec}' failed midway ({type(exc).__name__}); retry later."
            ) from None
