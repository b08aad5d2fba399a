"""WeightWatcher 0.7.7 imported with CUDA: its ``analyze()`` numbers are ours on the
float16-rounded weights, up to its float32 GPU SVD (tests/weightwatcher_numerics.py).

Runs only where WeightWatcher took its CUDA branch (it reads weights as float16); the parity
tests pin its CPU branch instead. Tolerances, with eps = 2^-23 (float32), n = min(N, M),
lam_max the largest of the K eigenvalues:

* a backward-stable float32 SVD gives |d sigma_i| <= n eps sigma_max, and WeightWatcher
  squares the float32 sigma_i in float32: |d lam_i| <= (2n + 1) eps lam_max, i.e. relative
  ``delta_i = (2n + 1) eps lam_max / lam_i``;
* log10 lam_max moves by <= delta_max / ln 10, log10 sum(lam) by <= delta_sum / ln 10 with
  ``delta_sum = K (2n + 1) eps lam_max / sum(lam)``, stable_rank by delta_sum + delta_max;
* xmin is one of WeightWatcher's eigenvalues: ours nearest, index i, lies within delta_i;
* alpha at xmin index i: alpha - 1 = k / S, S = sum_{j>=i} ln(lam_j / lam_i) and
  |dS| <= 2 k delta_i, so |d alpha| <= 2 delta_i (alpha - 1)^2 (plus 1e-12 for float64);
* D = max_j |1 - (lam_j / lam_i)^(1 - alpha) - j / k| moves by
  ``dD_i <= |d alpha| / (e (alpha - 1)) + 2 (alpha - 1) delta_i``;
* the KS choice: WeightWatcher's argmin i of the perturbed D is ours or one whose D is
  within dD_i + dD_ours of our minimum (a near tie), and ours is no worse than its.
A fit computed with n - 1 instead of n moves alpha by (alpha - 1) / k, 10-100x these bounds.
"""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from weightwatcher_numerics import took_cuda_branch

import bayes_spectral as bs

ww = pytest.importorskip("weightwatcher")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
pytestmark = pytest.mark.skipif(not took_cuda_branch(),
                                reason="WeightWatcher took its CPU branch (no CUDA)")
EPS32 = float(np.finfo(np.float32).eps)


def dense(seed, student_t):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96))
    if student_t:
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.copy_(0.05 * torch.distributions.StudentT(2.0).sample(
                    layer.weight.shape))
    return model


def ks_bounds(ev, i, n_min):
    """alpha, D at xmin index ``i`` of ascending ``ev`` and the bounds on their change."""
    fit = bs.fit_powerlaw(torch.tensor(ev), xmin_index=int(i))
    alpha, D = float(fit.alpha), float(fit.ks_distance)
    delta = (2 * n_min + 1) * EPS32 * ev[-1] / ev[i]
    d_alpha = 2 * delta * (alpha - 1) ** 2 + 1e-12
    d_D = d_alpha / (math.e * (alpha - 1)) + 2 * (alpha - 1) * delta + 1e-12
    return alpha, D, delta, d_alpha, d_D


@pytest.mark.parametrize("student_t", [False, True], ids=["mlp", "student_t"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weightwatcher_on_cuda_is_ours_on_float16_weights(seed, student_t):
    model = dense(seed, student_t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ww.WeightWatcher(model=model).analyze().set_index("name")
    for name in ref.index:
        r = ref.loc[name]
        w = dict(model.named_modules())[name].weight.detach()
        ev = bs.esd(w.half().double()).numpy()  # what WeightWatcher reads, in float64
        n_min, lam_max = min(w.shape), ev[-1]
        d_max = (2 * n_min + 1) * EPS32
        d_sum = len(ev) * d_max * lam_max / ev.sum()
        assert r["log_spectral_norm"] == pytest.approx(math.log10(lam_max),
                                                       abs=d_max / math.log(10))
        assert r["log_norm"] == pytest.approx(math.log10(ev.sum()), abs=d_sum / math.log(10))
        assert r["stable_rank"] == pytest.approx(ev.sum() / lam_max, rel=d_sum + d_max)
        i = int(np.argmin(np.abs(ev - r["xmin"])))
        alpha, D, delta, d_alpha, d_D = ks_bounds(ev, i, n_min)
        assert r["xmin"] == pytest.approx(ev[i], rel=delta), name
        assert r["num_pl_spikes"] == len(ev) - i
        assert r["alpha"] == pytest.approx(alpha, abs=d_alpha), name
        assert r["D"] == pytest.approx(D, abs=d_D), name
        ours = bs.fit_powerlaw(torch.tensor(ev))
        j = len(ev) - int(ours.num_tail)
        d_D_ours = ks_bounds(ev, j, n_min)[4]
        # the KS choice: a near tie at most, both ways
        assert abs(D - float(ours.ks_distance)) <= d_D + d_D_ours, name
