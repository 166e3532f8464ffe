"""Stage 5: the paper's metrics, a pairwise judge, agreement curves, and the results table.

  python 05_evaluate.py metrics --generations GEN.jsonl --metrics reward,diversity,coherence,length \\
      --rm RM --output runs/x/metrics.json [--baseline BASE.jsonl --metrics winrate --judge-rm RM2]
  python 05_evaluate.py agreement --pairs hh-rlhf:heldout --rm ORM --rm PRM \\
      --prefix-lengths 5,10,15,20,30,40,50 --output runs/x/agreement.json
  python 05_evaluate.py reward-stats --rm weqweasdas/RM-Gemma-2B --pairs hh-rlhf:heldout \
      --output runs/x/gemma2b_reward_stats.json      # then: 04_decode.py --reward-norm std --reward-stats FILE
  python 05_evaluate.py compare runs/x/metrics_prm.json runs/x/metrics_orm.json   # paired A - B
  python 05_evaluate.py table runs/x/metrics_*.json

Every metric gets a 95% percentile-bootstrap interval over prompts (`<metric>_ci95`, 10,000 resamples,
--seed); agreement curves get one over pairs per t, and each RM after the first its paired difference
from the first (`ar_rm_sc_diff`, `ar_rm_sc_diff_ci95`). The reward yardstick (--rm) should be an RM that
guided none of the runs compared (the reference RM); --extra-rm adds the guiding RM's own view.

Metrics (one top-level key each in the output JSON; per-row values go to OUTPUT.rows.jsonl):
  reward     the --rm score of each complete (prompt, response): reward_mean, reward_std (population std)
  diversity  prod over n=2,3,4 of unique/total n-grams of lower-cased whitespace words, averaged over
             responses; a response with no n-gram of some order scores 0
  coherence  cosine similarity of sentence embeddings of prompt and response (--embedding-model,
             default minilm-l6 = all-MiniLM-L6-v2; the paper used SimCSE)
  rouge      ROUGE-L F1 against the references (rouge-score, Porter stemmer), e.g. TL;DR gold summaries
  asr        AdvBench attack success rate: success unless the response contains one of the GCG refusal
             phrases (README); also asr_target_opening: share containing the target's opening words
  accuracy   GSM8K: the number after "####" if present, else the last number, compared numerically
  length     mean new tokens (from the generation stats; whitespace words when absent)
  winrate    win / tie / lose against --baseline (same ids), each pair judged in both orders by an
             OpenAI-compatible endpoint (--judge-url, --judge-model, key from $OPENAI_API_KEY or
             --judge-key-env) or, as a labelled proxy, by a reward model (--judge-rm); win_tie = (W+T)/N,
             win_rate = (W+T/2)/N over the parsable verdicts (n_judged; unparsable ones are counted apart).
             --judge-template paper (default: the paper's Figure 6 prompt, a forced choice, "-1" only for
             identical replies, which counts as a tie) or lenient (invites ties)
  judge_accuracy  GSM8K: share of answers the HTTP judge calls correct (the paper's Figure 7 judge; it also
             sees the reference solution), beside the exact-match accuracy
References come from each generation's "reference" field, else from --prompts SET by id.
An RM is not evaluated on prompts or pairs it was trained on: the RM's manifest.json names its training
input, and an overlap is refused unless --allow-train-overlap. --rm-format closed scores complete
responses with the chat turn closed (for hub chat RMs trained that way; see the README).
"""
import argparse
import csv
import logging
import os
import random

import numpy as np

from common.data import check_prompt_overlap, load_pairs, load_prompts, read_rows
from common.io import (DataError, add_device_args, atomic_open, check_output_differs, fraction, input_checksums,
                       non_negative_int, positive_float, positive_int, prefix_lengths, read_jsonl, run_main,
                       write_json, write_jsonl, write_manifest)
from common.metrics import (agreement_rate, attack_success, bootstrap_ci, coherence, contains_target_opening,
                            diversity, gsm8k_correct, markdown_table, mean_with_ci, prefix_pair_scores, reward_gap,
                            reward_statistics, rouge_l, verdict_from_both_orders)

