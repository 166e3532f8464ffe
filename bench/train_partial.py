"""Benchmark: SP-PRM training epochs, one forward per row and side vs one forward per pair side (grouped).

    python bench/train_partial.py [--pairs 16] [--K 5] [--max-length 128] [--rounds 2] [--cost-rounds 1]

RM: SmolLM2-135M-Instruct with a fresh scalar head (a decoder RM). Data: SST cuts (K = --K, seed 0) of the
first --pairs real hh-rlhf:train pairs. An epoch is the forward and backward pass of every batch (batches
of about --batch-size rows made of whole pairs, the same batches for both paths; no optimizer step, so
every round sees the same weights). Rounds interleave the paths and the medians are compared; the load
average is recorded with each timing. Also timed: a TLT epoch (every cut point) with grouping, as a
multiple of the ORM epoch (complete responses only) on the same pairs. `max_grad_diff` is the largest
absolute difference of any parameter's gradient between the two paths on the same batches (float32).
Prints one JSON object.
"""
import argparse
import json

import numpy as np
import torch
from common_bench import interleaved, load_average

from common.data import load_pairs
from common.losses import sst_cut_points, tlt_cut_points
from common.models import SMOLLM2, load_reward_model, load_tokenizer
from common.rewards import RMFormat, batch_loss, training_batches, training_units


def cut_rows(fmt, pairs, truncation, K, seed=0):
    """The rows 01_build_partial.py writes for these pairs."""
    rng = np.random.default_rng(seed)
    rows = []
    for pair in pairs:
        n_w, n_l = len(fmt.response_ids(pair["chosen"])), len(fmt.response_ids(pair["rejected"]))
        cuts = {"sst": lambda: sst_cut_points(n_w, n_l, K, rng), "tlt": lambda: tlt_cut_points(n_w, n_l),
                "full": lambda: [max(n_w, n_l)]}[truncation]()
        for k, t in enumerate(cuts):
            rows.append({**pair, "id": f"{pair['id']}@{k}", "pair_id": pair["id"], "t": t,
                         "chosen": fmt.cut(pair["chosen"], t), "rejected": fmt.cut(pair["rejected"], t)})
    return rows


def batches_of_rows(fmt, rows, batch_size):
    """Batches as lists of rows: whole pairs of about batch_size rows (the grouped path's batching)."""
    units = training_units(fmt, rows, grouped=True)
    by_pair = {}
    for row in rows:
        by_pair.setdefault(row["pair_id"], []).append(row)
    pair_ids = list(by_pair)
    return [[row for i in batch for row in by_pair[pair_ids[i]]]
            for batch in training_batches(units, batch_size, seed=0, epoch=0, window=50)]


def epoch(model, batches, pad_id):
    """Forward and backward of every batch of units; returns forwards run and the first batch's gradients."""
    forwards, first = 0, None
    for units in batches:
        model.zero_grad(set_to_none=True)
        loss, counts = batch_loss(model, units, pad_id, decoder=True, device="cpu")
        loss.backward()
        forwards += counts["forwards"]
        if first is None:
            first = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return forwards, first


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (whole pairs)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of per-row vs grouped")
    p.add_argument("--cost-rounds", type=int, default=1, help="interleaved rounds of TLT vs ORM epochs")
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_reward_model(SMOLLM2, tokenizer=tokenizer, allow_new_head=True)
    model.train()
    fmt = RMFormat(tokenizer, model, max_length=args.max_length)
    pairs = load_pairs("hh-rlhf:train")[: args.pairs]
    pad = tokenizer.pad_token_id

    sst = batches_of_rows(fmt, cut_rows(fmt, pairs, "sst", args.K), args.batch_size)
    tlt = batches_of_rows(fmt, cut_rows(fmt, pairs, "tlt", args.K), args.batch_size)
    orm = batches_of_rows(fmt, cut_rows(fmt, pairs, "full", args.K), args.batch_size)
    units = lambda batches, grouped: [training_units(fmt, rows, grouped) for rows in batches]  # noqa: E731
    per_row, grouped, tlt_grouped, orm_rows = units(sst, False), units(sst, True), units(tlt, True), units(orm, False)
    timing, results = interleaved({
        "per_row": lambda: epoch(model, per_row, pad),
        "grouped": lambda: epoch(model, grouped, pad),
    }, args.rounds)
    cost, _ = interleaved({  # TLT vs ORM epochs: a cost ratio near 1, one round is enough
        "tlt_grouped": lambda: epoch(model, tlt_grouped, pad),
        "orm": lambda: epoch(model, orm_rows, pad),
    }, args.cost_rounds)
    timing.update(cost)
    (forwards_row, grads_row), (forwards_grouped, grads_grouped) = results["per_row"], results["grouped"]
    max_grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads_row, grads_grouped))
    median = {name: t["median_s"] for name, t in timing.items()}
    print(json.dumps({
        "benchmark": "train_partial",
        "rm": "smollm2-135m-instruct + fresh scalar head",
        "pairs": len(pairs), "max_length": args.max_length, "K": args.K,
        "rows": sum(len(b) for b in sst), "batches": len(sst),
        "forwards_per_row_path": forwards_row, "forwards_grouped": forwards_grouped,
        "per_row_epoch_s": round(median["per_row"], 3), "grouped_epoch_s": round(median["grouped"], 3),
        "speedup": round(median["per_row"] / median["grouped"], 2),
        "max_grad_diff": max_grad_diff,
        "tlt_rows": sum(len(b) for b in tlt), "tlt_epoch_s": round(median["tlt_grouped"], 3),
        "orm_epoch_s": round(median["orm"], 3),
        "tlt_over_orm_epoch": round(median["tlt_grouped"] / median["orm"], 2),
        "rounds": args.rounds, "cost_rounds": args.cost_rounds, "timing": timing, "threads": torch.get_num_threads(),
        "load_1min_end": load_average(),
    }, indent=2))


if __name__ == "__main__":
    main()
