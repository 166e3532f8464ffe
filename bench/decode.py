"""Benchmark: the decoding engine against the literal reference and against plain greedy decoding.

    python bench/decode.py [--prompts 8] [--max-new-tokens 32] [--reference-prompts 1]
    python bench/decode.py --max-new-tokens 64 --reference-prompts 2      # the larger workload
    python bench/decode.py --ratio-rounds 5       # also: ARGS over greedy (batch 8), 5 interleaved rounds, medians,
                                                  # with the models' forwards timed apart from the engine's own work

Policy SmolLM2-135M-Instruct; RM SmolLM2-135M with a fresh scalar head (a decoder RM sharing the policy's
tokenizer, so the engine uses the cached RM path); prompts: the first --prompts hh-rlhf:heldout prompts
of at most --max-prompt-tokens tokens. The literal reference (tests/reference_search.py: no cache, one RM
forward per candidate) is run on the first --reference-prompts of them; its time per prompt is compared
with the engine's time per prompt at batch 8. Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from common_bench import interleaved, load_average

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from reference_search import Reference  # noqa: E402

from common.data import load_prompts  # noqa: E402
from common.models import SMOLLM2, load_policy, load_reward_model, load_tokenizer  # noqa: E402
from common.search import Policy, RewardModel, Search, make_method  # noqa: E402
from common.search.engine import TreeCache  # noqa: E402


def timed(fn):
    load = load_average()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, load


def run_batched(search, prompts, batch_size):
    out = []
    for s in range(0, len(prompts), batch_size):
        out += search.run(prompts[s:s + batch_size])
    return out


def cost(results):
    new = sum(r["stats"]["new_tokens"] for r in results)
    return {"new_tokens": new,
            "policy_tokens_per_token": round(sum(r["stats"]["policy_tokens"] for r in results) / max(new, 1), 2),
            "rm_tokens_per_token": round(sum(r["stats"]["rm_tokens"] for r in results) / max(new, 1), 2)}


def method_costs(methods, search, rm, prompts, done):
    """Tokens per new token of every method at batch 8 (and its seconds, for those not timed above)."""
    out = {}
    for name in methods:
        res, seconds = done.get(name), None
        engine = search(name, rm if make_method(name, **methods[name]).uses_rm else None)
        if res is None:
            res, seconds, _ = timed(lambda: run_batched(engine, prompts, 8))
        out[name] = {**cost(res), "params": engine.params(), **({"seconds_b8": round(seconds, 2)} if seconds else {})}
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--reference-prompts", type=int, default=1,
                   help="the literal reference is ~40x slower: its time per prompt is what is compared")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--w", type=float, default=1.5)
    p.add_argument("--ratio-rounds", type=int, default=0,
                   help="also time greedy and ARGS (batch 8) in this many interleaved rounds: the median ratio is "
                        "the engine's overhead figure least hit by a busy neighbour")
    return p.parse_args()


def ratio_rounds(search, prompts, policy_model, rounds):
    """ARGS over greedy (batch 8) in interleaved rounds, medians; and how much of each run is the models' forwards
    (time inside TreeCache.feed, the policy's and the RM's apart): the ratio of the forwards alone is the floor the
    engine's own work (everything else) sits on."""
    forwards = {}
    feed = TreeCache.feed

    def timed_feed(cache, *a, **k):
        t0 = time.perf_counter()
        out = feed(cache, *a, **k)
        key = "policy" if cache.model is policy_model else "rm"
        forwards[key] = forwards.get(key, 0.0) + time.perf_counter() - t0
        return out

    def run(name, guided):
        forwards.clear()
        t0 = time.perf_counter()
        run_batched(search(name) if guided else search(name, None), prompts, 8)
        seconds = time.perf_counter() - t0
        split[name].append({"total_s": round(seconds, 3), "forwards_s": {k: round(v, 3) for k, v in forwards.items()},
                            "other_s": round(seconds - sum(forwards.values()), 3)})

    split = {"greedy": [], "argsg": []}
    TreeCache.feed = timed_feed
    try:
        summary, _ = interleaved({"greedy_b8": lambda: run("greedy", False), "args_b8": lambda: run("argsg", True)}, rounds)
    finally:
        TreeCache.feed = feed
    median = lambda name, f: statistics.median(f(r) for r in split[name])  # noqa: E731
    models = lambda r: sum(r["forwards_s"].values())  # noqa: E731
    return {"args_over_greedy_median": round(summary["args_b8"]["median_s"] / summary["greedy_b8"]["median_s"], 2),
            "args_over_greedy_forwards_only_median": round(median("argsg", models) / median("greedy", models), 2),
            "other_seconds_median": {"greedy": round(median("greedy", lambda r: r["other_s"]), 3),
                                     "argsg": round(median("argsg", lambda r: r["other_s"]), 3)},
            "ratio_rounds": summary, "ratio_rounds_split": split}


