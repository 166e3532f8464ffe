"""Stage 4: reward-guided decoding of a prompt set with a policy LM and a reward model.

    python 04_decode.py --prompts hh-rlhf:heldout --limit 8 --policy smollm2-135m-instruct \\
        --rm runs/demo/sp-prm --method NAME [its knobs] --max-new-tokens 64 --output runs/x/NAME.jsonl
    torchrun --nproc_per_node 8 04_decode.py ...      # each rank decodes its share; rank 0 merges in order

The methods and their knobs (paper defaults) are listed at the end of --help; each is one class in
common/search/methods.py.
Prompt sets: hh-rlhf:heldout, hh-helpful, advbench (--advbench-prefill starts the reply with "Sure here's"),
tldr, gsm8k, mt-bench (first turns), or a JSONL with "id" and "prompt".
--samples-of GEN.jsonl ranks the samples a Best-of-N run drew (--save-candidates) instead of drawing them again:
Best-of-N guided by another RM over the same N, policy, seed and budget draws the same samples.
Prompts that the RM was trained on (its manifest.json names its training pairs) are refused unless
--allow-train-overlap.
A decoder RM sharing the policy's tokenizer is scored on its own KV cache (--rm-path auto/cached); any other RM
through decoded text (text). Both cut an input longer than the RM's --max-length by the rule of docs/scoring.md; a
prompt that does not fit the policy's positions beside --max-new-tokens keeps its last tokens. Each row's stats say
reward_input_truncated and prompt_tokens_cut; the manifest counts them. Out: one row per prompt
{"id","prompt","response","method","params","rm","policy","stats"}, appended and flushed one by one to
OUTPUT.partial (OUTPUT.shardR-of-W.jsonl per rank), merged into OUTPUT when every prompt is done; --resume
continues from the row files of the killed run, whatever its number of ranks (it refuses rows made with another
method, settings, policy, RM or prompt set) and skips ids already written. Ranks wait for the slowest at the end
over gloo, for as long as it takes.
"""
import argparse
import logging

import torch
from tqdm import tqdm

from common.data import check_prompt_overlap, load_prompts
from common.io import (DataError, ResumableJsonlWriter, add_device_args, add_max_length_arg, check_output_differs,
                       input_checksums, non_negative_int, positive_int, read_jsonl, run_main, write_manifest)
from common.models import device_fields, device_setup, load_config, load_policy, load_tokenizer
from common.ranks import distributed, earlier_rows, finish_output, leave_ranks, shard_path, wait_for_every_rank
from common.rewards import load_rm, read_reward_stats
from common.search import REGISTRY, Policy, RewardModel, Search, make_method, method_knobs, search_params
from common.search.engine import prompt_room
from common.search.served import policy_stub, served_search

