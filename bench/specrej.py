"""Benchmark: speculative rejection against Best-of-N at the same N, on the cached RM path.

    python bench/specrej.py [--prompts 8] [--n 8] [--max-new-tokens 32] [--rounds 2]

Policy SmolLM2-135M-Instruct; RM SmolLM2-135M with a fresh scalar head (a decoder RM sharing the policy's
tokenizer: the cached RM path); the first --prompts hh-rlhf:heldout prompts of at most --max-prompt-tokens
tokens, decoded together. Best-of-N, specrej with alpha 0 (which must give Best-of-N's tokens) and specrej
with --alpha (a decision every quarter of the token budget by default) run interleaved for --rounds; wall
times are medians. Prints one JSON object: whether alpha 0 is identical, and at --alpha the ratios (specrej
over Best-of-N) of policy tokens, RM tokens and wall time, with the samples kept at each decision point.
"""
import argparse
import json

import torch
from common_bench import interleaved, load_average

from common.data import load_prompts
from common.models import SMOLLM2, load_policy, load_reward_model, load_tokenizer
from common.search import Policy, RewardModel, Search


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--decision-every", type=int, default=None, help="default: a quarter of the token budget")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    every = args.decision_every or max(1, args.max_new_tokens // 4)

    tok = load_tokenizer(SMOLLM2, padding_side="left")
    policy = Policy(load_policy(SMOLLM2), tok, SMOLLM2)
    rm = RewardModel(load_reward_model(SMOLLM2, tokenizer=tok, allow_new_head=True).eval(), tok,
                     "smollm2-135m + fresh head")
    prompts = [q for q in load_prompts("hh-rlhf:heldout")
               if len(policy.fmt.prompt_ids(q["prompt"])) <= args.max_prompt_tokens][: args.prompts]
    common = dict(n=args.n, max_new_tokens=args.max_new_tokens, seed=0)
    searches = {
        "bon": Search(policy, "bon", rm, "cached", **common),
        "specrej_alpha0": Search(policy, "specrej", rm, "cached", alpha=0.0, decision_every=every, **common),
        "specrej": Search(policy, "specrej", rm, "cached", alpha=args.alpha, decision_every=every, **common),
    }
    timing, results = interleaved({name: (lambda s=s: s.run(prompts)) for name, s in searches.items()},
                                  args.rounds)
    total = lambda name, key: sum(r["stats"][key] for r in results[name])  # noqa: E731
    bon, spec = results["bon"], results["specrej"]
    report = {
        "benchmark": "specrej", "policy": SMOLLM2, "rm": rm.name, "rm_path": "cached", "prompts": len(prompts),
        "n": args.n, "max_new_tokens": args.max_new_tokens, "alpha": args.alpha, "decision_every": every,
        "threads": torch.get_num_threads(),
        "alpha0_identical_to_bon": [r["tokens"] for r in results["specrej_alpha0"]] == [r["tokens"] for r in bon],
        "policy_tokens_ratio": round(total("specrej", "policy_tokens") / total("bon", "policy_tokens"), 3),
        "rm_tokens_ratio": round(total("specrej", "rm_tokens") / total("bon", "rm_tokens"), 3),
        "wall_time_ratio": round(timing["specrej"]["median_s"] / timing["bon"]["median_s"], 3),
        "kept": spec[0]["stats"]["kept"],
        "reward_mean": {"bon": sum(r["reward"] for r in bon) / len(bon),
                        "specrej": sum(r["reward"] for r in spec) / len(spec)},
        "same_answer_as_bon": sum(a["tokens"] == b["tokens"] for a, b in zip(spec, bon)),
        "tokens": {name: {"policy": total(name, "policy_tokens"), "rm": total(name, "rm_tokens")} for name in results},
        "timing": timing,
        "load_1min_end": load_average(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