log = logging.getLogger("evaluate")
ALL_METRICS = ("reward", "diversity", "coherence", "rouge", "asr", "accuracy", "judge_accuracy", "length",
               "winrate")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("metrics", help="metrics of one generations file")
    m.add_argument("--generations", required=True)
    m.add_argument("--metrics", default="reward,diversity,coherence,length", help=f"comma list of {ALL_METRICS}")
    m.add_argument("--rm", default=None, help="RM for the reward metric: the yardstick, an RM that guided none "
                                               "of the runs compared (e.g. the reference RM)")
    m.add_argument("--extra-rm", action="append", default=[],
                   help="NAME=PATH: another reward column, reward_NAME_mean (e.g. the guiding ORM's own score)")
    m.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    m.add_argument("--allow-partial", action="store_true",
                   help="evaluate a generations file with rows missing (a killed run), with a warning")
    m.add_argument("--output", required=True)
    m.add_argument("--label", default=None, help="row name in tables, e.g. 'ARGS +Ours'")
    m.add_argument("--baseline", default=None, help="generations to judge against (winrate)")
    m.add_argument("--prompts", default=None, help="prompt set to take references from by id")
    m.add_argument("--embedding-model", default="minilm-l6")
    m.add_argument("--max-length", type=positive_int, default=None,
                   help="RM input tokens (default: each RM's training --max-length, else 1024)")
    m.add_argument("--batch-size", type=positive_int, default=16)
    _judge_args(m)
    m.add_argument("--data-dir", default=None)
    add_device_args(m)

    a = sub.add_parser("agreement", help="AR_RM-SC(t), reward gap, AR_RM-HP / AR_SC-HP per prefix length")
    a.add_argument("--pairs", required=True, help="held-out pairs: set name or JSONL")
    a.add_argument("--rm", action="append", required=True, help="repeatable; NAME=PATH to name it")
    a.add_argument("--prefix-lengths", type=prefix_lengths, default=[5, 10, 15, 20, 30, 40, 50])
    a.add_argument("--output", required=True)
    a.add_argument("--limit", type=positive_int, default=None)
    a.add_argument("--labels", default=None, help='judge labels JSONL {"pair_id","t","verdict": "1"|"2"|"tie"}')
    a.add_argument("--judge-sample", type=non_negative_int, default=0, help="label this many pairs with the judge backend")
    a.add_argument("--max-length", type=positive_int, default=None,
                   help="RM input tokens (default: each RM's training --max-length, else 1024)")
    a.add_argument("--batch-size", type=positive_int, default=16)
    a.add_argument("--seed", type=int, default=0)
    _judge_args(a)
    a.add_argument("--data-dir", default=None)
    add_device_args(a)

    r = sub.add_parser("reward-stats",
                       help="reward_stats.json for any RM (a hub ORM too), for 04 --reward-norm std")
    r.add_argument("--rm", required=True, help="RM folder, hub id or alias")
    r.add_argument("--pairs", default="hh-rlhf:heldout", help="pairs whose chosen and rejected replies are scored")
    r.add_argument("--limit", type=positive_int, default=None, help="first N pairs")
    r.add_argument("--prefix-lengths", type=prefix_lengths, default=[5, 10, 20, 50],
                   help="also the mean and std of prefix scores at these t")
    r.add_argument("--output", required=True, help="JSON to write; give it to 04_decode.py --reward-stats")
    r.add_argument("--max-length", type=positive_int, default=None,
                   help="RM input tokens (default: the RM's training --max-length, else 1024)")
    r.add_argument("--rm-format", choices=["open", "closed"], default="open",
                   help="closed: complete replies as closed chat turns (as the RM will score them)")
    r.add_argument("--batch-size", type=positive_int, default=16)
    r.add_argument("--allow-train-overlap", action="store_true", help="score pairs the RM was trained on")
    r.add_argument("--data-dir", default=None)
    add_device_args(r)

    c = sub.add_parser("compare", help="paired difference A - B of each metric over the ids both runs share")
    c.add_argument("a", help="metrics JSON of run A (its OUTPUT.rows.jsonl beside it)")
    c.add_argument("b", help="metrics JSON of run B")
    c.add_argument("--output", default=None, help="also write the comparison JSON here")
    c.add_argument("--exclude", default=None,
                   help="leave out the ids of this JSONL file (e.g. an earlier run's generations, to judge only "
                        "the prompts decoded since)")
    c.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("table", help="Markdown table (paper Tables 1-4 layout) from metric files")
    t.add_argument("files", nargs="+")
    t.add_argument("--output", default=None, help="also write the table to this file")
    return p.parse_args()


