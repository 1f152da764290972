"""``normscope sites MODEL``: list every normalization site."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Annotated, Any

import typer

from normscope.cli import app
from normscope.cli.common import Progressor, check_max_memory_devices, guarded, out_console, quiet_libraries
from normscope.cli.options import MODEL, command


def _sites(model_opts: Any, as_json: bool) -> None:
    from normscope.core.models import load_model
    from normscope.core.options import validate
    from normscope.core.sites import batch_statistics_norms, find_layout, find_norm_sites, format_sites_table

    validate(model_opts)
    if model_opts.device_map != "none" and model_opts.max_memory:
        check_max_memory_devices(model_opts.max_memory)
    quiet_libraries()
    m = model_opts
    with Progressor(as_json).status(f"loading {m.model}"):
        lm = load_model(m.model, revision=m.revision, dtype=m.dtype, device=m.device,
                        trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle,
                        device_map=m.device_map, max_memory=m.max_memory, offload_folder=m.offload_folder)
    found = find_norm_sites(lm.model, find_layout(lm.model))
    batch = batch_statistics_norms(lm.model)
    if as_json:
        sys.stdout.write(json.dumps({"model": m.model, "sites": [s.to_dict() for s in found],
                                     "batch_statistics_norms": [{"path": p, "class": c} for p, c in batch]},
                                    indent=2) + "\n")
        return
    out_console.print(format_sites_table(found))
    out_console.print(f"{len(found)} normalization sites in {lm.info.name} ({lm.info.architecture}).", highlight=False)
    if batch:
        more = f" and {len(batch) - 3} more" if len(batch) > 3 else ""
        names = ", ".join(f"{p} ({c})" for p, c in batch[:3]) + more
        out_console.print(f"Also {len(batch)} batch-statistics norm(s), recognised but not analysed: {names}. "
                          "normscope analyses token-wise norms (LayerNorm, RMSNorm) only.", highlight=False)


_JSON = inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
    bool, typer.Option("--json", help="Print the sites as JSON to stdout.", rich_help_panel="Output")])

app.command(
    "sites",
    help="List every normalization site (name, layer, role, kind, eps, module path) of MODEL.",
    epilog="Examples:\n\n"
    "  normscope sites                 # the bundled SmolLM2-135M (61 RMSNorm sites)\n\n"
    "  normscope sites minilm-l6       # BERT post-LN (13 LayerNorm sites)\n\n"
    "  normscope sites gpt2 --json     # machine-readable",
)(guarded(command([MODEL], _sites, name="sites", doc="List every normalization site of MODEL.", extra=[_JSON])))
