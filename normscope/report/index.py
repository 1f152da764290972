"""The index page of a report folder: a card per analysis with its headline numbers and a link to its page."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normscope.core.io import atomic_write_text
from normscope.report.html import (
    _CSS,
    INDEX_HREF,
    _esc,
    _fmt_seconds,
    _headlines_html,
    _mget,
    _model_name,
    _safe_version,
    _settings_html,
    _timings_html,
)


@dataclass
class IndexEntry:
    """One analysis on the index page: its headline numbers and a link to its page, or why it did not run."""

    analysis: str
    title: str
    href: str | None  # relative link to the analysis page; None when it did not run
    headlines: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # the first interpretation sentence
    seconds: float | None = None
    error: str | None = None  # one line: why this analysis was skipped or failed
    note: str = ""  # plain remark shown instead of headlines (e.g. for the model-load row)
    labels: dict[str, str] = field(default_factory=dict)  # words for the headline keys


def render_index(title: str, meta: dict[str, Any], entries: Sequence[IndexEntry]) -> str:
    """``index.html``: a summary card per analysis with its headline numbers and a link to its page."""
    e = _esc
    model = _model_name(meta)
    version = _mget(meta, "versions", "normscope") or _safe_version("normscope")
    cards = []
    for en in entries:
        head = f'<a href="{e(en.href)}">{e(en.title)}</a>' if en.href else e(en.title)
        body = (
            _headlines_html(en.headlines, en.labels) + (f"<p>{e(en.summary)}</p>" if en.summary else "")
            if en.error is None
            else f'<p class="note">Not run: {e(en.error)}</p>'
        )
        if en.note and en.error is None:
            body = f'<p class="note">{e(en.note)}</p>' + body
        took = f' <span class="note">({e(_fmt_seconds(en.seconds))})</span>' if en.seconds is not None else ""
        cards.append(
            f'<section class="analysis" id="analysis-{e(en.analysis)}"><h2>{head}{took}</h2>\n{body}</section>'
        )
    timings = {en.analysis: en.seconds for en in entries if en.seconds is not None}
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)} \u2014 {e(model)} \u2014 normscope</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header class="top"><div class="wrap">\n<h1>{e(title)}</h1>\n'
        f'<p class="sub"><span class="model">{e(model)}</span> \u00b7 normscope {e(version)}</p>\n'
        '</div></header>\n<main class="wrap">\n'
        + _settings_html(meta)
        + "\n".join(cards)
        + (_timings_html(timings) if timings else "")
        + f'</main>\n<footer class="wrap">written by normscope {e(version)}</footer>\n</body>\n</html>\n'
    )


def write_index(title: str, meta: dict[str, Any], entries: Sequence[IndexEntry], out_dir: Path) -> Path:
    """Write ``<out_dir>/index.html`` atomically and return its path."""
    path = Path(out_dir) / INDEX_HREF
    atomic_write_text(path, render_index(title, meta, entries))
    return path



# Cards in this order; other analyses follow alphabetically.
CARD_ORDER = ("sinks", "depth", "grads", "hubness", "dla", "remove-ln", "rewrite", "compare")


def text_line(text: Any) -> str:
    """One line saying what text a page measured: tokens, sequences of each kind, T, BOS and the source."""
    if not isinstance(text, dict) or not text:
        return ""
    cats = text.get("categories") or {}
    kinds = ", ".join(f"{k} {v}" for k, v in cats.items())
    n_seq = text.get("n_sequences")
    parts = [f"{text.get('n_tokens', 0):,} tokens"]
    if n_seq:
        parts.append(f"{n_seq} sequences of T = {text.get('seq_len')}" + (f" ({kinds})" if kinds else ""))
    parts.append("BOS prepended" if text.get("bos_prepended") else "no BOS")
    if text.get("source"):
        parts.append(str(text["source"]))
    return "Text: " + "; ".join(parts) + "."


def refresh_index(folder: Path, not_run: dict[str, str] | None = None) -> Path:
    """Rewrite ``<folder>/index.html`` from every result JSON in the folder (every page written there by any
    command, remove-ln and compare included), plus a card for each analysis in ``not_run`` with the reason."""
    import json

    folder = Path(folder)
    found: list[tuple[dict[str, Any], str | None]] = []
    for p in sorted(folder.glob("*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "schema_version" in d and "analysis" in d:
            page = p.with_suffix(".html")
            found.append((d, page.name if page.exists() else None))
    rank = {name: i for i, name in enumerate(CARD_ORDER)}
    found.sort(key=lambda item: (rank.get(item[0]["analysis"], len(rank)), item[0]["analysis"]))
    entries = []
    for d, href in found:
        summary = d.get("summary") or []
        entries.append(IndexEntry(str(d["analysis"]), str(d.get("title") or d["analysis"]), href,
                                  dict(d.get("headlines") or {}), str(summary[0]) if summary else "",
                                  note=text_line((d.get("meta") or {}).get("text")),
                                  labels=dict(d.get("labels") or {})))
    for name, why in (not_run or {}).items():
        entries.append(IndexEntry(name, name, None, error=why))
    models = list(dict.fromkeys(_model_name(d.get("meta") or {}) for d, _ in found))
    first = (found[0][0].get("meta") or {}) if found else {}
    meta: dict[str, Any] = {"model": {"name": " / ".join(models) or folder.name}, "versions": first.get("versions")}
    return write_index(f"normscope reports in {folder.name}/", meta, entries, folder)
