"""Benchmark: the policy sampled by the PyTorch engine against the policy on a vLLM server.

    python bench/backends.py [--prompts 1] [--n 16] [--max-new-tokens 128] [--device cpu|cuda] [--vllm-url URL]
    python bench/backends.py --device cuda --out runs/gpu-check/backends.json      (make gpu-check)

Best-of-N (N = --n) and speculative rejection (N samples, alpha 0.5, a decision every 32 tokens) at --max-new-tokens,
on the first --prompts hh-rlhf:heldout prompts of at most 128 tokens, one batch each. Policy SmolLM2-135M-Instruct;
RM SmolLM2-135M with a fresh scalar head, in this process for both backends (the engine scores on its cached path,
the served search through text). Without --vllm-url a server is started from .venv-vllm (make setup-vllm); its
start-up is reported apart, not counted. Per backend and method: wall time, the policy's tokens computed per second
(as each backend counts them: prompt tokens not reused from a cache plus sampled ones), the replies' new tokens,
the mean reward; then vLLM over torch ratios (> 1: vLLM faster). Prints one JSON object (--out: also written there).
Time here (2 CPU cores shared with other work): the default (one prompt) took 9 min at a load of 2-4; --prompts 2
took 32 min at a load of 10-12 (docs/gpu.md has both runs' numbers).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from common_bench import load_average

from common.data import load_prompts
from common.models import SMOLLM2, load_policy, load_reward_model, load_tokenizer, resolve_model_path
from common.search import Policy, RewardModel, Search, make_method
from common.search.served import ServedSearch, policy_stub, vllm_backend
from common.vllm_server import VLLMServer, connect


def measure(search, prompts):
    load = load_average()
    t0 = time.perf_counter()
    results = search.run(prompts)
    seconds = time.perf_counter() - t0
    policy_tokens = sum(r["stats"]["policy_tokens"] for r in results)
    new_tokens = sum(r["stats"]["new_tokens"] for r in results)
    return {"seconds": round(seconds, 2), "policy_tokens": policy_tokens,
            "policy_tokens_per_s": round(policy_tokens / seconds, 1),
            "cached_tokens": sum(r["stats"].get("policy_cached_tokens", 0) for r in results),
            "reply_new_tokens": new_tokens, "rm_tokens": sum(r["stats"]["rm_tokens"] for r in results),
            "mean_reward": round(statistics.mean(r["reward"] for r in results), 4), "load_1min": load}


def both_backends(name, knobs, engine_policy, served_policy, rm, info, prompts, max_new_tokens):
    """One method's measures on the engine and on the vLLM server, each warmed up alike first."""
    def engine(max_new_tokens, seed=0):
        return Search(engine_policy, make_method(name, **knobs), rm, max_new_tokens=max_new_tokens, seed=seed)

    def served(max_new_tokens, seed=0):
        method = make_method(name, **knobs)
        return ServedSearch(served_policy, method, rm, vllm_backend(info, method, served_policy),
                            max_new_tokens=max_new_tokens, seed=seed, max_model_len=info.max_model_len)

    for search in (engine, served):  # on other samples: 8 tokens of the first prompt
        search(8, seed=99).run(prompts[:1])
    return measure(engine(max_new_tokens), prompts), measure(served(max_new_tokens), prompts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu", help="the engine's and the RM's device")
    p.add_argument("--vllm-url", default=None, help="a running server of the same policy (default: start one)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    tok = load_tokenizer(SMOLLM2, padding_side="left")
    rm = RewardModel(load_reward_model(SMOLLM2, tokenizer=tok, allow_new_head=True, dtype=dtype, device=device).eval(),
                     tok, "smollm2-135m + fresh head")
    engine_policy = Policy(load_policy(SMOLLM2, dtype=dtype, device=device), tok, SMOLLM2)
    served_policy = Policy(policy_stub(SMOLLM2), tok, SMOLLM2)
    prompts = [q for q in load_prompts("hh-rlhf:heldout")
               if len(engine_policy.fmt.prompt_ids(q["prompt"])) <= 128][:args.prompts]
    methods = {f"bon{args.n}": ("bon", dict(n=args.n)),
               "specrej": ("specrej", dict(n=args.n, alpha=0.5, decision_every=32))}
    report = {"benchmark": "backends", "policy": SMOLLM2, "rm": rm.name, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "device": str(device), "torch_threads": torch.get_num_threads(),
              "torch": {}, "vllm": {}, "vllm_over_torch": {}}

    server = None
    t0 = time.perf_counter()
    if args.vllm_url:
        info = connect(args.vllm_url)
    else:
        server = VLLMServer(resolve_model_path(SMOLLM2))
        info = server.start()
    report.update(vllm_version=info.version, vllm_start_seconds=round(time.perf_counter() - t0, 1))
    try:
        for label, (name, knobs) in methods.items():
            report["torch"][label], report["vllm"][label] = both_backends(
                name, knobs, engine_policy, served_policy, rm, info, prompts, args.max_new_tokens)
            t, v = report["torch"][label], report["vllm"][label]
            report["vllm_over_torch"][label] = {
                "speed_policy_tokens_per_s": round(v["policy_tokens_per_s"] / t["policy_tokens_per_s"], 2),
                "wall_time_speedup": round(t["seconds"] / v["seconds"], 2)}
            print(json.dumps({label: report["vllm_over_torch"][label]}), file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    report["load_1min_end"] = load_average()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from common.io import write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, report)


if __name__ == "__main__":
    main()
