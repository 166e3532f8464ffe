import math

import numpy as np
import pytest
import torch

from common.losses import (binary_entropy_of_gap, bradley_terry_loss, reference_weights, sst_cut_points,
                           tlt_cut_points)


def test_bradley_terry_loss_by_hand():
    r_w, r_l = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(1) = 0.3132617, -log sigmoid(0) = 0.6931472, -log sigmoid(-2) = 2.1269280
    assert bradley_terry_loss(r_w, r_l).item() == pytest.approx((0.3132617 + 0.6931472 + 2.1269280) / 3, abs=1e-6)
    w = torch.tensor([2.0, 0.0, 0.5])
    assert bradley_terry_loss(r_w, r_l, w).item() == pytest.approx((2 * 0.3132617 + 0.5 * 2.1269280) / 3, abs=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up():
    r_w = torch.tensor([0.0], requires_grad=True)
    r_l = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(r_w, r_l).backward()
    assert r_w.grad.item() == pytest.approx(-0.5) and r_l.grad.item() == pytest.approx(0.5)


def test_entropy_weights_by_hand():
    # gap 1: p = sigmoid(1) = 0.7310586, H = -(p ln p + (1-p) ln(1-p)) = 0.5822031, w = 1.7176141
    p = 1 / (1 + math.exp(-1))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert binary_entropy_of_gap(1.0) == pytest.approx(h, rel=1e-12)
    assert binary_entropy_of_gap(-1.0) == pytest.approx(h, rel=1e-12)
    w = reference_weights([1.0, 0.5, 0.0], [0.0, 0.5, 2.0], "entropy", mean_one=False)
    # agreement -> 1/H; tie -> 0; disagreement -> 0
    assert w[0] == pytest.approx(1 / h, rel=1e-9) and w[0] == pytest.approx(1.7176141, rel=1e-6)
    assert w[1] == 0.0 and w[2] == 0.0
    # gap 0 (not a tie, just tiny): H -> ln 2, w -> 1/ln 2
    w0 = reference_weights([1e-9], [0.0], "entropy", mean_one=False)
    assert w0[0] == pytest.approx(1 / math.log(2), rel=1e-6)


def test_entropy_weights_stay_finite_for_huge_gaps():
    w = reference_weights([1e6, 800.0, 40.0, 1.0], [0.0, 0.0, 0.0, 0.0], "entropy", entropy_floor=0.01,
                          mean_one=False)
    assert np.all(np.isfinite(w))
    assert w[0] == pytest.approx(100.0) and w[1] == pytest.approx(100.0) and w[2] == pytest.approx(100.0)
    assert w[3] == pytest.approx(1.7176141, rel=1e-6)


def test_entropy_weights_scaled_to_mean_one():
    rc, rr = [1.0, 3.0, -1.0, 0.2], [0.0, 0.0, 0.0, 0.0]
    raw = reference_weights(rc, rr, "entropy", mean_one=False)
    scaled = reference_weights(rc, rr, "entropy")
    assert scaled.mean() == pytest.approx(1.0)
    assert scaled == pytest.approx(raw * 4 / raw.sum())
    assert scaled[2] == 0.0


def test_uniform_and_filter_schemes():
    rc, rr = [1.0, 0.0, -2.0], [0.0, 0.0, 3.0]
    assert list(reference_weights(rc, rr, "uniform")) == [1.0, 1.0, 1.0]
    assert list(reference_weights(rc, rr, "filter")) == [1.0, 0.0, 0.0]


def test_non_finite_reference_score_is_rejected():
    with pytest.raises(ValueError, match="row 1"):
        reference_weights([0.0, float("nan")], [0.0, 1.0])


def test_tlt_counts():
    assert tlt_cut_points(3, 5) == [1, 2, 3, 4, 5]
    assert tlt_cut_points(7, 2) == list(range(1, 8))
    assert tlt_cut_points(0, 0) == []


def test_sst_distribution_and_reproducibility():
    K, T, n = 5, 40, 20000
    rng = np.random.default_rng(0)
    cuts = [sst_cut_points(T, 10, K, rng) for _ in range(n)]
    ks = np.array([len(c) for c in cuts])
    # k ~ U{0..2K}: mean K, all 2K+1 values, each about 1/(2K+1)
    assert set(ks) == set(range(2 * K + 1))
    assert ks.mean() == pytest.approx(K, abs=0.1)
    counts = np.bincount(ks, minlength=2 * K + 1) / n
    assert np.all(np.abs(counts - 1 / (2 * K + 1)) < 0.01)
    ts = np.concatenate([c for c in cuts if c])
    assert ts.min() == 1 and ts.max() == T  # t ~ U{1..T}, T = max(|y_w|, |y_l|)
    assert np.abs(np.bincount(ts, minlength=T + 1)[1:] / len(ts) - 1 / T).max() < 0.005
    again = np.random.default_rng(0)
    assert [sst_cut_points(T, 10, K, again) for _ in range(50)] == cuts[:50]
