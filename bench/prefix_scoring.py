"""Benchmark: scores of all prefixes of 128-token responses, one forward per response vs one per prefix.

    python bench/prefix_scoring.py [--responses 2] [--tokens 64] [--rounds 2]
    python bench/prefix_scoring.py --responses 4 --tokens 128      # the larger workload

RM: SmolLM2-135M-Instruct with a fresh scalar head (the default decoder RM backbone); responses are real
hh-rlhf:heldout replies cut to --tokens tokens. Prints one JSON object with `speedup` (per-prefix time
over one-forward time) and `max_abs_diff` (largest score difference between the two paths).
"""
import argparse
import json

import torch
from common_bench import interleaved, load_average

from common.data import load_pairs
from common.models import SMOLLM2, load_reward_model, load_tokenizer
from common.rewards import RMFormat, score_prefixes, score_prefixes_reference


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_reward_model(SMOLLM2, tokenizer=tokenizer, allow_new_head=True).eval()
    fmt = RMFormat(tokenizer, model, max_length=4096)
    prompts, responses = [], []
    for pair in load_pairs("hh-rlhf:heldout"):
        for side in ("chosen", "rejected"):
            ids = fmt.response_ids(pair[side])
            if len(ids) >= args.tokens and len(prompts) < args.responses:
                prompts.append(pair["prompt"])
                responses.append(tokenizer.decode(ids[: args.tokens]))
    responses = [r for r in responses]
    n_tokens = [len(fmt.response_ids(r)) for r in responses]
    timing, results = interleaved({
        "one_forward": lambda: score_prefixes(model, fmt, prompts, responses, batch_size=args.batch_size),
        "per_prefix": lambda: score_prefixes_reference(model, fmt, prompts, responses, batch_size=args.batch_size),
    }, args.rounds)
    fast, slow = results["one_forward"], results["per_prefix"]
    max_abs_diff = max(abs(a - b) for f, s in zip(fast, slow) for a, b in zip(f, s))
    print(json.dumps({
        "benchmark": "prefix_scoring",
        "rm": "smollm2-135m-instruct + fresh scalar head",
        "responses": len(responses), "response_tokens": n_tokens,
        "prefixes_scored": sum(len(f) for f in fast),
        "one_forward_s": round(timing["one_forward"]["median_s"], 4),
        "per_prefix_s": round(timing["per_prefix"]["median_s"], 4),
        "speedup": round(timing["per_prefix"]["median_s"] / timing["one_forward"]["median_s"], 2),
        "max_abs_diff": max_abs_diff,
        "rounds": args.rounds, "timing": timing, "threads": torch.get_num_threads(),
        "load_1min_end": load_average(),
    }, indent=2))


if __name__ == "__main__":
    main()
