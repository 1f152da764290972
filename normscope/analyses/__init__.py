"""Every analysis normscope runs, registered once. Adding one: a package here (``options.py`` with its settings
dataclass, ``analysis.py`` with ``run(ctx, opts) -> Result``) and one :func:`register` call below; the CLI
command, ``report --only``, ``compare`` and ``normscope.run`` follow from it."""

from __future__ import annotations

from normscope.analyses.base import REGISTRY, AnalysisSpec, RunContext, get, parse_only, register, run
from normscope.analyses.depth.options import REFERENCES as _DEPTH_REFS
from normscope.analyses.depth.options import DepthOptions
from normscope.analyses.dla.options import REFERENCES as _DLA_REFS
from normscope.analyses.dla.options import DlaOptions
from normscope.analyses.grads.options import REFERENCES as _GRADS_REFS
from normscope.analyses.grads.options import GradsOptions
from normscope.analyses.hubness.options import REFERENCES as _HUBNESS_REFS
from normscope.analyses.hubness.options import HubnessOptions
from normscope.analyses.sinks.options import REFERENCES as _SINKS_REFS
from normscope.analyses.sinks.options import SinksOptions

register(AnalysisSpec(
    name="sinks", command="sinks", options=SinksOptions, runner="normscope.analyses.sinks.analysis:run",
    title="Attention sinks (alpha_1, Sink_1^0.3), massive activations and how outliers rescale each norm.",
    references=tuple(_SINKS_REFS),
    epilog="Cost: one SDPA forward pass per batch, alpha_k in query chunks (no T x T pattern; --attention eager "
    "keeps whole patterns); --ablate adds three.\n\n"
    "Examples:\n\n"
    "  normscope sinks                               # bundled SmolLM2-135M, built-in prompts, T = 64\n\n"
    "  normscope sinks --controls                    # + Gu et al.'s random and repeated-token rows\n\n"
    "  normscope sinks gpt2 --text book.txt --seq-len 128\n\n"
    "  normscope sinks smollm2-135m --ablate         # + causal checks (3 more forward passes)\n\n"
    "  normscope sinks minilm-l6                     # encoder: alpha over all queries",
))
register(AnalysisSpec(
    name="depth", command="depth-curse", options=DepthOptions, runner="normscope.analyses.depth.analysis:run",
    terminal="normscope.analyses.depth.report:terminal_table",
    title="Curse of depth: residual norm and variance growth, relative updates, angular distances, skip-one-block "
    "loss and the LayerNorm Scaling what-if.",
    references=tuple(_DEPTH_REFS),
    epilog="Cost: the statistics take one forward pass per batch; skip-one-block one more per skipped block per "
    "batch (30 blocks: 30 passes; limit them with --skip-layers), the LayerNorm Scaling what-if one more, the "
    "dropped window one more.\n\n"
    "Examples:\n\n"
    "  normscope depth-curse                                 # bundled SmolLM2-135M, built-in prompts\n\n"
    "  normscope depth-curse meta-llama/Llama-3.2-1B --text book.txt\n\n"
    "  normscope depth-curse --skip-layers 0-9,20-29         # skip only these blocks\n\n"
    "  normscope depth-curse --no-skip --window 8            # no per-block skipping; drop 8 blocks\n\n"
    "  normscope depth-curse minilm-l6                       # encoder: norms, updates, angles (no loss)",
))
register(AnalysisSpec(
    name="grads", command="grads", options=GradsOptions, runner="normscope.analyses.grads.analysis:run",
    terminal="normscope.analyses.grads.report:terminal_table",
    title="Gradient flow: L2 gradient norms per block and parameter group, and ||dL/dh|| on the residual stream.",
    references=tuple(_GRADS_REFS),
    epilog="Cost: one forward and one backward pass per batch (two views per sequence for --loss masked-view); "
    "memory holds one batch's graph plus one gradient per parameter, whatever the number of tokens. --steps N "
    "adds N forward and backward passes and AdamW's moments plus a host copy of the weights (3x the "
    "parameters).\n\n"
    "Examples:\n\n"
    "  normscope grads                                   # bundled SmolLM2-135M, next-token loss\n\n"
    "  normscope grads minilm-l6                         # encoder without a head: masked-view cosine loss\n\n"
    "  normscope grads --steps 10 --lr 2e-4              # + ||dw||/||w|| over 10 AdamW steps, weights put back\n\n"
    "  normscope compare smollm2-135m minilm-l6 --only grads   # Pre-LN vs Post-LN on one page, depth 0..1",
))
register(AnalysisSpec(
    name="hubness", command="hubness", options=HubnessOptions, runner="normscope.analyses.hubness.analysis:run",
    title="Hubness (k-occurrence skewness, Robin Hood, antihubs, hub occurrence, Gini) of the residual stream and "
    "of every norm's input and output, the tokens that are hubs, and contexts against the unembedding.",
    references=tuple(_HUBNESS_REFS),
    epilog="Memory: one float32 matrix of tokens x d_model per point analysed in a pass (20,000 x 576 = 46 MB); "
    "--memory-mb caps what one pass holds. The k-NN search is exact and blocked (--block-size query rows at a "
    "time), never an N x N matrix.\n\n"
    "Examples:\n\n"
    "  normscope hubness                                 # 6 blocks, first to last\n\n"
    "  normscope hubness --layers 0,12,-1 --k 5          # three blocks, 5-NN lists\n\n"
    "  normscope hubness --text book.txt --max-tokens 20000 --metric cosine\n\n"
    "  normscope hubness minilm-l6                       # an encoder: no context-unembedding part",
))
register(AnalysisSpec(
    name="dla", command="dla", options=DlaOptions, runner="normscope.analyses.dla.analysis:run", needs_causal=True,
    title="Direct logit attribution of every head and MLP with the cached final-norm scale against the true direct "
    "effect (NMAE), and the confidence (entropy) neurons of the last MLP.",
    references=tuple(_DLA_REFS),
    epilog="Memory: with the bridge, a deep copy of the model plus the per-head outputs of one micro-batch of 512 "
    "tokens (about 0.3 GB for SmolLM2-135M); the direct path holds one batch's attention inputs and MLP outputs.\n\n"
    "Examples:\n\n"
    "  normscope dla                                     # bundled SmolLM2-135M, TransformerLens bridge\n\n"
    "  normscope dla gpt2 --text book.txt --neurons 10\n\n"
    "  normscope dla runs/remove-ln/smollm2-135m/export  # an LN-free export: NMAE should be about 0\n\n"
    "  normscope dla --backend direct                    # normscope's own hooks only",
))

__all__ = ["REGISTRY", "AnalysisSpec", "RunContext", "get", "parse_only", "register", "run"]
