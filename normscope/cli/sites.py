"""``normscope sites MODEL``: list every normalization site."""

from __future__ import annotations

import json
import sys

from normscope.cli import app
from normscope.cli.common import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    Progressor,
    RevisionOpt,
    TrustOpt,
    guarded,
    out_console,
    quiet_libraries,
)
from normscope.models import DEFAULT_MODEL


@app.command(
    epilog="Examples:\n\n"
    "  normscope sites                 # the bundled SmolLM2-135M (61 RMSNorm sites)\n\n"
    "  normscope sites minilm-l6       # BERT post-LN (13 LayerNorm sites)\n\n"
    "  normscope sites gpt2 --json     # machine-readable",
)
@guarded
def sites(
    model: ModelArg = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List every normalization site (name, layer, role, kind, eps, module path) of MODEL."""
    from normscope.models import load_model
    from normscope.sites import find_layout, find_norm_sites, format_sites_table

    quiet_libraries()
    with Progressor(as_json).status(f"loading {model}"):
        lm = load_model(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle)
    found = find_norm_sites(lm.model, find_layout(lm.model))
    if as_json:
        sys.stdout.write(json.dumps({"model": model, "sites": [s.to_dict() for s in found]}, indent=2) + "\n")
        return
    out_console.print(format_sites_table(found))
    out_console.print(f"{len(found)} normalization sites in {lm.info.name} ({lm.info.architecture}).", highlight=False)
