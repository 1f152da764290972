"""Read a remove-ln run's ``sites.jsonl``: per step, the first site whose input went non-finite, the sites whose
worst token (positions >= 1) sits furthest above the site's divisor, and the largest relative updates
(||dw|| / ||w||) of the weights reading a site and of those writing into it (logs without the writer column show
none).

Usage::

    .venv/bin/python benchmarks/read_sites_log.py runs/remove-ln/smollm2-135m/ln-free [--from 10 --to 40 --top 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="the ln-free run folder (holds sites.jsonl and steps.jsonl)")
    ap.add_argument("--from", dest="start", type=int, default=0)
    ap.add_argument("--to", type=int, default=10**9)
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    tok = None
    try:
        from normscope.core.models import load_model

        tok = load_model("smollm2-135m").tokenizer
    except Exception:
        pass
    steps = {}
    if (args.run / "steps.jsonl").exists():
        for line in (args.run / "steps.jsonl").read_text().splitlines():
            d = json.loads(line)
            steps[d["step"]] = d
    for line in (args.run / "sites.jsonl").read_text().splitlines():
        rec = json.loads(line)
        k = rec["step"]
        if not args.start <= k <= args.to:
            continue
        rows = rec["sites"]
        peaks = sorted(((v[2] or 0.0, name, v[3]) for name, v in rows.items()), reverse=True)[: args.top]
        upd = sorted(((v[1] or 0.0, name) for name, v in rows.items()), reverse=True)[:2]
        wupd = sorted(((v[4] or 0.0, name) for name, v in rows.items() if len(v) > 4), reverse=True)[:2]
        st = steps.get(k, {})
        text = ", ".join(f"{n} {r:.1f}x ({tok.decode([t]) if tok and t is not None else t!r})" for r, n, t in peaks)
        print(f"step {k:4d} CE {st.get('ce', float('nan')):.3f} removed {st.get('n_removed', '?'):>2} "
              f"{'SKIP ' if not rec['finite'] else ''}first non-finite: {rec['first_nonfinite_input']} | worst: "
              f"{text} | max dw/w: " + ", ".join(f"{n} {r:.2e}" for r, n in upd)
              + (" | writers: " + ", ".join(f"{n} {r:.2e}" for r, n in wupd) if wupd else ""))


if __name__ == "__main__":
    main()