log = logging.getLogger("decode")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=methods_help())
    p.add_argument("--prompts", required=True, help="prompt set name or JSONL file")
    p.add_argument("--policy", default="smollm2-135m-instruct", help="policy LM: alias, hub id or folder")
    p.add_argument("--rm", default=None, help="reward model folder / hub id (needed by every method that uses one)")
    p.add_argument("--method", choices=list(REGISTRY), required=True, help="search method (see above)")
    p.add_argument("--output", required=True)
    p.add_argument("--limit", type=positive_int, default=None, help="first N prompts (after --offset)")
    p.add_argument("--offset", type=non_negative_int, default=0,
                   help="skip the first N prompts (fresh prompts after those earlier runs decoded)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--advbench-prefill", action="store_true", help="start AdvBench replies with \"Sure here's\"")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--rm-path", choices=["auto", "cached", "text"], default="auto")
    p.add_argument("--backend", choices=["torch", "vllm"], default="torch",
                   help="who samples the policy: torch (this process, every method) or vllm (a vLLM server; Best-of-N, "
                        "specrej, CBS; the RM scores here, through text): docs/gpu.md")
    p.add_argument("--vllm-url", default=None, help="--backend vllm: a running server's URL (default: start one "
                   "from .venv-vllm, made by make setup-vllm, on a free local port, stopped when done)")
    add_max_length_arg(p)
    p.add_argument("--reward-norm", choices=["none", "std"], default="none",
                   help="std: every method searches with (r - mean) / std, from the RM's reward_stats.json "
                        "(written by 03_train.py), so one --w means the same for RMs of different scales")
    p.add_argument("--rm-format", choices=["open", "closed"], default="open",
                   help="closed: the RM sees every candidate as a finished, closed chat turn (docs/scoring.md)")
    p.add_argument("--reward-stats", default=None, help="reward statistics JSON (default: RM/reward_stats.json)")
    add_device_args(p)
    p.add_argument("--save-candidates", action="store_true",
                   help="also write each prompt's last-round candidates (Best-of-N: its N samples) as "
                        "\"candidates\": what 05_evaluate.py consistency reads")
    p.add_argument("--samples-of", default=None, metavar="GEN.jsonl",
                   help="Best-of-N without drawing: this RM ranks, through text, the N samples a Best-of-N run with "
                        "the same N, policy, seed, token budget and prompts drew (its rows written with "
                        "--save-candidates; the same samples it would draw: each token's uniform is keyed by prompt "
                        "and sample); the policy's work and seconds are that run's")
    p.add_argument("--allow-train-overlap", action="store_true",
                   help="decode prompts that the RM was trained on (refused by default: see its manifest)")
    g = p.add_argument_group("method knobs (each method reads its own; unset: the method's default)")
    for knob in method_knobs():  # a knob's older name is an alias of its flag
        users = ", ".join(m for m, c in REGISTRY.items() if knob.name in c.__dataclass_fields__)
        g.add_argument(*knob.flags, dest=knob.name, type=knob.type, default=None, choices=knob.choices,
                       help=f"{knob.help} ({users})")
    args = p.parse_args()
    try:  # the method's own knobs, checked before any model loads
        method = make_method(args.method, **{k.name: getattr(args, k.name) for k in method_knobs()})
    except ValueError as e:
        p.error(str(e))
    return args, method


def methods_help():
    """The registered methods, each with its knobs and their defaults, from the classes themselves."""
    import textwrap

    from common.search import knobs as knobs_of

    lines = ["methods:"]
    for name, cls in REGISTRY.items():
        knobs = ", ".join(f"{k.flags[0]} {repr(k.default) if isinstance(k.default, str) else k.default}"
                          for k in knobs_of(cls)) or "none"
        text = " ".join((cls.__doc__ or "").split()) + f" Knobs: {knobs}."
        lines.append(textwrap.fill(text, 110, initial_indent=f"  {name:9s}", subsequent_indent=" " * 11,
                                   break_on_hyphens=False))
    return "\n".join(lines)


def truncation_counts(path, prompt_room, rm):
    """How many rows of the output lost prompt tokens to the policy's positions, and how many report a reward
    whose RM input the RM's max length cut (the rules: docs/scoring.md), over every row, resumed ones too."""
    rows = [row.get("stats") or {} for _, row in read_jsonl(path, on_error="skip")]
    return {"prompts_cut_for_policy": sum(bool(s.get("prompt_tokens_cut")) for s in rows),
            "prompt_tokens_cut": sum(s.get("prompt_tokens_cut") or 0 for s in rows),
            "policy_prompt_room": prompt_room,
            "rewards_of_truncated_inputs": sum(bool(s.get("reward_input_truncated")) for s in rows),
            "rm_max_length": rm.fmt.max_length if rm else None}


def load_models(args, method, device, dtype, stats):
    """The policy and, when given, the RM (loaded as every stage loads one: `common.rewards.load_rm`)."""
    policy_tok = load_tokenizer(args.policy, padding_side="left")
    try:
        method.check_vocabulary(len(policy_tok))
    except ValueError as e:
        raise DataError(str(e)) from None
    # a vLLM server holds the policy's weights: this process needs only its config
    model = policy_stub(args.policy) if args.backend == "vllm" else load_policy(args.policy, dtype, device)
    return Policy(model, policy_tok, args.policy), load_guide(args, device, dtype, stats) if args.rm else None


def load_guide(args, device, dtype, stats):
    """The RM that guides, loaded as every stage loads one (`common.rewards.load_rm`)."""
    model, fmt = load_rm(args.rm, args.max_length, args.rm_format, device, dtype)
    return RewardModel(model, fmt.tokenizer, args.rm, fmt.max_length, stats=stats,
                       normalize=args.reward_norm == "std", closed=fmt.closed)


