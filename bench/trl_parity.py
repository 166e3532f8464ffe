"""Parity: 03_train.py's ORMs against TRL's RewardTrainer, the standard reward trainer, on the same pairs.

    python bench/trl_parity.py --orms runs/reproduce/orm_s0 runs/reproduce/orm_s1 runs/reproduce/orm_s2

For each seed, TRL's RewardTrainer (trl==1.16.0) trains MiniLM-L6 on hh-rlhf:train with the parity settings
(lr 5e-5, batch 8, max length 256, 1 epoch, linear decay without warm-up, dropout off, fp32) and is
scored on hh-rlhf:heldout. Its input is one sequence, [CLS] dialogue [SEP] (the HH text: prompt, a space, reply).

TRL drops every pair with a side longer than max length, in training *and in evaluation*: its held-out
accuracy is over the held-out pairs it keeps (the shorter ones), not over all 307. So our ORMs (one per
seed, in the order of --seeds; 03_train.py keeps every pair, truncating by the RM input rule) are scored on
all held-out pairs, on exactly the pairs TRL keeps and on those it drops, and the two trainers are compared
on the same pairs: per seed (95% bootstrap over pairs, paired) and over seeds (95% t-interval). Accuracy =
the share of pairs whose chosen side scores above the rejected one; TRL's own batch-averaged
`eval_accuracy` is reported too.

TRL models are saved under --out/trl_s<seed> and reused by a rerun. Prints one JSON object, also written to
--out/parity.json. Needs `pip install trl==1.16.0` (with torch pinned, as in requirements.txt).
"""
import argparse
import json
import os
import time

import numpy as np
from common_bench import load_average

from common.data import load_pairs
from common.io import DataError, positive_float, positive_int, run_main, write_json
from common.metrics import bootstrap_ci, seed_interval
from common.models import MINILM, load_reward_model, load_tokenizer, resolve_model_path, training_args
from common.rewards import RMFormat, score, score_encoded


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orms", nargs="+", required=True, help="our ORMs (03_train.py folders), one per seed")
    p.add_argument("--seeds", default="0,1,2", help="comma list, one per --orms folder")
    p.add_argument("--train", default="hh-rlhf:train")
    p.add_argument("--eval", default="hh-rlhf:heldout")
    p.add_argument("--init", default=MINILM)
    p.add_argument("--lr", type=positive_float, default=5e-5)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--limit", type=positive_int, default=None, help="first N train pairs only (a quick try)")
    p.add_argument("--out", default="runs/parity_trl")
    args = p.parse_args()
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise DataError(f"--seeds: comma list of integers, got {args.seeds!r}") from None
    if len(args.seeds) != len(args.orms):
        raise DataError(f"--seeds names {len(args.seeds)} seeds for {len(args.orms)} --orms folders")
    return args


def dialogue_ids(tokenizer, pair, side):
    """TRL's input for a non-conversational pair: the whole dialogue as one text."""
    return tokenizer(pair["prompt"] + " " + pair[side]).input_ids


def run_settings(args):
    """What a TRL model and its eval_accuracy depend on (besides the seed)."""
    return {"init": args.init, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
            "epochs": 1, "train": args.train, "eval": args.eval, "limit": args.limit}


