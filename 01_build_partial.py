"""Stage 1: cut preference pairs into partial pairs (x, y_w[:t], y_l[:t]) with the same label.

    python 01_build_partial.py --input hh-rlhf:train --output runs/x/partial.jsonl \\
        --tokenizer minilm-l6 --truncation sst --K 5 --seed 0

--truncation full  keep whole responses (the ORM's training data)
             tlt   every t in 1..T, T = max(|y_w|, |y_l|)
             sst   per pair k ~ U{0..2K}, then t_1..t_k ~ U{1..T} (the paper's stochastic sampling)
t counts response tokens of the RM's tokenizer; a prefix longer than its response is the whole response.
--max-rows N / --match-rows FILE keep a seeded uniform sample of N rows (or as many as FILE has), in their
order: paper Table 5 compares TLT and SST at the same number of training rows, e.g.
    python 01_build_partial.py --truncation tlt ... --match-rows runs/x/sst.jsonl --output runs/x/tlt_matched.jsonl
In:  pairs JSONL {"id","prompt","chosen","rejected"} or a named set (hh-rlhf:train, gsm8k-pairs:train, ...)
Out: partial JSONL: the pair's fields plus "pair_id", "t", "complete", with chosen/rejected cut at t.
"""
import argparse
import logging

import numpy as np
from tqdm import tqdm

from common.data import load_pairs
from common.io import (check_output_differs, input_checksums, positive_int, probability, read_jsonl, run_main,
                       write_jsonl, write_manifest)
from common.losses import sst_cut_points, tlt_cut_points
from common.models import load_config, load_tokenizer
from common.rewards import RMFormat

log = logging.getLogger("build_partial")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="pairs JSONL or a named set such as hh-rlhf:train")
    p.add_argument("--output", required=True, help="partial pairs JSONL to write")
    p.add_argument("--tokenizer", required=True, help="the RM's tokenizer: alias, hub id or folder")
    p.add_argument("--truncation", choices=["full", "tlt", "sst"], default="sst")
    p.add_argument("--K", type=positive_int, default=5, help="SST: k ~ U{0..2K} cut points per pair (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N pairs")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-rows", type=positive_int, default=None, help="keep a seeded sample of N rows")
    size.add_argument("--match-rows", default=None, help="keep as many rows as this partial JSONL has (Table 5)")
    p.add_argument("--subset", default=None, help="hh-rlhf-hub: comma list of its subsets (default: all four)")
    p.add_argument("--fraction", type=probability, default=None, help="keep a seeded share of the pairs (--seed)")
    p.add_argument("--data-dir", default=None, help="folder of the real data sets (else $SPPRM_DATA_DIR)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad input line: stop with a clear error (default) or skip it and count it")
    return p.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    stats = {}
    check_output_differs(args.output, args.input, args.match_rows)
    checksums = input_checksums([args.input] + ([args.match_rows] if args.match_rows else []))
    max_rows = args.max_rows
    if args.match_rows:
        max_rows = sum(1 for _ in read_jsonl(args.match_rows, required=("t",)))
    pairs = load_pairs(args.input, args.data_dir, on_error=args.on_error, stats=stats, subset=args.subset,
                       fraction=args.fraction, seed=args.seed)
    if args.limit:
        pairs = pairs[: args.limit]
    tokenizer = load_tokenizer(args.tokenizer)
    fmt = RMFormat(tokenizer, load_config(args.tokenizer))
    rng = np.random.default_rng(args.seed)

    rows = []
    for pair in tqdm(pairs, desc=f"cutting ({args.truncation})", unit="pair"):
        n_w, n_l = len(fmt.response_ids(pair["chosen"])), len(fmt.response_ids(pair["rejected"]))
        T = max(n_w, n_l)
        if args.truncation == "full":
            cuts = [T]
        elif args.truncation == "tlt":
            cuts = tlt_cut_points(n_w, n_l)
        else:
            cuts = sst_cut_points(n_w, n_l, args.K, rng)
        seen = {}
        for t in cuts:
            seen[t] = seen.get(t, 0) + 1  # SST may draw the same t twice; both copies are kept
            rows.append({
                **pair,
                "id": f"{pair['id']}@{t}" + (f"#{seen[t]}" if seen[t] > 1 else ""),
                "pair_id": pair["id"],
                "t": t,
                "complete": t >= T,
                "chosen": fmt.cut(pair["chosen"], t),
                "rejected": fmt.cut(pair["rejected"], t),
            })
    rows_cut = len(rows)
    if max_rows is not None and max_rows < len(rows):
        keep = np.random.default_rng([args.seed, 1]).choice(len(rows), size=max_rows, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    elif max_rows is not None:
        log.warning("%d rows asked for, %d cut: all are kept", max_rows, len(rows))
    write_jsonl(args.output, rows)
    counts = {"pairs_read": stats.get("read", len(pairs)), "pairs_used": len(pairs),
              "pairs_skipped": stats.get("skipped", 0), "skip_reasons": stats.get("skip_reasons", {}),
              "rows_cut": rows_cut, "rows_written": len(rows)}
    write_manifest(args.output, args, inputs=checksums, extra={"counts": counts})
    log.info("read %d rows, skipped %d, used %d pairs, wrote %d partial pairs to %s", counts["pairs_read"],
             counts["pairs_skipped"], counts["pairs_used"], len(rows), args.output)


if __name__ == "__main__":
    run_main(main)