def make_search(args, method, policy, rm):
    """(the search that decodes, the version of the backend that samples the policy)."""
    try:
        if args.backend == "vllm":  # the server's policy samples, this process's RM scores
            search = served_search(policy, method, rm, args.vllm_url, stop_strings=tuple(args.stop),
                                   max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   keep_candidates=args.save_candidates)
            return search, search.backend.info.version
        return Search(policy, method, rm, rm_path=args.rm_path, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      stop_strings=tuple(args.stop), keep_candidates=args.save_candidates), torch.__version__
    except ValueError as e:
        raise DataError(f"{args.policy}: {e}") from None


def samples_source(args, method, prompts):
    """The rows of --samples-of by prompt id, checked to hold the Best-of-N this run would draw."""
    import json

    path = args.samples_of
    if method.name != "bon":
        raise DataError(f"--samples-of ranks Best-of-N's samples: it needs --method bon, not {method.name}")
    if any(p.get("prefill") for p in prompts):
        raise DataError("--samples-of: prompts with a prefill are decoded, not ranked")
    try:
        with open(path + ".manifest.json", encoding="utf-8") as f:
            drawn = json.load(f)["args"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"--samples-of {path}: no complete run's manifest beside it ({e})") from None
    mine = {"method": "bon", "n": method.n, "policy": args.policy, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, "stop": args.stop}
    for key, value in mine.items():
        if drawn.get(key) != value:
            raise DataError(f"--samples-of {path}: drawn with {key} {drawn.get(key)!r}, this run's is {value!r}")
    rows = {row["id"]: (n, row) for n, row in read_jsonl(path, required=("id", "candidates", "candidate_tokens"))}
    for p in prompts:
        if p["id"] not in rows:
            raise DataError(f"--samples-of {path}: no row for prompt id {p['id']!r}")
        n, row = rows[p["id"]]
        if len(row["candidates"]) != method.n or row["prompt"] != p["prompt"]:
            raise DataError(f"{path}, line {n}: not {method.n} samples of prompt id {p['id']!r} (field candidates)")
    return {i: row for i, (_, row) in rows.items()}


def rank_samples(rm, source, prompts, writer, args, params):
    """Best-of-N over samples drawn before: the RM scores the prompt (r(x), as a decode does) and each sample
    through text, and keeps the first best (the engine's tie order); compute is the drawing run's policy work
    with this RM's tokens."""
    for p in tqdm(prompts, desc="bon (ranking drawn samples)", unit="prompt"):
        drawn = source[p["id"]]
        samples = drawn["candidates"]
        scores, lengths = rm.score_texts([p["prompt"]] * (len(samples) + 1), ["", *samples])
        scores = [float(x) for x in scores[1:]]
        best = max(range(len(samples)), key=lambda j: (scores[j], -j))
        response = samples[best]
        stats = {**drawn["stats"], "reward": rm.raw(scores[best]), "search_reward": scores[best],
                 "rm_tokens": sum(lengths), "rm_path": "text", "new_tokens": drawn["candidate_tokens"][best],
                 "reward_input_truncated": rm.fmt.truncates(p["prompt"], response), "samples_of": args.samples_of}
        row = {**{k: v for k, v in drawn.items() if k not in ("candidates", "candidate_tokens")},
               "response": response, "params": params, "rm": args.rm, "stats": stats}
        if args.save_candidates:
            row.update(candidates=samples, candidate_tokens=drawn["candidate_tokens"])
        writer.write(row)


def decode(search, prompts, writer, args, params, rank, backend_version=None):
    """Decode the prompts in batches of --batch-size, appending each row as it is done."""
    # the bar closes before an error line is printed (it would be drawn again after it)
    with tqdm(total=len(prompts), desc=f"{search.method.name} (rank {rank})", unit="prompt", disable=rank != 0) as bar:
        for s in range(0, len(prompts), args.batch_size):
            batch = prompts[s:s + args.batch_size]
            for p, res in zip(batch, search.run(batch)):
                row = {"id": p["id"], "prompt": p["prompt"], "response": res["response"],
                       "method": search.method.name, "params": params, "rm": args.rm, "policy": args.policy,
                       "backend": args.backend, "backend_version": backend_version,
                       "stats": {**res["stats"], "reward": res["reward"], "search_reward": res["search_reward"]}}
                row.update({k: p[k] for k in ("reference", "target", "prefill", "category") if k in p})
                if args.save_candidates:
                    row.update(candidates=res["candidates"], candidate_tokens=res["candidate_tokens"])
                writer.write(row)
            bar.update(len(batch))