def train_trl(args, seed, tokenizer, train_ids, eval_ids, folder):
    """Train (or reuse) TRL's RM for one seed into folder; returns (TRL's own eval_accuracy, training seconds)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    settings = {**run_settings(args), "seed": seed}
    done = os.path.join(folder, "trl_eval.json")
    if os.path.exists(done):
        with open(done) as f:
            record = json.load(f)
        if record.get("settings") != settings:
            raise DataError(f"{folder}: made with other settings ({record.get('settings')}, now {settings}); "
                            "use another --out or remove it")
        return record["eval_accuracy"], record["seconds"]
    config = RewardConfig(
        output_dir=folder + ".tmp", seed=seed, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16, num_train_epochs=1, max_length=args.max_length,
        # TRL's defaults except: fp32 (its bf16 default is emulated on CPUs without bf16 units), and no
        # gradient checkpointing (the same gradients, recomputed: slower only)
        bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=25)
    started = time.time()
    trainer = RewardTrainer(model=resolve_model_path(args.init), args=config, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict(train_ids), eval_dataset=Dataset.from_dict(eval_ids))
    trainer.train()
    seconds = time.time() - started
    eval_accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(folder + ".tmp")
    write_json(os.path.join(folder + ".tmp", "trl_eval.json"),
               {"eval_accuracy": eval_accuracy, "seconds": seconds, "settings": settings})
    os.replace(folder + ".tmp", folder)
    return eval_accuracy, seconds


def correct(r_chosen, r_rejected):
    return np.greater(r_chosen, r_rejected).astype(float)


def summary(values):
    mean, ci = seed_interval(values)
    return {"mean": mean, "ci95": ci, "per_seed": values}


def check_orms(paths, seeds):
    """Every ORM is a trained RM made with the seed it is listed for."""
    for path, seed in zip(paths, seeds):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise DataError(f"{path}: no trained RM here (make reproduce trains the ORMs that make parity reads)")
        made_with = training_args(path).get("seed")
        if made_with != seed:
            raise DataError(f"{path}: trained with seed {made_with}, listed for seed {seed} (--seeds)")


def seed_row(args, path, seed, tokenizer, train_ids, kept_ids, kept, heldout):
    """TRL's RewardTrainer trained with SEED against our ORM of that seed (PATH), on the held-out pairs: TRL's
    accuracy on the pairs it keeps, ours on all, kept and dropped, and ours minus TRL's paired."""
    prompts = [p["prompt"] for p in heldout]
    folder = os.path.join(args.out, f"trl_s{seed}")
    trl_eval_accuracy, took = train_trl(args, seed, tokenizer, train_ids, kept_ids, folder)
    trl = load_reward_model(folder)
    r_w = score_encoded(trl, [{"input_ids": ids} for ids in kept_ids["chosen_ids"]], tokenizer.pad_token_id)
    r_l = score_encoded(trl, [{"input_ids": ids} for ids in kept_ids["rejected_ids"]], tokenizer.pad_token_id)
    trl_correct = correct(r_w, r_l)

    ours = load_reward_model(path)
    fmt = RMFormat(load_tokenizer(path), ours, max_length=args.max_length)
    ours_correct = correct(score(ours, fmt, prompts, [p["chosen"] for p in heldout]),
                           score(ours, fmt, prompts, [p["rejected"] for p in heldout]))  # ties: wrong
    ours_kept, ours_dropped = ours_correct[kept], ours_correct[~kept]
    return {
        "seed": seed, "orm": path,
        "trl": {"accuracy_kept": float(trl_correct.mean()), "ci95": bootstrap_ci(trl_correct),
                "eval_accuracy_trainer": trl_eval_accuracy, "train_seconds": round(took, 1)},
        "ours": {"accuracy_all": float(ours_correct.mean()),
                 "ci95_all": bootstrap_ci(ours_correct),
                 "accuracy_kept": float(ours_kept.mean()), "ci95_kept": bootstrap_ci(ours_kept),
                 "accuracy_dropped": float(ours_dropped.mean()) if len(ours_dropped) else None,
                 "ci95_dropped": bootstrap_ci(ours_dropped)},
        "ours_minus_trl_kept": float(ours_kept.mean() - trl_correct.mean()),
        "ours_minus_trl_kept_ci95": bootstrap_ci(ours_kept, paired_with=trl_correct)}


def main():
    args = parse_args()
    check_orms(args.orms, args.seeds)
    tokenizer = load_tokenizer(args.init)
    train = load_pairs(args.train)[:args.limit]
    heldout = load_pairs(args.eval)

    def tokenized(pairs):
        return {"chosen_ids": [dialogue_ids(tokenizer, p, "chosen") for p in pairs],
                "rejected_ids": [dialogue_ids(tokenizer, p, "rejected") for p in pairs]}

    train_ids, eval_ids = tokenized(train), tokenized(heldout)

    def fits(ids, i):
        return len(ids["chosen_ids"][i]) <= args.max_length and len(ids["rejected_ids"][i]) <= args.max_length

    kept = np.array([fits(eval_ids, i) for i in range(len(heldout))])
    n_train_kept = sum(fits(train_ids, i) for i in range(len(train)))
    kept_ids = {k: [v for v, keep in zip(vs, kept) if keep] for k, vs in eval_ids.items()}

    rows = []
    for path, seed in zip(args.orms, args.seeds):
        rows.append(seed_row(args, path, seed, tokenizer, train_ids, kept_ids, kept, heldout))
        print(json.dumps(rows[-1]), flush=True)

    result = {
        "settings": run_settings(args),
        "train_pairs": len(train), "train_pairs_kept_by_trl": int(n_train_kept),
        "heldout_pairs": len(heldout), "heldout_pairs_kept_by_trl": int(kept.sum()),
        "per_seed": rows,
        "over_seeds": {
            "trl_kept": summary([r["trl"]["accuracy_kept"] for r in rows]),
            "trl_eval_accuracy_trainer": summary([r["trl"]["eval_accuracy_trainer"] for r in rows]),
            "ours_all": summary([r["ours"]["accuracy_all"] for r in rows]),
            "ours_kept": summary([r["ours"]["accuracy_kept"] for r in rows]),
            "ours_dropped": summary([r["ours"]["accuracy_dropped"] for r in rows]) if (~kept).any() else None,
            "ours_minus_trl_kept": summary([r["ours_minus_trl_kept"] for r in rows]),
        },
        "load_1min": load_average(),
    }
    write_json(os.path.join(args.out, "parity.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
