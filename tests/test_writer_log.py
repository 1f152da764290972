"""remove-ln's per-site log: the relative update ||dw||/||w|| of the weights writing into each site
(``writer_rel_update`` in ``sites.jsonl``), against the weights read straight off the model before and after each
step of a tiny Llama whose every site is removed on schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import sample_from_ids
from normscope.removal.train import TrainOptions, train
from normscope.removal.writers import WriterUpdates, site_writers
from tests.tiny import tiny_llama


def test_writer_updates_by_hand() -> None:
    a, b = torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.ones(2, 2))
    wu = WriterUpdates({"s": [a, b], "empty": []})
    assert wu.relative("s") is None and wu.relative("empty") is None  # no snapshot, no writers
    wu.snapshot()
    with torch.no_grad():
        a.add_(torch.tensor([0.3, 0.0]))
        b.mul_(2.0)
    assert wu.relative("s") == pytest.approx(math.sqrt((0.09 + 4.0) / (25.0 + 4.0)), rel=1e-6)  # 0.3 in float32


def test_sites_log_has_the_writers_relative_update(tmp_path) -> None:
    model = tiny_llama(n_layers=2)
    layout = find_layout(model)
    sites = find_norm_sites(model, layout)
    L = model.model.layers  # the writers, named directly: embeddings, o_proj, down_proj
    want_writers = {"blocks.0.ln1": [model.model.embed_tokens.weight], "blocks.0.ln2": [L[0].self_attn.o_proj.weight],
                    "blocks.1.ln1": [L[0].mlp.down_proj.weight], "blocks.1.ln2": [L[1].self_attn.o_proj.weight],
                    "ln_final": [L[1].mlp.down_proj.weight]}
    assert {k: [id(p) for p in v] for k, v in site_writers(model, layout, sites).items()} == \
        {k: [id(p) for p in v] for k, v in want_writers.items()}
    g = torch.Generator().manual_seed(0)
    sample = sample_from_ids(torch.randint(4, 100, (16, 16), generator=g).tolist(), ["x"] * 16, batch_size=4)
    seen = [[p.detach().clone() for ps in want_writers.values() for p in ps]]  # before step 0

    def after_step(log) -> None:
        seen.append([p.detach().clone() for ps in want_writers.values() for p in ps])

    res = train(model, layout, sites, sample.batches, TrainOptions(steps=8, lr=2e-3, save_every=0),
                tmp_path / "run", progress=after_step)
    assert res.removal.n_removed() == len(sites) and res.skipped == 0  # every site frozen by the end
    lines = [json.loads(x) for x in (tmp_path / "run" / "sites.jsonl").read_text().splitlines()]
    assert lines[0]["cols"][-1] == "writer_rel_update" and len(lines) == 8
    names = list(want_writers)
    frozen_steps = 0
    for k, rec in enumerate(lines):
        for j, name in enumerate(names):
            old, new = seen[k][j], seen[k + 1][j]
            direct = float((new - old).norm() / old.norm())
            assert math.isclose(rec["sites"][name][4], direct, rel_tol=2e-4), (k, name)
            assert 0 < direct < 0.5
        frozen_steps += any(w.frozen_at is not None and w.frozen_at <= k for w in res.removal)
    assert frozen_steps > 0  # some steps logged with frozen-divisor sites
