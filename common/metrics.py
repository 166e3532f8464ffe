"""Metrics of the paper: agreement rates of prefix scores, reward gaps (more in later sections)."""
import numpy as np


def agreement_rate(r_chosen, r_rejected):
    """AR_RM-SC: share of pairs where the RM scores the chosen (prefix) above the rejected one; ties disagree."""
    r_chosen, r_rejected = np.asarray(r_chosen, dtype=float), np.asarray(r_rejected, dtype=float)
    return float(np.mean(r_chosen > r_rejected)) if len(r_chosen) else float("nan")


def reward_gap(r_chosen, r_rejected):
    """Delta_r: mean |r(y_w[:t]) - r(y_l[:t])|."""
    r_chosen, r_rejected = np.asarray(r_chosen, dtype=float), np.asarray(r_rejected, dtype=float)
    return float(np.mean(np.abs(r_chosen - r_rejected))) if len(r_chosen) else float("nan")


def prefix_agreement(model, fmt, pairs, prefix_lengths, batch_size=16):
    """{t: {"ar_sc", "gap", "n"}} over pairs at each prefix length t (whole response when shorter)."""
    from common.rewards import score_prefixes

    prompts = [p["prompt"] for p in pairs]
    sw = score_prefixes(model, fmt, prompts, [p["chosen"] for p in pairs], lengths=prefix_lengths,
                        batch_size=batch_size)
    sl = score_prefixes(model, fmt, prompts, [p["rejected"] for p in pairs], lengths=prefix_lengths,
                        batch_size=batch_size)
    out = {}
    for k, t in enumerate(prefix_lengths):
        a, b = [s[k] for s in sw], [s[k] for s in sl]
        out[t] = {"ar_sc": agreement_rate(a, b), "gap": reward_gap(a, b), "n": len(a)}
    return out
