"""Benchmark: 03_train.py against TRL's RewardTrainer, whole process, on the same HH pairs.

    python bench/train_speed.py [--pairs 400] [--rounds 2]

Both train MiniLM-L6 on the first --pairs hh-rlhf:train pairs for one epoch at batch 8, lr 5e-5, max length
256 (TRL: RewardTrainer of trl==1.16.0 with the settings of bench/trl_parity.py, fp32, no evaluation; it drops
the pairs longer than max length, ours keeps and truncates every pair). Each run is a fresh process timed
from start to exit, as a user would see it (imports, model load, training, save); the two alternate for
--rounds rounds. Prints one JSON object with the medians and ours / TRL (below 1: ours is faster).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common_bench import load_average

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_trl(pairs, out):
    """One TRL training run (the --trl mode of this script, in its own process)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from common.data import load_pairs
    from common.models import MINILM, load_tokenizer, resolve_model_path
    from trl_parity import dialogue_ids

    tokenizer = load_tokenizer(MINILM)
    train = load_pairs("hh-rlhf:train")[:pairs]
    ids = {"chosen_ids": [dialogue_ids(tokenizer, p, "chosen") for p in train],
           "rejected_ids": [dialogue_ids(tokenizer, p, "rejected") for p in train]}
    config = RewardConfig(output_dir=out, seed=0, learning_rate=5e-5, per_device_train_batch_size=8,
                          num_train_epochs=1, max_length=256, bf16=False, gradient_checkpointing=False,
                          save_strategy="no", report_to="none", logging_steps=25)
    trainer = RewardTrainer(model=resolve_model_path(MINILM), args=config, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict(ids))
    trainer.train()
    trainer.save_model(out)


def timed(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batching", default="random", help="03_train.py --batching")
    p.add_argument("--trl", default=None, help=argparse.SUPPRESS)  # internal: one TRL run into this folder
    args = p.parse_args()
    if args.trl:
        return run_trl(args.pairs, args.trl)
    times = {"ours": [], "trl": []}
    loads = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("ours", "trl"):
                out = os.path.join(tmp, f"{name}{r}")
                cmd = [sys.executable, "03_train.py", "--input", "hh-rlhf:train", "--limit", str(args.pairs), "--init",
                       "minilm-l6", "--output", out, "--batch-size", "8", "--lr", "5e-5", "--max-length", "256",
                       "--save-steps", "0", "--batching", args.batching] if name == "ours" else \
                    [sys.executable, os.path.abspath(__file__), "--pairs", str(args.pairs), "--trl", out]
                loads[name].append(load_average())
                times[name].append(round(timed(cmd), 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"benchmark": "train_speed", "pairs": args.pairs, "batching": args.batching,
                      "seconds": times, "median_s": med, "ours_over_trl": round(med["ours"] / med["trl"], 3),
                      "load_1min": loads, "load_1min_end": load_average()}, indent=2))


if __name__ == "__main__":
    main()
