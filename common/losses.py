"""The SP-PRM formulas: weighted Bradley-Terry loss, truncation cut points (TLT, SST), reference weights.

  BT:      L = -E[ w * log sigmoid(r(x, y_w) - r(x, y_l)) ]          (w = 1 for the ORM and the ablation)
  TLT:     every t in 1..T, T = max(|y_w|, |y_l|)
  SST:     per pair k ~ U{0..2K} once, then t_1..t_k ~ U{1..T} (independent draws)
  weights: p = sigmoid(|r_phi(y_w[:t]) - r_phi(y_l[:t])|), H = -(p log p + (1-p) log(1-p)),
           w = 1/H if r_phi(y_w[:t]) > r_phi(y_l[:t]) else 0
Finiteness: H -> 0 as the gap grows, so H is floored at `entropy_floor` (default 0.01: w <= 100), and by
default the weights are then scaled to mean 1 over all rows, so the loss keeps the scale of the uniform
ablation. A tie (equal reference scores) is a disagreement: weight 0.
"""
import math

import numpy as np
import torch.nn.functional as F

DEFAULT_ENTROPY_FLOOR = 0.01


def bradley_terry_loss(r_chosen, r_rejected, weights=None):
    """-mean(w * log sigmoid(r_w - r_l)); weights default to 1."""
    per_pair = -F.logsigmoid(r_chosen - r_rejected)
    if weights is not None:
        per_pair = per_pair * weights
    return per_pair.mean()


def tlt_cut_points(n_chosen, n_rejected):
    """Token-level truncation: every t in 1..T."""
    return list(range(1, max(n_chosen, n_rejected) + 1))


def sst_cut_points(n_chosen, n_rejected, K, rng):
    """Stochastic sampling truncation: k ~ U{0..2K}, then k draws t ~ U{1..T} (sorted; repeats possible)."""
    T = max(n_chosen, n_rejected)
    k = int(rng.integers(0, 2 * K + 1))
    return sorted(int(t) for t in rng.integers(1, T + 1, size=k))


def binary_entropy_of_gap(gap):
    """H(sigmoid(|gap|)) computed stably: log p = -softplus(-g), log(1-p) = -softplus(g)."""
    g = np.abs(np.asarray(gap, dtype=np.float64))
    p = 1.0 / (1.0 + np.exp(-g))
    softplus = lambda x: np.logaddexp(0.0, x)  # noqa: E731
    return p * softplus(-g) + (1.0 - p) * softplus(g)


def reference_weights(ref_chosen, ref_rejected, scheme="entropy", entropy_floor=DEFAULT_ENTROPY_FLOOR,
                      mean_one=True):
    """Weights of partial pairs from the reference RM's scores. Always finite.

    entropy: 1/max(H, floor) where the reference agrees (r_w > r_l), else 0; then scaled to mean 1 if mean_one
    uniform: 1 everywhere (the paper's Eq. 2 ablation)
    filter:  1 where the reference agrees, else 0
    """
    rc = np.asarray(ref_chosen, dtype=np.float64)
    rr = np.asarray(ref_rejected, dtype=np.float64)
    if not (np.all(np.isfinite(rc)) and np.all(np.isfinite(rr))):
        bad = int(np.flatnonzero(~(np.isfinite(rc) & np.isfinite(rr)))[0])
        raise ValueError(f"reference score of row {bad} is not finite")
    agree = rc > rr
    if scheme == "uniform":
        return np.ones_like(rc)
    if scheme == "filter":
        return agree.astype(np.float64)
    if scheme != "entropy":
        raise ValueError(f"unknown weighting scheme {scheme!r}")
    if not entropy_floor > 0:
        raise ValueError("entropy_floor must be > 0 to keep weights finite")
    h = np.maximum(binary_entropy_of_gap(rc - rr), entropy_floor)
    w = np.where(agree, 1.0 / h, 0.0)
    if mean_one and w.sum() > 0:
        w = w * (len(w) / w.sum())
    assert np.all(np.isfinite(w))
    return w


def max_weight(entropy_floor=DEFAULT_ENTROPY_FLOOR):
    return 1.0 / entropy_floor if entropy_floor > 0 else math.inf
