"""Property-based tests (hypothesis) over the pure metric functions: invariances and bounds.

* norms: the divisor scales with the input (eps = 0) and LayerNorm's ignores an added constant;
* sinks: sink scores and rates stay in range, and permuting sequences or heads permutes the scores;
* outlier share: invariant to scaling and to permuting hidden dims, monotone in k, within 0..1;
* hubness: Robin Hood and Gini in 0..1, every measure invariant to permuting items;
* depth: angular distance in 0..1, symmetric, scale invariant;
* DLA: with a frozen (constant) final-norm scale the attribution equals the direct effect.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from normscope.analyses import depth, dla, hubness, sinks
from normscope.core.sites import norm_divisor

SETTINGS = settings(max_examples=40, deadline=None)
finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)


def tensors(*shape: int):
    return arrays(np.float32, shape, elements=finite).map(torch.from_numpy)


@SETTINGS
@given(tensors(3, 16), st.floats(0.01, 100), st.floats(-20, 20))
def test_divisor_scales_and_layernorm_ignores_shifts(x, c, shift) -> None:
    for centered in (False, True):
        d1 = norm_divisor(x, centered=centered, eps=0.0)
        d2 = norm_divisor(c * x, centered=centered, eps=0.0)
        tol = 1e-5 * c * (float(x.abs().max()) + 1)  # float32 round-off in the mean of a near-constant row
        assert torch.allclose(d2, c * d1, rtol=1e-4, atol=tol)
    assert torch.allclose(norm_divisor(x + shift, centered=True, eps=1e-5), norm_divisor(x, centered=True, eps=1e-5),
                          rtol=1e-3, atol=1e-3)


def _patterns(logits: torch.Tensor) -> torch.Tensor:
    t = logits.shape[-1]
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    return logits.masked_fill(causal, -math.inf).softmax(-1)


@SETTINGS
@given(tensors(3, 2, 6, 6), st.floats(0.0, 1.0), st.permutations(range(3)), st.permutations(range(2)))
def test_sink_scores_bounded_and_permutation_equivariant(logits, eps, perm_b, perm_h) -> None:
    pattern = _patterns(logits)  # [batch, head, q, k]
    alpha = sinks.sink_scores(pattern, causal=True)
    assert bool((alpha >= -1e-6).all()) and bool((alpha <= 1 + 1e-6).all())
    rate = sinks.sink_rate(alpha[:, :, 0], eps)
    assert 0.0 <= rate <= 100.0
    permuted = sinks.sink_scores(pattern[list(perm_b)][:, list(perm_h)], causal=True)
    assert torch.allclose(permuted, alpha[list(perm_b)][:, list(perm_h)])
    assert sinks.sink_rate(permuted[:, :, 0], eps) == rate


@SETTINGS
@given(tensors(2, 3, 12), st.floats(0.01, 1000), st.permutations(range(12)))
def test_outlier_share_invariances(x, c, perm) -> None:
    share = sinks.outlier_share(x, k=3)
    nonzero = x.pow(2).sum(-1) > 1e-6
    assert bool((share >= 0).all()) and bool((share <= 1 + 1e-5).all())
    assert bool((share[..., 1:] >= share[..., :-1] - 1e-6).all())  # cumulative: monotone in k
    scaled = sinks.outlier_share(c * x, k=3)
    assert torch.allclose(scaled[nonzero], share[nonzero], atol=1e-4)
    assert torch.allclose(sinks.outlier_share(x[..., list(perm)], k=3), share, atol=1e-6)


@SETTINGS
@given(arrays(np.int64, st.integers(2, 60), elements=st.integers(0, 30)), st.randoms())
def test_hubness_measures_bounded_and_permutation_invariant(nk_np, rnd) -> None:
    nk = torch.from_numpy(nk_np)
    rh, g = hubness.robin_hood(nk), hubness.gini(nk)
    assert 0.0 <= rh <= 1.0 and 0.0 <= g <= 1.0 + 1e-12
    idx = list(range(len(nk)))
    rnd.shuffle(idx)
    shuffled = nk[idx]
    assert math.isclose(hubness.robin_hood(shuffled), rh, abs_tol=1e-12)
    assert math.isclose(hubness.gini(shuffled), g, abs_tol=1e-12)
    assert math.isclose(hubness.skewness(shuffled), hubness.skewness(nk), rel_tol=1e-9, abs_tol=1e-9)


@SETTINGS
@given(tensors(4, 8), tensors(4, 8), st.floats(0.1, 100))
def test_angular_distance_bounds_symmetry_scale(a, b, c) -> None:
    ok = (a.norm(dim=-1) > 1e-3) & (b.norm(dim=-1) > 1e-3)
    d = depth.angular_distance(a, b)
    assert bool((d >= 0).all()) and bool((d <= 1).all())
    assert torch.allclose(d, depth.angular_distance(b, a))
    assert torch.allclose(d[ok], depth.angular_distance(c * a, b)[ok], atol=1e-6)


@SETTINGS
@given(tensors(3, 5, 8), tensors(5, 8), tensors(5, 8))
def test_dla_equals_direct_effect_when_the_scale_is_frozen(comps, resid, u) -> None:
    """With eps huge the divisor is sqrt(eps): a constant, so the norm is linear and DLA is exact."""
    d_la, de = dla.dla_and_de(comps, resid, u, centered=False, eps=1e12)
    assert torch.allclose(d_la, de, rtol=1e-6, atol=1e-9)