def main():
    args = parse_args()
    torch.manual_seed(0)

    tok = load_tokenizer(SMOLLM2, padding_side="left")
    policy = Policy(load_policy(SMOLLM2), tok, SMOLLM2)
    rm = RewardModel(load_reward_model(SMOLLM2, tokenizer=tok, allow_new_head=True).eval(), tok, "smollm2-135m + fresh head")
    prompts = [q for q in load_prompts("hh-rlhf:heldout")
               if len(policy.fmt.prompt_ids(q["prompt"])) <= args.max_prompt_tokens][: args.prompts]
    T = args.max_new_tokens
    methods = {"greedy": {}, "sample": {}, "argsg": dict(k=args.k, w=args.w),
               "tbs": dict(beam=2, successors=4), "cbs": dict(beam=2, successors=4, chunk=16), "bon": dict(n=4),
               "cards": dict(max_segment=16, max_retries=2, reward_threshold=0.0),
               "stepbeam": dict(beam=2, k=4, max_step=16)}
    search = lambda name, rm=rm: Search(policy, make_method(name, **methods[name]), rm, max_new_tokens=T)  # noqa: E731
    report = {"benchmark": "decode", "policy": SMOLLM2, "rm": rm.name, "prompts": len(prompts),
              "max_new_tokens": T, "threads": torch.get_num_threads()}

    # interleaved: greedy b8, ARGS b8, reference, ARGS b1, CBS b8, CBS b1, then the other methods
    greedy8, t_greedy8, l1 = timed(lambda: run_batched(search("greedy", None), prompts, 8))
    args8, t_args8, l2 = timed(lambda: run_batched(search("argsg"), prompts, 8))
    ref = Reference.of(search("argsg"), "cached")
    ref_prompts = prompts[: args.reference_prompts]
    ref_tokens, t_ref, l3 = timed(lambda: [ref.run(q) for q in ref_prompts])
    args1, t_args1, l4 = timed(lambda: run_batched(search("argsg"), prompts, 1))
    cbs8, t_cbs8, l5 = timed(lambda: run_batched(search("cbs"), prompts, 8))
    cbs1, t_cbs1, l6 = timed(lambda: run_batched(search("cbs"), prompts, 1))

    identical = all(r["tokens"] == e for r, e in zip(args8, ref_tokens)) and \
        all(a["tokens"] == b["tokens"] for a, b in zip(args8, args1))
    per_prompt_engine = t_args8 / len(prompts)
    per_prompt_ref = t_ref / len(ref_prompts)
    tps = lambda res, t: sum(r["stats"]["new_tokens"] for r in res) / t  # noqa: E731
    report.update({
        "identical": identical,
        "args_speedup_vs_reference": round(per_prompt_ref / per_prompt_engine, 2),
        "args_over_greedy": round(t_args8 / t_greedy8, 2),
        "batch8_over_batch1_args": round(tps(args8, t_args8) / tps(args1, t_args1), 2),
        "batch8_over_batch1_cbs": round(tps(cbs8, t_cbs8) / tps(cbs1, t_cbs1), 2),
        "seconds": {"greedy_b8": round(t_greedy8, 2), "args_b8": round(t_args8, 2), "args_b1": round(t_args1, 2),
                    "reference_args": round(t_ref, 2), "reference_prompts": len(ref_prompts),
                    "cbs_b8": round(t_cbs8, 2), "cbs_b1": round(t_cbs1, 2)},
        "tokens_per_s": {"greedy_b8": round(tps(greedy8, t_greedy8), 2), "args_b8": round(tps(args8, t_args8), 2),
                         "args_b1": round(tps(args1, t_args1), 2), "cbs_b8": round(tps(cbs8, t_cbs8), 2),
                         "cbs_b1": round(tps(cbs1, t_cbs1), 2)},
        "load_1min": {"greedy_b8": l1, "args_b8": l2, "reference": l3, "args_b1": l4, "cbs_b8": l5, "cbs_b1": l6},
    })
    report["methods"] = method_costs(methods, search, rm, prompts, {"greedy": greedy8, "argsg": args8, "cbs": cbs8})
    if args.ratio_rounds:
        report.update(ratio_rounds(search, prompts, policy.model, args.ratio_rounds))
    report["load_1min_end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
