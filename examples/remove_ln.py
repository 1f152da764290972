"""Remove every RMSNorm of the bundled SmolLM2-135M by fine-tuning, through the Python API, with no corpus.

The model generates its own training text (``self_generated_sample``), is fine-tuned while its 61 norm sites
are frozen one after another (pre-MLP, pre-attention Q/K, pre-attention V, final), distilled towards the
original model's next-token distribution, exported as a plain transformers checkpoint, and scored on the
built-in prompts against the original. Then the export is loaded back with plain ``AutoModelForCausalLM``.

Cost on 2 CPU cores: about 5-10 s per step at 4 x 128 tokens, plus a few minutes of generation and evaluation.
A few dozen steps show the mechanics, not a good LN-free model (see the README for the documented runs)::

    .venv/bin/python examples/remove_ln.py --steps 40 --sequences 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from normscope.core.models import load_model
from normscope.core.text import TextOptions, load_text
from normscope.removal import RemoveLnOptions, TrainOptions, run, self_generated_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sequences", type=int, default=64, help="self-generated training sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/example-remove-ln"))
    args = ap.parse_args()

    lm = load_model(args.model, device="cpu")
    cache = args.run_dir / f"self-generated-{args.sequences}x{args.seq_len}.pt"
    train_text = self_generated_sample(lm, args.sequences, args.seq_len, args.batch_size, seed=0, cache=cache)
    eval_text = load_text(lm.tokenizer, TextOptions(seq_len=args.seq_len, max_tokens=4096,
                                                    batch_size=args.batch_size, controls=False),
                          max_positions=lm.info.max_positions)
    opts = RemoveLnOptions(
        train=TrainOptions(steps=args.steps, lr=2e-4, distill_weight=1.0, save_every=10),
        run_dir=args.run_dir,
        resume=(args.run_dir / "ln-free").exists(),  # rerunning the script continues an interrupted run
        data_note=f"{args.sequences} sequences sampled from {args.model}",
    )
    result = run(lm, train_text, eval_text, opts)
    assert result is not None
    for row in result.payload["ce"]:
        print(f"{row['model']:>9}: mean CE {row['mean']:.3f}  median {row['median']:.3f}  p99.9 {row['p99_9']:.2f}")
    paths = result.write(args.run_dir / "report")
    print("report:", paths.html)

    export = result.payload["export_dir"]
    if export:  # a plain checkpoint: no normscope code needed to load it
        plain = AutoModelForCausalLM.from_pretrained(export)
        ids = torch.tensor([lm.tokenizer("The norms are gone, and the model")["input_ids"]])
        with torch.no_grad():
            nxt = plain(input_ids=ids).logits[0, -1].argmax()
        print("exported model:", export, "| next token:", repr(lm.tokenizer.decode([int(nxt)])))


if __name__ == "__main__":
    main()