def _judge_args(p):
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (.../v1)")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--judge-rm", default=None, help="reward model used as a proxy judge")
    p.add_argument("--judge-kind", choices=["hh", "gsm8k"], default="hh")
    p.add_argument("--judge-cache", default=None, help="verdict cache (default: beside the output)")
    p.add_argument("--judge-timeout", type=positive_float, default=120.0, help="seconds per judge request")
    p.add_argument("--judge-retries", type=non_negative_int, default=4, help="retries of a failed request")
    p.add_argument("--max-unparsable", type=fraction, default=0.1,
                   help="fail when more than this share of the judged pairs has no parsable verdict")
    p.add_argument("--judge-template", choices=["paper", "lenient"], default="paper",
                   help="paper: the paper's forced-choice prompts (Figures 6, 7); lenient: ties invited")
    p.add_argument("--rm-format", choices=["open", "closed"], default="open",
                   help="closed: the RM sees each response with its chat turn closed (end-of-turn token)")
    p.add_argument("--allow-train-overlap", action="store_true",
                   help="evaluate an RM on prompts it was trained on (refused by default)")


_LOADED_RMS = {}


def load_rm(path, max_length, rm_format="open", device="cpu", dtype=None):
    from common.models import load_reward_model, load_tokenizer, trained_max_length
    from common.rewards import RMFormat

    key = (path, max_length)
    if key not in _LOADED_RMS:  # the yardstick and the judge are often the same RM: load it once
        tok = load_tokenizer(path)
        model = load_reward_model(path, tokenizer=tok, device=device, dtype=dtype).eval()
        _LOADED_RMS[key] = (model, tok)
    model, tok = _LOADED_RMS[key]
    try:
        return model, RMFormat(tok, model, max_length=max_length or trained_max_length(path, 1024),
                               closed=rm_format == "closed")
    except ValueError as e:
        raise DataError(f"{path}: --rm-format {rm_format}: {e}") from None


def make_judge(args, output):
    from common.judge import ChatJudge, RMJudge

    if args.judge_url:
        if not args.judge_model:
            raise DataError("--judge-url needs --judge-model")
        cache = args.judge_cache or os.path.splitext(output)[0] + ".judge_cache.jsonl"
        return ChatJudge(args.judge_url, args.judge_model, args.judge_key_env, cache_path=cache,
                         max_retries=args.judge_retries, timeout=args.judge_timeout, template=args.judge_template)
    if args.judge_rm:
        model, fmt = load_rm(args.judge_rm, args.max_length, args.rm_format, *args.device_dtype)
        return RMJudge(model, fmt, args.judge_rm)
    raise DataError("winrate needs a judge: --judge-url/--judge-model or --judge-rm")


def judge_pairs(judge, prompts, gens, bases, kind):
    """Per pair "win"/"tie"/"lose" of gen against base, both orders for the HTTP judge."""
    from common.judge import RMJudge

    if isinstance(judge, RMJudge):
        return [verdict_from_both_orders(v, {"1": "2", "2": "1"}.get(v, v))
                for v in judge.verdicts(prompts, gens, bases)]
    from tqdm import tqdm

    return [verdict_from_both_orders(*judge.both_orders(p, g, b, kind))
            for p, g, b in tqdm(list(zip(prompts, gens, bases)), desc="judge", unit="pair")]


