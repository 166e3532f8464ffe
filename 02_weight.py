"""Stage 2: score partial pairs with a reference RM r_phi and weight them.

    python 02_weight.py --input runs/x/partial.jsonl --output runs/x/weighted.jsonl \\
        --ref-rm runs/x/orm --scheme entropy

--scheme entropy  p = sigmoid(|r_phi(y_w[:t]) - r_phi(y_l[:t])|), H = -(p log p + (1-p) log(1-p)),
                  w = 1/max(H, --entropy-floor) if r_phi(y_w[:t]) > r_phi(y_l[:t]) else 0 (ties: 0)
         uniform  w = 1 (the paper's Eq. 2 ablation)
         filter   w = 1 if the reference agrees with the label, else 0
Weights are always finite: H is floored at --entropy-floor (default 0.01, so w <= 100), then, unless
--no-normalize, all weights are scaled to mean 1 over the file (the loss keeps the ablation's scale).
For a decoder reference RM, all rows cut from one pair are scored with one forward pass per response.
Scores are appended to OUTPUT.scores.jsonl as they come (kept as a cache, keyed by the reference's weights
checksum, --max-length and a hash of prompt and both texts), so --resume continues a killed run, a rerun with
another --scheme costs no forward pass, and a changed reference, length or text is scored afresh.
In:  partial JSONL (01's output).  Out: the same rows plus "ref_chosen", "ref_rejected", "weight".
"""
import argparse
import hashlib
import json
import logging
import math
from collections import defaultdict

import torch
from tqdm import tqdm

from common.data import read_rows
from common.io import (DataError, ResumableJsonlWriter, add_device_args, add_max_length_arg,
                       check_output_differs, input_checksums, positive_float, positive_int, read_jsonl, run_main,
                       write_jsonl, write_manifest)
from common.losses import DEFAULT_ENTROPY_FLOOR, reference_weights
from common.models import (device_fields, device_setup, dtype_name, load_reward_model, load_tokenizer, model_identity,
                           rm_max_length)
from common.rewards import RMFormat, score, score_prefixes

