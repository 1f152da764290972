"""Which positions >= 1 carry massive activations on SmolLM2 with a BOS prepended, and how far each site's
per-token divisor spreads there (the question behind a shared frozen divisor for ordinary tokens).

Usage (2-core CPU, about a minute per book at 4,096 tokens)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/measure_outliers.py --text peter_pan.txt --text dracula.txt

Prints two tables per book (massive activations at positions >= 1 by token type; divisor spread per site)
as Markdown, and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", type=Path, action="append", required=True)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--after-bos", default=None,
                    help="Text whose tokens go right after BOS in every window (a longer fixed prefix), e.g. '\\n'.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from normscope.core.models import load_model
    from normscope.core.sites import find_layout, find_norm_sites
    from normscope.core.text import TextOptions, load_text
    from normscope.removal.outliers import measure

    lm = load_model(args.model, dtype="float32", device="cpu")
    layout = find_layout(lm.model)
    sites = find_norm_sites(lm.model, layout)
    out = {}
    for path in args.text:
        t0 = time.perf_counter()
        sample = load_text(lm.tokenizer, TextOptions(paths=[path], seq_len=args.seq_len, max_tokens=args.max_tokens,
                                                     batch_size=8, bos="yes", controls=False),
                           max_positions=lm.info.max_positions, is_causal=True)
        batches = sample.batches
        if args.after_bos is not None:
            text = args.after_bos.encode().decode("unicode_escape")
            extra = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            if args.after_bos.upper() == "BOS":
                extra = [lm.tokenizer.bos_token_id]
            print(f"prefix after BOS: {extra} {lm.tokenizer.convert_ids_to_tokens(extra)}")
            batches = [_with_prefix(b, extra) for b in batches]
        massive, spread = measure(lm.model, layout, sites, batches)
        mt, st = massive.table(lm.tokenizer), spread.table(lm.tokenizer)
        secs = time.perf_counter() - t0
        print(f"\n## {path.name}: {massive.n_tokens} tokens at positions >= 1 ({secs:.0f} s)\n")
        print("largest |h| at position 0 per layer:", [round(x) for x in massive.pos0_max])
        print("largest |h| at positions >= 1 per layer:", [round(x) for x in massive.max_rest])
        print(_md(mt.head(15)))
        print()
        print(_md(st))
        out[path.name] = {"n_tokens": massive.n_tokens, "pos0_max": massive.pos0_max, "max_rest": massive.max_rest,
                          "massive": mt.to_dict("records"), "spread": st.to_dict("records")}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))


def _with_prefix(b, extra: list[int]):
    """The batch with ``extra`` inserted after position 0, truncated back to its length."""
    import dataclasses

    k = len(extra)
    ids = b.input_ids.clone()
    ids[:, 1 + k:] = b.input_ids[:, 1:-k] if k else b.input_ids[:, 1:]
    ids[:, 1:1 + k] = torch.tensor(extra)
    return dataclasses.replace(b, input_ids=ids)


def _md(df) -> str:
    """A Markdown table (no tabulate dependency)."""
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("\n", "\\n").replace("|", "\\|")
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