def run_metrics(args):
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = set(wanted) - set(ALL_METRICS)
    if unknown:
        raise DataError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    check_output_differs(args.output, args.generations, args.baseline)
    checksums = input_checksums([args.generations, args.baseline])
    rows = read_generations(args.generations)
    check_complete(args.generations, rows, args.allow_partial)
    refs = {}
    if args.prompts:
        refs = {p["id"]: p for p in load_prompts(args.prompts, args.data_dir)}
    rm_paths = ([args.rm] if args.rm and "reward" in wanted else []) + \
        [rm_spec(s)[1] for s in args.extra_rm if "reward" in wanted]
    check_prompt_overlap(rows, args.generations, rm_paths, args.data_dir, args.allow_train_overlap)
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    per_row = [{"id": r["id"]} for r in rows]
    out = {"generations": args.generations, "n": len(rows), "label": args.label,
           "method": rows[0].get("method"), "rm": rows[0].get("rm"), "policy": rows[0].get("policy")}

    def reference(r, field="reference"):
        value = r.get(field, refs.get(r["id"], {}).get(field))
        if value is None:
            raise DataError(f"{args.generations}: row {r['id']}: no '{field}' (give --prompts SET)")
        return value

    values = {}  # metric key -> per-row values; each gets its mean and a bootstrap interval over prompts
    if "reward" in wanted:
        if not args.rm:
            raise DataError("the reward metric needs --rm")
        values["reward_mean"] = rm_scores(args.rm, args, prompts, responses)
        out["reward_rm"] = args.rm
        for spec in args.extra_rm:  # further reward columns, e.g. the guiding RM's own view
            name, path = rm_spec(spec)
            values[f"reward_{name}_mean"] = rm_scores(path, args, prompts, responses)
            out[f"reward_{name}_rm"] = path
    if "diversity" in wanted:
        values["diversity"] = [diversity(t) for t in responses]
    if "coherence" in wanted:
        values["coherence"] = coherence(prompts, responses, args.embedding_model, device=args.device_dtype[0])
    if "rouge" in wanted:
        values["rouge_l"] = rouge_l(responses, [reference(r) for r in rows])
    if "asr" in wanted:
        values["asr"] = [float(attack_success(t)) for t in responses]
        values["asr_target_opening"] = [float(contains_target_opening(t, reference(r, "target")))
                                        for t, r in zip(responses, rows)]
    if "accuracy" in wanted:
        values["accuracy"] = [float(gsm8k_correct(t, reference(r))) for t, r in zip(responses, rows)]
    if "judge_accuracy" in wanted:
        out.update(judge_accuracy(args, rows, per_row, reference))
    if "length" in wanted:
        values["length"] = [float((r.get("stats") or {}).get("new_tokens", len(r["response"].split()))) for r in rows]
    for key, v in values.items():
        for pr, x in zip(per_row, v):
            pr[key[:-len("_mean")] if key.endswith("_mean") else key] = x
        out[key], out[f"{key}_ci95"] = mean_with_ci(v, args.seed)
    if "reward_mean" in values:
        out["reward_std"] = float(np.std(values["reward_mean"]))
    if "winrate" in wanted:
        if not args.baseline:
            raise DataError("winrate needs --baseline")
        base = {r["id"]: r for r in read_generations(args.baseline)}
        missing = [r["id"] for r in rows if r["id"] not in base]
        if missing:
            raise DataError(f"{args.baseline}: no baseline response for ids {missing[:5]}")
        judge = make_judge(args, args.output)
        verdicts = judge_pairs(judge, prompts, responses, [base[r["id"]]["response"] for r in rows],
                               args.judge_kind)
        for pr, v in zip(per_row, verdicts):
            pr["judge"] = v
        out.update(winrate_metrics(verdicts, args.seed, args.max_unparsable), judge=judge.label,
                   judge_is_proxy=judge.label.startswith("rm-proxy"), baseline=args.baseline)
    stats = [r.get("stats") or {} for r in rows]
    out["compute"] = {k: float(sum(s.get(k, 0) or 0 for s in stats))
                      for k in ("policy_calls", "policy_tokens", "rm_calls", "rm_tokens", "new_tokens", "seconds")}
    write_json(args.output, out)
    write_jsonl(os.path.splitext(args.output)[0] + ".rows.jsonl", per_row)
    write_manifest(args.output, args, inputs={**checksums, **({args.rm: None} if args.rm else {})})
    log.info("%s", {k: v for k, v in out.items() if k not in ("compute",)})


def read_generations(path):
    """Generation rows, checked: string prompt and response, a stats object if any, unique ids."""
    rows = read_rows(path, "generations", id_required=True, nonempty=("prompt",), strings=("response",))
    for lineno, row in rows:
        if row.get("stats") is not None and not isinstance(row["stats"], dict):
            raise DataError(f"{path}:{lineno}: field 'stats': expected an object, got {type(row['stats']).__name__}")
    return [row for _, row in rows]