log = logging.getLogger("weight")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="partial pairs JSONL from 01_build_partial.py")
    p.add_argument("--output", required=True, help="weighted JSONL to write")
    p.add_argument("--ref-rm", required=True, help="reference RM: a folder from 03_train.py, hub id or alias")
    p.add_argument("--scheme", choices=["entropy", "uniform", "filter"], default="entropy")
    p.add_argument("--entropy-floor", type=positive_float, default=DEFAULT_ENTROPY_FLOOR,
                   help="H is clamped at this value, so a weight is at most 1/floor (default 0.01)")
    p.add_argument("--no-normalize", action="store_true", help="keep raw 1/H weights (no mean-1 scaling)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    add_max_length_arg(p)
    p.add_argument("--pairs-per-step", type=positive_int, default=64, help="pairs scored between two appends")
    p.add_argument("--rm-format", choices=["open", "closed"], default="open",
                   help="closed: the reference sees every cut as a closed chat turn (docs/scoring.md)")
    p.add_argument("--resume", action="store_true", help="keep the scores already in OUTPUT.scores.jsonl")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    return p.parse_args()


def load_partial(path):
    rows = []
    for lineno, row in read_rows(path, "partial pairs", id_required=True, required=("t",), nonempty=("prompt",),
                                 strings=("chosen", "rejected")):
        if not isinstance(row["t"], int) or isinstance(row["t"], bool) or row["t"] < 0:
            raise DataError(f"{path}:{lineno}: field 't': expected an integer >= 0, got {row['t']!r}")
        row.setdefault("pair_id", row["id"])
        rows.append(row)
    return rows


def score_key(reference, max_length, row):
    """What a cached reference score depends on: the reference's weights, the input rule and the texts."""
    ident = reference["weights_sha256"] or reference["path"] or reference["name"]
    text = json.dumps([ident, max_length, row["prompt"], row["chosen"], row["rejected"]], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def score_group(model, fmt, rows, batch_size):
    """Reference scores for rows that share pair_id: one forward over the longest cut when possible."""
    chosen_scores, rejected_scores = [None] * len(rows), [None] * len(rows)
    for side, out in (("chosen", chosen_scores), ("rejected", rejected_scores)):
        by_pair = defaultdict(list)
        for k, row in enumerate(rows):
            by_pair[row["pair_id"]].append(k)
        prompts, fulls, lengths, owners, loose = [], [], [], [], []
        for members in by_pair.values():
            longest = max(members, key=lambda k: rows[k]["t"])
            full_ids = fmt.response_ids(rows[longest][side])
            nested, ts = [], []
            for k in members:
                ids = fmt.response_ids(rows[k][side])
                if full_ids[: len(ids)] == ids:
                    nested.append(k)
                    ts.append(len(ids))
                else:
                    loose.append(k)  # re-tokenizing a cut text changed its ids: score it alone
            prompts.append(rows[longest]["prompt"])
            fulls.append(rows[longest][side])
            lengths.append(ts)
            owners.append(nested)
        if fmt.fast_prefixes:
            for members, values in zip(owners, score_prefixes(model, fmt, prompts, fulls, lengths, batch_size)):
                for k, v in zip(members, values):
                    out[k] = v
        else:
            loose = list(range(len(rows)))
        if loose:
            values = score(model, fmt, [rows[k]["prompt"] for k in loose], [rows[k][side] for k in loose],
                           batch_size)
            for k, v in zip(loose, values):
                out[k] = v
    # A cut before the replies differ gives both sides the same text: one RM input, a tie in every precision
    # (scored in two forwards of other lengths, fp32 would differ in its last bits and call it an agreement).
    for k, row in enumerate(rows):
        if row["chosen"] == row["rejected"]:
            rejected_scores[k] = chosen_scores[k]
    return chosen_scores, rejected_scores


def score_rows(model, fmt, rows, keys, scores_path, args):
    """The reference's scores of every row not yet in SCORES_PATH, pair by pair (all cuts of one pair together),
    appended as they come. A cached score is reused only for the same reference weights, max length and texts
    (the key), never by row id alone."""
    with ResumableJsonlWriter(scores_path, key="key", resume=args.resume) as writer:
        todo = [r for r, k in zip(rows, keys) if k not in writer.done]
        key_of = {r["id"]: k for r, k in zip(rows, keys)}  # ids are unique (load_partial)
        if args.resume and len(todo) < len(rows):  # a first run has nothing to resume
            log.info("resuming: %d rows already scored, %d to go", len(rows) - len(todo), len(todo))
        pair_order = list(dict.fromkeys(r["pair_id"] for r in todo))
        by_pair = defaultdict(list)
        for r in todo:
            by_pair[r["pair_id"]].append(r)
        bar = tqdm(total=len(todo), desc="reference scores", unit="row")
        for s in range(0, len(pair_order), args.pairs_per_step):
            chunk = [r for pid in pair_order[s:s + args.pairs_per_step] for r in by_pair[pid]]
            sc, sr = score_group(model, fmt, chunk, args.batch_size)
            for row, a, b in zip(chunk, sc, sr):
                if not (math.isfinite(a) and math.isfinite(b)):  # one line naming the RM and the row
                    bar.close()
                    raise DataError(f"{args.ref_rm}: the RM's score of row {row['id']!r} of {args.input} is not "
                                    f"finite ({a}, {b})")
                writer.write({"id": row["id"], "key": key_of[row["id"]], "ref_chosen": a, "ref_rejected": b})
            bar.update(len(chunk))
        bar.close()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(args.seed)
    device, dtype = device_setup(args)
    scores_path = args.output + ".scores.jsonl"
    check_output_differs(args.output, args.input)
    check_output_differs(scores_path, args.input)
    checksums = input_checksums([args.input])
    rows = load_partial(args.input)
    reference = model_identity(args.ref_rm)
    max_length = rm_max_length(args.ref_rm, args.max_length)
    # a score depends on the input rule and, off fp32, on the precision it was computed in
    rule = max_length if args.rm_format == "open" else (max_length, "closed")
    if dtype != torch.float32:
        rule = [rule, dtype_name(dtype)]
    keys = [score_key(reference, rule, r) for r in rows]

    tokenizer = load_tokenizer(args.ref_rm)
    model = load_reward_model(args.ref_rm, tokenizer=tokenizer, device=device, dtype=dtype).eval()
    try:
        fmt = RMFormat(tokenizer, model, max_length=max_length, closed=args.rm_format == "closed")
    except ValueError as e:
        raise DataError(f"--rm-format {args.rm_format}: {e}") from None

    score_rows(model, fmt, rows, keys, scores_path, args)

    scores = {r["key"]: r for _, r in read_jsonl(scores_path, required=("key", "ref_chosen", "ref_rejected"))}
    ref_c = [scores[k]["ref_chosen"] for k in keys]
    ref_r = [scores[k]["ref_rejected"] for k in keys]
    weights = reference_weights(ref_c, ref_r, args.scheme, args.entropy_floor, mean_one=not args.no_normalize)
    out_rows = [{**r, "ref_chosen": a, "ref_rejected": b, "weight": float(w)}
                for r, a, b, w in zip(rows, ref_c, ref_r, weights)]
    write_jsonl(args.output, out_rows)
    agree = sum(a > b for a, b in zip(ref_c, ref_r)) / max(len(rows), 1)
    summary = {"rows": len(rows), "reference_agreement": agree, "weight_mean": float(weights.mean()),
               "weight_max": float(weights.max()) if len(weights) else 0.0,
               "zero_weight_rows": int((weights == 0).sum()),
               # over every row, those scored now and those a resumed run took from the cache
               "truncated_inputs": sum(fmt.truncates(r["prompt"], r[side]) for r in rows
                                       for side in ("chosen", "rejected")),
               "scheme": args.scheme}
    write_manifest(args.output, args, inputs={**checksums, args.ref_rm: reference["weights_sha256"]},
                   extra={"summary": summary, "reference": reference},
                   resolved={"max_length": max_length, **device_fields(device, dtype)})
    log.info("%s", summary)


if __name__ == "__main__":
    run_main(main)