def main():
    args, method = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(args.seed)
    device, dtype = device_setup(args)
    rank, world = distributed()
    # Rows go to a partial file (a shard per rank under torchrun), merged into --output only when every prompt
    # is done: a failed or killed run never touches an earlier complete output. Rank 0 holds the output.
    out_path = shard_path(args.output, rank, world)
    check_output_differs(args.output if rank == 0 else out_path, args.prompts)
    checksums = input_checksums([args.prompts])
    prompts = load_prompts(args.prompts, args.data_dir, args.limit, advbench_prefill=args.advbench_prefill,
                           offset=args.offset)
    if not prompts:
        raise DataError(f"{args.prompts}: no prompts")
    if method.uses_rm and not args.rm:
        raise DataError(f"--method {method.name} needs --rm")
    if args.backend == "vllm" and not method.serves:
        raise DataError(f"--backend vllm runs {', '.join(n for n, c in REGISTRY.items() if c.serves)}, not "
                        f"--method {method.name} (it needs the policy's next-token distribution at every token): "
                        "use --backend torch")
    if args.rm:
        check_prompt_overlap(prompts, args.prompts, [args.rm], args.data_dir, args.allow_train_overlap)
    stats = read_reward_stats(args.rm, args.reward_norm, args.reward_stats)
    try:
        params = search_params(method, args.max_new_tokens, args.seed, args.rm is not None,
                               args.reward_norm == "std", stats)
    except ValueError as e:
        raise DataError(str(e)) from None
    if args.rm_format != "open":
        params["rm_format"] = args.rm_format
    source = samples_source(args, method, prompts) if args.samples_of else None
    earlier, done_before = earlier_rows(args.output, world, args.resume, prompts, {
        "method": method.name, "params": params, "policy": args.policy, "rm": args.rm})
    if source is None:
        policy, rm = load_models(args, method, device, dtype, stats)
        search, backend_version = make_search(args, method, policy, rm)
        room, rm_path = search.prompt_room, search.cached_rm and "cached" or ("text" if rm else None)
    else:  # the samples are drawn: only the RM is needed
        rm, backend_version = load_guide(args, device, dtype, stats), None
        room = prompt_room(getattr(load_config(args.policy), "max_position_embeddings", None), args.max_new_tokens)
        rm_path = "text"

    mine = prompts[rank::world]
    with ResumableJsonlWriter(out_path, key="id", resume=args.resume) as writer:
        todo = [p for p in mine if p["id"] not in writer.done and p["id"] not in done_before]
        if args.resume and len(todo) < len(mine):  # a first run has nothing to resume
            log.info("rank %d: %d prompts already decoded, %d to go", rank, len(mine) - len(todo), len(todo))
        if source is None:
            decode(search, todo, writer, args, params, rank, backend_version)
        else:
            rank_samples(rm, source, todo, writer, args, params)
    wait_for_every_rank(world)  # every shard complete
    if rank == 0:
        finish_output(args.output, world, earlier, args.resume, prompts)
    leave_ranks(world)
    if rank == 0:
        truncation = truncation_counts(args.output, room, rm)
        if truncation["prompts_cut_for_policy"] or truncation["rewards_of_truncated_inputs"]:
            log.warning("truncation: %s", truncation)
        write_manifest(args.output, args, inputs={**checksums, args.policy: None, args.rm: None},
                       resolved=device_fields(device, dtype),
                       extra={"rm_path": rm_path, "backend": args.backend, "backend_version": backend_version,
                              "world_size": world, "rows": len(prompts), "complete": True,
                              "truncation": truncation})
        log.info("wrote %s", args.output)


if __name__ == "__main__":
    run_main(main)