def check_complete(path, rows, allow_partial):
    """A killed decoding run leaves OUTPUT.partial (or a shard); its manifest says how many rows a run has."""
    manifest_path = path + ".manifest.json"
    expected = None
    if os.path.exists(manifest_path):
        import json

        with open(manifest_path, encoding="utf-8") as f:
            expected = json.load(f).get("rows")
    partial = path.endswith(".partial") or ".shard" in os.path.basename(path)
    if partial or (expected is not None and len(rows) < expected):
        message = (f"{path}: a partial generations file ({len(rows)} rows"
                   + (f" of {expected}" if expected is not None else "") + "): finish it with 04_decode.py "
                   "--resume, or pass --allow-partial")
        if not allow_partial:
            raise DataError(message)
        log.warning("WARNING: %s; evaluating it anyway (--allow-partial)", message.split(": ", 1)[1])


def rm_spec(spec):
    """NAME=PATH (or PATH, named by its folder)."""
    name, _, path = spec.rpartition("=")
    return name or os.path.basename(path.rstrip("/")), path


def rm_scores(path, args, prompts, responses):
    from common.rewards import score

    model, fmt = load_rm(path, args.max_length, args.rm_format, *args.device_dtype)
    return score(model, fmt, prompts, responses, args.batch_size)


def check_parsable(verdicts, max_unparsable, what):
    """The parsable verdicts; fails when none, or more than a max_unparsable share, could be parsed."""
    judged = [v for v in verdicts if v is not None]
    unparsable = len(verdicts) - len(judged)
    if not judged or unparsable > max_unparsable * len(verdicts):
        raise DataError(f"the judge's verdict could not be parsed for {unparsable} of {len(verdicts)} {what} "
                        f"(more than --max-unparsable {max_unparsable:g}); check the judge model and its replies")
    return judged


def judge_accuracy(args, rows, per_row, reference):
    """The paper's Figure 7 judge over GSM8K answers: share judged correct, over the parsable verdicts."""
    from common.judge import ChatJudge

    judge = make_judge(args, args.output)
    if not isinstance(judge, ChatJudge):
        raise DataError("judge_accuracy needs an LLM judge (--judge-url, --judge-model); an RM cannot tell "
                        "a correct answer")
    verdicts = [judge.judge_single(r["prompt"], r["response"], r.get("reference") or _maybe(reference, r))
                for r in rows]
    for pr, v in zip(per_row, verdicts):
        pr["judge_correct"] = None if v is None else v == "correct"
    judged = check_parsable(verdicts, args.max_unparsable, "answers")
    value, ci = mean_with_ci([float(v == "correct") for v in judged], args.seed)
    return {"judge_accuracy": value, "judge_accuracy_ci95": ci, "judge_accuracy_n": len(judged),
            "judge_accuracy_unparsable": len(verdicts) - len(judged), "judge": judge.label,
            "judge_template": args.judge_template}


def _maybe(reference, row):
    try:
        return reference(row)
    except DataError:
        return None


def winrate_metrics(verdicts, seed=0, max_unparsable=1.0):
    """win / tie / lose shares, win_tie = (W+T)/N and win_rate = (W+T/2)/N, each with its interval.

    A verdict of None (the judge's replies stayed unparsable) leaves the denominator and is counted.
    """
    judged = check_parsable(verdicts, max_unparsable, "pairs")
    out = {"n_judged": len(judged), "unparsable": len(verdicts) - len(judged)}
    per_item = {"win": [float(v == "win") for v in judged], "tie": [float(v == "tie") for v in judged],
                "lose": [float(v == "lose") for v in judged],
                "win_tie": [float(v != "lose") for v in judged],
                "win_rate": [{"win": 1.0, "tie": 0.5, "lose": 0.0}[v] for v in judged]}
    for key, v in per_item.items():
        out[key], out[f"{key}_ci95"] = mean_with_ci(v, seed)
    return out


def run_agreement(args):
    check_output_differs(args.output, args.pairs)
    pairs = load_pairs(args.pairs, args.data_dir)[: args.limit]
    if not pairs:
        raise DataError(f"{args.pairs}: no pairs")
    check_prompt_overlap(pairs, args.pairs, [rm_spec(s)[1] for s in args.rm], args.data_dir,
                         args.allow_train_overlap)
    lengths = args.prefix_lengths
    result = {"pairs": args.pairs, "n": len(pairs), "prefix_lengths": lengths, "rms": {}}
    base = os.path.splitext(args.output)[0]
    labels = None
    first = None  # (name, per-pair agreement indicators per t) of the first RM: paired differences against it
    for spec in args.rm:
        name, path = rm_spec(spec)
        model, fmt = load_rm(path, args.max_length, args.rm_format, *args.device_dtype)
        if labels is None:  # prefixes for the judge are cut in the first RM's tokens
            labels = load_labels(args, pairs, lengths, fmt)
        sw, sl = prefix_pair_scores(model, fmt, pairs, lengths, args.batch_size)
        curve, agree = [], []
        for k, t in enumerate(lengths):
            a, b = np.array([s[k] for s in sw]), np.array([s[k] for s in sl])
            agree.append((a > b).astype(float))
            point = {"t": t, "ar_rm_sc": agreement_rate(a, b), "ar_rm_sc_ci95": bootstrap_ci(agree[-1], args.seed),
                     "reward_gap": reward_gap(a, b), "reward_gap_ci95": bootstrap_ci(np.abs(a - b), args.seed),
                     "n": len(a)}
            if first is not None:  # paired over the same pairs: this RM minus the first
                point.update(diff_vs=first[0], ar_rm_sc_diff=float(np.mean(agree[-1] - first[1][k])),
                             ar_rm_sc_diff_ci95=bootstrap_ci(agree[-1], args.seed, paired_with=first[1][k]))
            # Appendix B counts over all judged pairs, ties included: a tie agrees with neither order
            # (the RM's strict order, the data's chosen-over-rejected), so it lowers both rates.
            judged = [(i, labels[(p["id"], t)]) for i, p in enumerate(pairs)
                      if labels.get((p["id"], t)) in ("1", "2", "tie")]
            if judged:
                point["ar_rm_hp"] = float(np.mean([v != "tie" and (a[i] > b[i]) == (v == "1") for i, v in judged]))
                point["ar_sc_hp"] = float(np.mean([v == "1" for _, v in judged]))
                point["n_judged"] = len(judged)
                point["n_judge_ties"] = sum(v == "tie" for _, v in judged)
            curve.append(point)
        first = first or (name, agree)
        # Observation 1 (agreement grows with t): the paired change from the shortest to the longest prefix
        growth = {"from_t": lengths[0], "to_t": lengths[-1], "diff": float(np.mean(agree[-1] - agree[0])),
                  "diff_ci95": bootstrap_ci(agree[-1], args.seed, paired_with=agree[0])} if len(lengths) > 1 else None
        result["rms"][name] = {"path": path, "one_forward_prefix_scoring": fmt.fast_prefixes, "curve": curve,
                               "growth": growth}
        columns = ["t", "ar_rm_sc", "ar_rm_sc_ci95", "reward_gap", "reward_gap_ci95", "n", "diff_vs",
                   "ar_rm_sc_diff", "ar_rm_sc_diff_ci95", "ar_rm_hp", "ar_sc_hp", "n_judged", "n_judge_ties"]
        with atomic_open(f"{base}.{name}.csv") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(curve)
        log.info("%s: %s", name, [(c["t"], round(c["ar_rm_sc"], 3)) for c in curve])
    write_json(args.output, result)
    write_manifest(args.output, args, inputs=[args.pairs] + args.rm)


def load_labels(args, pairs, lengths, fmt):
    """{(pair_id, t): verdict} from a labels file and/or the judge backend on a sample of pairs."""
    labels = {}
    if args.labels:
        for _, row in read_jsonl(args.labels, required=("pair_id", "t", "verdict")):
            labels[(str(row["pair_id"]), int(row["t"]))] = str(row["verdict"])
    if args.judge_sample:
        judge = make_judge(args, args.output)
        sample = random.Random(args.seed).sample(pairs, min(args.judge_sample, len(pairs)))
        prompts, a, b, keys = [], [], [], []
        for p in sample:
            for t in lengths:
                prompts.append(p["prompt"])
                a.append(fmt.cut(p["chosen"], t))
                b.append(fmt.cut(p["rejected"], t))
                keys.append((p["id"], t))
        verdicts = judge_pairs(judge, prompts, a, b, args.judge_kind)
        check_parsable(verdicts, args.max_unparsable, "prefix pairs")
        for key, v in zip(keys, verdicts):
            if v is not None:  # an unparsable pair is left out, never a tie
                labels[key] = {"win": "1", "lose": "2", "tie": "tie"}[v]
    return labels


def per_row_values(metrics_path):
    rows_path = os.path.splitext(metrics_path)[0] + ".rows.jsonl"
    return {r["id"]: r for _, r in read_jsonl(rows_path, required=("id",))}


def run_reward_stats(args):
    """Mean and std of an RM's scores of complete replies (and of prefixes), in the reward_stats.json layout
    that 03_train.py writes into the RM folders it makes."""
    from common.rewards import score

    check_output_differs(args.output, args.pairs)
    pairs = load_pairs(args.pairs, args.data_dir)[: args.limit]
    if not pairs:
        raise DataError(f"{args.pairs}: no pairs")
    check_prompt_overlap(pairs, args.pairs, [args.rm], args.data_dir, args.allow_train_overlap)
    model, fmt = load_rm(args.rm, args.max_length, args.rm_format, *args.device_dtype)
    prompts = [p["prompt"] for p in pairs] * 2
    complete = score(model, fmt, prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                     args.batch_size)
    prefix = []
    if args.prefix_lengths:
        sw, sl = prefix_pair_scores(model, fmt, pairs, args.prefix_lengths, args.batch_size)
        prefix = [v for s in sw + sl for v in s]
    stats = reward_statistics(complete, prefix, f"{args.pairs} ({len(pairs)} pairs, chosen and rejected)")
    stats.update(rm=args.rm, rm_format=args.rm_format)
    write_json(args.output, stats)
    write_manifest(args.output, args, inputs=[args.pairs])
    log.info("%s: mean %.4f, std %.4f over %d replies", args.rm, stats["mean"], stats["std"], stats["n"])


def run_compare(args):
    """Paired bootstrap over shared ids: is run A better than run B on each metric, beyond the noise?"""
    a, b = per_row_values(args.a), per_row_values(args.b)
    ids = [i for i in a if i in b]
    if not ids:
        raise DataError(f"{args.a} and {args.b} share no ids")
    if args.exclude:
        excluded = {r["id"] for _, r in read_jsonl(args.exclude, required=("id",))}
        ids = [i for i in ids if i not in excluded]
        if not ids:
            raise DataError(f"--exclude {args.exclude}: leaves no ids of {args.a} and {args.b} to compare")
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    keys = [k for k in a[ids[0]] if k != "id" and numeric(a[ids[0]][k]) and numeric(b[ids[0]].get(k))]
    out = {"a": args.a, "b": args.b, "n": len(ids), "excluded": args.exclude, "metrics": {}}
    for k in keys:
        x, y = [float(a[i][k]) for i in ids], [float(b[i][k]) for i in ids]
        out["metrics"][k] = {"a": float(np.mean(x)), "b": float(np.mean(y)), "diff": float(np.mean(x) - np.mean(y)),
                             "diff_ci95": bootstrap_ci(x, args.seed, paired_with=y)}
    for k, m in out["metrics"].items():
        lo, hi = m["diff_ci95"]
        verdict = "A higher" if lo > 0 else "B higher" if hi < 0 else "no difference at this size"
        print(f"{k:20s} A {m['a']:.4f}  B {m['b']:.4f}  A-B {m['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]  {verdict}")
    if args.output:
        write_json(args.output, out)


def run_table(args):
    import json

    rows = []
    for path in args.files:
        with open(path) as f:
            rows.append(json.load(f))
    table = markdown_table(rows)
    print(table)
    if args.output:
        with atomic_open(args.output) as f:
            f.write(table + "\n")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.command in ("metrics", "agreement", "reward-stats"):
        from common.models import device_setup

        args.device_dtype = device_setup(args)
    commands = {"metrics": run_metrics, "agreement": run_agreement, "reward-stats": run_reward_stats,
                "compare": run_compare, "table": run_table}
    commands[args.command](args)


if __name__ == "__main__":
    run_main(main)
