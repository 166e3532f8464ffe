"""Stage 5: the paper's metrics, a pairwise judge, agreement curves, and the results table.

  python 05_evaluate.py metrics --generations GEN.jsonl --metrics reward,diversity,coherence,length \\
      --rm RM --output runs/x/metrics.json [--baseline BASE.jsonl --metrics winrate --judge-rm RM2]
  python 05_evaluate.py agreement --pairs hh-rlhf:heldout --rm ORM --rm PRM \\
      --prefix-lengths 5,10,15,20,30,40,50 --output runs/x/agreement.json
  python 05_evaluate.py consistency --generations BON.jsonl --rm ORM=ORM --rm SP-PRM=PRM --reference REF \\
      --prefix-lengths 4,8,16,24 --alpha 0.5 --output runs/x/consistency.json   # the premise of early rejection
  python 05_evaluate.py reward-stats --rm weqweasdas/RM-Gemma-2B --pairs hh-rlhf:heldout \\
      --output runs/x/gemma2b_reward_stats.json      # then: 04_decode.py --reward-norm std --reward-stats FILE
                                                     # (the same as: python -m common.rewards stats ...)
  python 05_evaluate.py compare runs/x/metrics_prm.json runs/x/metrics_orm.json   # paired A - B
  python 05_evaluate.py table runs/x/metrics_*.json

Every metric gets a 95% percentile-bootstrap interval over prompts (`<metric>_ci95`, 10,000 resamples,
--seed); agreement curves get one over pairs per t, and each RM after the first its paired difference
from the first (`ar_rm_sc_diff`, `ar_rm_sc_diff_ci95`). The reward yardstick (--rm) should be an RM that
guided none of the runs compared (the reference RM); --extra-rm adds the guiding RM's own view.

Metrics (one top-level key each in the output JSON; per-row values go to OUTPUT.rows.jsonl):
  reward     the --rm score of each complete (prompt, response): reward_mean, reward_std (population std);
             reward_decoding_mean: the score of the RM that guided the run (the paper's reward column, its
             C.2), read from the generations' "rm" (--decoding-rm none skips it); --extra-rm adds columns
  diversity  prod over n=2,3,4 of unique/total n-grams of lower-cased whitespace words, averaged over
             responses; a response with no n-gram of some order scores 0 (the paper's C.2)
  diversity_args  the ARGS authors' compute_diversity: unique / (total + 1) n-grams over nltk word tokens, for
             comparison with published ARGS numbers (lower than diversity: docs/differences.md)
  coherence  cosine similarity of sentence embeddings of prompt and response (--embedding-model,
             default minilm-l6 = all-MiniLM-L6-v2; the paper used SimCSE)
  rouge      ROUGE-L F1 against the references (rouge-score, Porter stemmer), e.g. TL;DR gold summaries
  asr        AdvBench attack success rate: success unless the response contains one of the GCG refusal
             phrases (docs/metrics.md); also asr_target_opening: share containing the target's opening words
  accuracy   GSM8K, the paper's Acc: with an LLM judge (--judge-url, --judge-model) the share of answers the
             paper's Figure 7 judge (verbatim: it sees the problem and the answer) calls correct, over the
             parsable verdicts; without a judge it is the exact match below (accuracy_by says which)
  exact_match  GSM8K, ours: the number after "####" if present, else the last number, compared numerically
  length     mean new tokens (from the generation stats; whitespace words when absent)
  winrate    win / tie / lose against --baseline (same ids), each pair judged in both orders by an
             OpenAI-compatible endpoint (--judge-url, --judge-model, key from $OPENAI_API_KEY or
             --judge-key-env) or, as a labelled proxy, by a reward model (--judge-rm); win_tie = (W+T)/N,
             win_rate = (W+T/2)/N over the parsable verdicts (n_judged; unparsable ones are counted apart).
             --judge-template paper (default: the paper's Figure 6 prompts verbatim, a forced choice, "-1" only
             for identical replies, which counts as a tie) or lenient (ours; invites ties)
References come from each generation's "reference" field, else from --prompts SET by id.
An RM is not evaluated on prompts or pairs it was trained on: the RM's manifest.json names its training
input, and an overlap is refused unless --allow-train-overlap. --rm-format closed scores complete
responses with the chat turn closed (for hub chat RMs trained that way; docs/scoring.md).
"""
import argparse
import csv
import logging
import os

import numpy as np

from common.data import check_prompt_overlap, load_pairs, load_prompts, read_rows
from common.judge import add_judge_args, prefix_labels
from common.io import (DataError, atomic_open, check_output_differs, fraction, input_checksums, non_negative_int,
                       positive_int, prefix_lengths, probability, read_jsonl, run_main, write_json, write_jsonl,
                       write_manifest)
from common.metrics import (agreement_rate, attack_success, bootstrap_ci, coherence, contains_target_opening,
                            diversity, gsm8k_correct, markdown_table, mean_with_ci, require_finite_scores,
                            reward_gap, rouge_l)
from common.models import device_fields

log = logging.getLogger("evaluate")


def add_metrics_parser(m):
    """The own flags of `metrics` (the shared ones come from parse_args' parents)."""
    m.add_argument("--generations", required=True)
    m.add_argument("--metrics", default="reward,diversity,coherence,length", help=f"comma list of {', '.join(METRICS)}")
    m.add_argument("--rm", default=None, help="RM for the reward metric: the yardstick, an RM that guided none "
                                               "of the runs compared (e.g. the reference RM)")
    m.add_argument("--decoding-rm", default="auto",
                   help="the RM whose score is reward_decoding_mean: auto (the generations' own \"rm\"), none, "
                        "or a path")
    m.add_argument("--extra-rm", action="append", default=[],
                   help="NAME=PATH: another reward column, reward_NAME_mean (e.g. the guiding ORM's own score)")
    m.add_argument("--allow-partial", action="store_true",
                   help="evaluate a generations file with rows missing (a killed run), with a warning")
    m.add_argument("--label", default=None, help="row name in tables, e.g. 'ARGS +Ours'")
    m.add_argument("--baseline", default=None, help="generations to judge against (winrate)")
    m.add_argument("--prompts", default=None, help="prompt set to take references from by id")
    m.add_argument("--embedding-model", default="minilm-l6")


def parse_args():
    from common.rewards import add_reward_stats_args, rm_scoring_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    # the arguments that several commands share, declared once
    scoring = rm_scoring_args()  # --max-length, --rm-format, --batch-size, --allow-train-overlap, --data-dir, device
    written = argparse.ArgumentParser(add_help=False)
    written.add_argument("--output", required=True)
    seeded = argparse.ArgumentParser(add_help=False)
    seeded.add_argument("--seed", type=int, default=0, help="bootstrap seed (and the judge's sample)")
    judged = argparse.ArgumentParser(add_help=False)
    add_judge_args(judged)

    add_metrics_parser(sub.add_parser("metrics", parents=[written, scoring, seeded, judged],
                                      help="metrics of one generations file"))

    a = sub.add_parser("agreement", parents=[written, scoring, seeded, judged],
                       help="AR_RM-SC(t), reward gap, AR_RM-HP / AR_SC-HP per prefix length")
    a.add_argument("--pairs", required=True, help="held-out pairs: set name or JSONL")
    a.add_argument("--rm", action="append", required=True, help="repeatable; NAME=PATH to name it")
    a.add_argument("--prefix-lengths", type=prefix_lengths, default=[5, 10, 15, 20, 30, 40, 50])
    a.add_argument("--limit", type=positive_int, default=None)
    a.add_argument("--labels", default=None, help='judge labels JSONL {"pair_id","t","verdict": "1"|"2"|"tie"}')
    a.add_argument("--judge-sample", type=non_negative_int, default=0, help="label this many pairs with the judge backend")

    k = sub.add_parser("consistency", parents=[written, scoring, seeded],
                       help="prefix consistency: do an RM's scores of the first t tokens rank the samples as the "
                            "reference ranks the complete ones?")
    k.add_argument("--generations", required=True,
                   help="04_decode.py --save-candidates output (e.g. Best-of-N): each row's \"candidates\"")
    k.add_argument("--rm", action="append", required=True,
                   help="NAME=PATH, repeatable; every RM after the first gets its paired difference from the first")
    k.add_argument("--reference", required=True, help="the RM whose complete-response scores are the truth; "
                   "'self': each RM's own (how well its prefix scores foretell its final ranking)")
    k.add_argument("--prefix-lengths", type=prefix_lengths, default=[4, 8, 16, 24],
                   help="t: the RM's first t tokens of each sample")
    k.add_argument("--alpha", type=probability, default=0.5,
                   help="the rejected share of one decision (speculative rejection's keep rule)")
    k.add_argument("--alpha-max", type=fraction, default=None,
                   help="also write each RM's adaptive rejection schedule, alpha(t) = A * clip(tau(t), 0, 1), for "
                        "04_decode.py --alpha auto:OUTPUT:NAME (calibrate with --reference self)")

    r = sub.add_parser("reward-stats", parents=[scoring],
                       help="reward_stats.json for any RM (a hub ORM too), for 04 --reward-norm std; the same as "
                            "python -m common.rewards stats")
    add_reward_stats_args(r)

    c = sub.add_parser("compare", parents=[seeded],
                       help="paired difference A - B of each metric over the ids both runs share")
    c.add_argument("a", help="metrics JSON of run A (its OUTPUT.rows.jsonl beside it)")
    c.add_argument("b", help="metrics JSON of run B")
    c.add_argument("--output", default=None, help="also write the comparison JSON here")
    c.add_argument("--exclude", default=None,
                   help="leave out the ids of this JSONL file (e.g. an earlier run's generations, to judge only "
                        "the prompts decoded since)")

    t = sub.add_parser("table", help="Markdown table (paper Tables 1-4 layout) from metric files")
    t.add_argument("files", nargs="+")
    t.add_argument("--output", default=None, help="also write the table to this file")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ metrics
# Each metric is a function of the run (Run below) that returns its per-row values by key; every key gets its
# mean and a bootstrap interval over prompts. A metric may also add keys of its own to run.out.

class Run:
    """One generations file being evaluated, and what the metrics share."""

    def __init__(self, args, rows, refs, device, dtype):
        self.args, self.rows, self.refs = args, rows, refs
        self.device, self.dtype = device, dtype
        self.prompts = [r["prompt"] for r in rows]
        self.responses = [r["response"] for r in rows]
        self.per_row = [{"id": r["id"]} for r in rows]
        self.out = {}
        self.truncated = {}  # RM path: how many of its inputs its max length cut

    def reference(self, row, field="reference"):
        value = row.get(field, self.refs.get(row["id"], {}).get(field))
        if value is None:
            raise DataError(f"{self.args.generations}: row {row['id']}: no '{field}' (give --prompts SET)")
        return value

    def rm_scores(self, path):
        """The RM's score of each reply (each one finite), its truncated inputs counted."""
        from common.rewards import load_rm, score

        model, fmt = load_rm(path, self.args.max_length, self.args.rm_format, self.device, self.dtype)
        scores = score(model, fmt, self.prompts, self.responses, self.args.batch_size)
        require_finite_scores(scores, path, [f"row {r['id']!r}" for r in self.rows])
        self.truncated[path] = fmt.truncated
        return scores


def metric_reward(run):
    """The yardstick RM's score of each reply; the decoding RM's own score (the paper's reward column); --extra-rm
    adds further columns (the guiding RMs' views)."""
    if not run.args.rm:
        raise DataError("the reward metric needs --rm")
    values = {"reward_mean": run.rm_scores(run.args.rm)}
    run.out["reward_rm"] = run.args.rm
    scored = {run.args.rm: values["reward_mean"]}  # the guide is usually one of these: scored once
    for spec in run.args.extra_rm:
        name, path = rm_spec(spec)
        scored[path] = values[f"reward_{name}_mean"] = run.rm_scores(path)
        run.out[f"reward_{name}_rm"] = path
    guide = decoding_rm(run.args, run.rows)
    if guide:
        values["reward_decoding_mean"] = scored[guide] if guide in scored else run.rm_scores(guide)
        run.out["reward_decoding_rm"] = guide
    run.out["reward_std"] = float(np.std(values["reward_mean"]))
    # inputs longer than an RM's max length are cut by the rule (docs/scoring.md): how many, per RM
    run.out["reward_truncated_inputs"] = dict(run.truncated)
    if any(run.truncated.values()):
        log.warning("RM inputs cut by the RM's max length: %s", run.truncated)
    return values


def decoding_rm(args, rows):
    """The RM that guided the generations (--decoding-rm auto: their "rm" field), or None (unguided)."""
    if args.decoding_rm != "auto":
        return None if args.decoding_rm == "none" else args.decoding_rm
    guides = {r.get("rm") for r in rows}
    if len(guides) > 1:
        raise DataError(f"{args.generations}: rows guided by different RMs {sorted(map(str, guides))}; give "
                        "--decoding-rm")
    return guides.pop()


def metric_asr(run):
    """Attack success: no refusal phrase; and the share opening as the AdvBench target does."""
    return {"asr": [float(attack_success(t)) for t in run.responses],
            "asr_target_opening": [float(contains_target_opening(t, run.reference(r, "target")))
                                   for t, r in zip(run.responses, run.rows)]}


def metric_accuracy(run):
    """The paper's Acc: Figure 7's judge over GSM8K answers, the share judged correct over the parsable verdicts;
    the exact match when no LLM judge is given (accuracy_by says which)."""
    from common.judge import ChatJudge, check_parsable, judge_from_args

    args = run.args
    judge = judge_from_args(args, args.output, run.device, run.dtype) if args.judge_url else None
    if not isinstance(judge, ChatJudge):
        log.warning("accuracy: no LLM judge given (--judge-url, --judge-model): exact match stands in for the "
                    "paper's Figure 7 judge")
        run.out["accuracy_by"] = "exact_match"
        return {"accuracy": metric_exact_match(run)["exact_match"]}
    verdicts = [judge.judge_single(r["prompt"], r["response"]) for r in run.rows]
    for pr, v in zip(run.per_row, verdicts):
        pr["accuracy"] = None if v is None else float(v == "correct")
    judged = check_parsable(verdicts, args.max_unparsable, "answers")
    value, ci = mean_with_ci([float(v == "correct") for v in judged], args.seed)
    run.out.update(accuracy=value, accuracy_ci95=ci, accuracy_by="judge", accuracy_n=len(judged),
                   accuracy_unparsable=len(verdicts) - len(judged), judge=judge.label,
                   judge_template=args.judge_template)
    return {}


def metric_exact_match(run):
    return {"exact_match": [float(gsm8k_correct(t, run.reference(r))) for t, r in zip(run.responses, run.rows)]}


def metric_winrate(run):
    """Win / tie / lose against --baseline's reply to the same id, judged in both orders."""
    from common.judge import judge_from_args, judge_pairs

    args = run.args
    if not args.baseline:
        raise DataError("winrate needs --baseline")
    base = {r["id"]: r for r in read_generations(args.baseline)}
    missing = [r["id"] for r in run.rows if r["id"] not in base]
    if missing:
        raise DataError(f"{args.baseline}: no baseline response for ids {missing[:5]}")
    same = lambda a, b: " ".join(a.split()) == " ".join(b.split())  # noqa: E731
    other = next((r["id"] for r in run.rows if not same(base[r["id"]]["prompt"], r["prompt"])), None)
    if other is not None:  # the judge would see one prompt beside a reply to another
        raise DataError(f"{args.baseline}: id {other!r} holds another prompt than in {args.generations}; a baseline "
                        "must answer the same prompts")
    judge = judge_from_args(args, args.output, run.device, run.dtype)
    verdicts = judge_pairs(judge, run.prompts, run.responses, [base[r["id"]]["response"] for r in run.rows],
                           args.judge_kind)
    for pr, v in zip(run.per_row, verdicts):
        pr["judge"] = v
    run.out.update(winrate_metrics(verdicts, args.seed, args.max_unparsable), judge=judge.label,
                   judge_is_proxy=judge.label.startswith("rm-proxy"), baseline=args.baseline)
    return {}


def diversity_args(text):
    """The ARGS authors' diversity (common.metrics.diversity_args), beside the paper's."""
    from common.metrics import diversity_args as theirs

    return theirs(text)


METRICS = {
    "reward": metric_reward,
    "diversity": lambda run: {"diversity": [diversity(t) for t in run.responses]},
    "diversity_args": lambda run: {"diversity_args": [diversity_args(t) for t in run.responses]},
    "coherence": lambda run: {"coherence": coherence(run.prompts, run.responses, run.args.embedding_model,
                                                     device=run.device)},
    "rouge": lambda run: {"rouge_l": rouge_l(run.responses, [run.reference(r) for r in run.rows])},
    "asr": metric_asr,
    "accuracy": metric_accuracy,
    "exact_match": metric_exact_match,
    "length": lambda run: {"length": [float((r.get("stats") or {}).get("new_tokens", len(r["response"].split())))
                                      for r in run.rows]},
    "winrate": metric_winrate,
}
COMPUTE = ("policy_calls", "policy_tokens", "rm_calls", "rm_tokens", "new_tokens", "seconds")


def run_metrics(args, device, dtype):
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = set(wanted) - set(METRICS)
    if unknown:
        raise DataError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    check_output_differs(args.output, args.generations, args.baseline)
    checksums = input_checksums([args.generations, args.baseline])
    rows = read_generations(args.generations)
    check_complete(args.generations, rows, args.allow_partial)
    refs = {p["id"]: p for p in load_prompts(args.prompts, args.data_dir)} if args.prompts else {}
    rm_paths = ([args.rm] if args.rm else []) + [rm_spec(s)[1] for s in args.extra_rm] + \
        [p for p in [decoding_rm(args, rows)] if p] if "reward" in wanted else []
    check_prompt_overlap(rows, args.generations, rm_paths, args.data_dir, args.allow_train_overlap)
    run = Run(args, rows, refs, device, dtype)
    run.out.update(generations=args.generations, n=len(rows), label=args.label, method=rows[0].get("method"),
                   rm=rows[0].get("rm"), policy=rows[0].get("policy"))
    for name in wanted:  # in the order asked
        for key, v in METRICS[name](run).items():
            for pr, x in zip(run.per_row, v):
                pr[key[:-len("_mean")] if key.endswith("_mean") else key] = x
            run.out[key], run.out[f"{key}_ci95"] = mean_with_ci(v, args.seed)
    # what the generations cost: totals, and the mean per response (the same counts for every method)
    stats = [r.get("stats") or {} for r in rows]
    for pr, st in zip(run.per_row, stats):  # per prompt too: intervals of compute (reproduce's reach ratio)
        pr.update({k: st[k] for k in COMPUTE if isinstance(st.get(k), (int, float))})
    run.out["compute"] = {k: float(sum(s.get(k, 0) or 0 for s in stats)) for k in COMPUTE}
    run.out["compute_per_response"] = {k: v / len(rows) for k, v in run.out["compute"].items()}
    peaks = [s["peak_memory_mb"] for s in stats if isinstance(s.get("peak_memory_mb"), (int, float))]
    if peaks:
        run.out["compute_per_response"]["peak_memory_mb"] = max(peaks)
    write_json(args.output, run.out)
    write_jsonl(os.path.splitext(args.output)[0] + ".rows.jsonl", run.per_row)
    write_manifest(args.output, args, inputs={**checksums, **({args.rm: None} if args.rm else {})},
                   extra={"truncated_inputs": run.truncated}, resolved=device_fields(device, dtype))
    log.info("%s", {k: v for k, v in run.out.items() if not k.startswith("compute")})


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


def winrate_metrics(verdicts, seed=0, max_unparsable=1.0):
    """win / tie / lose shares, win_tie = (W+T)/N and win_rate = (W+T/2)/N, each with its interval.

    A verdict of None (the judge's replies stayed unparsable) leaves the denominator and is counted.
    """
    from common.judge import check_parsable

    judged = check_parsable(verdicts, max_unparsable, "pairs")
    out = {"n_judged": len(judged), "unparsable": len(verdicts) - len(judged)}
    per_item = {"win": [float(v == "win") for v in judged], "tie": [float(v == "tie") for v in judged],
                "lose": [float(v == "lose") for v in judged],
                "win_tie": [float(v != "lose") for v in judged],
                "win_rate": [{"win": 1.0, "tie": 0.5, "lose": 0.0}[v] for v in judged]}
    for key, v in per_item.items():
        out[key], out[f"{key}_ci95"] = mean_with_ci(v, seed)
    return out


def run_agreement(args, device, dtype):
    from common.rewards import checked_pair_scores, load_rm

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
        model, fmt = load_rm(path, args.max_length, args.rm_format, device, dtype)
        if labels is None:  # prefixes for the judge are cut in the first RM's tokens
            labels = prefix_labels(args, pairs, lengths, fmt, device, dtype)
        sw, sl = checked_pair_scores(model, fmt, pairs, lengths, args.batch_size, path)
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
                               "growth": growth, "truncated_inputs": fmt.truncated}
        columns = ["t", "ar_rm_sc", "ar_rm_sc_ci95", "reward_gap", "reward_gap_ci95", "n", "diff_vs",
                   "ar_rm_sc_diff", "ar_rm_sc_diff_ci95", "ar_rm_hp", "ar_sc_hp", "n_judged", "n_judge_ties"]
        with atomic_open(f"{base}.{name}.csv") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(curve)
        log.info("%s: %s", name, [(c["t"], round(c["ar_rm_sc"], 3)) for c in curve])
    write_json(args.output, result)
    write_manifest(args.output, args, inputs=[args.pairs] + args.rm, resolved=device_fields(device, dtype),
                   extra={"truncated_inputs": {n: r["truncated_inputs"] for n, r in result["rms"].items()}})


def per_row_values(metrics_path):
    rows_path = os.path.splitext(metrics_path)[0] + ".rows.jsonl"
    return {r["id"]: r for _, r in read_jsonl(rows_path, required=("id",))}


def read_candidates(path):
    """Generation rows that carry at least two candidates each (04_decode.py --save-candidates)."""
    rows = read_generations(path)
    for r in rows:
        if not isinstance(r.get("candidates"), list) or len(r["candidates"]) < 2:
            raise DataError(f"{path}: row {r['id']}: field 'candidates': expected a list of at least "
                            "2 samples (decode with 04_decode.py --save-candidates)")
    return rows


def consistency_point(prefix, truth, by_prompt, rejection, t):
    """At one t: per prompt, Kendall's tau between an RM's prefix scores of its samples and the reference's
    complete scores, and whether the reference's best sample survives one decision of speculative rejection
    (its keep rule, common/search/methods.py: the top ceil((1 - alpha) m) by the prefix score, ties by index)."""
    import math

    from scipy.stats import kendalltau

    tau, alive = [], []
    for idx in by_prompt:
        r, y = prefix[idx], truth[idx]
        value = kendalltau(r, y).statistic
        tau.append(0.0 if math.isnan(value) else float(value))  # all tied: no order at all
        kept = sorted(range(len(idx)), key=lambda j: (-r[j], j))[:rejection.kept(len(idx), t)]
        alive.append(float(int(np.argmax(y)) in kept))
    return tau, alive


def consistency_curve(prefix, truth, by_prompt, rejection, lengths, seed, first=None):
    """One RM's consistency points at each t (prefix[:, k]: its scores of the first lengths[k] tokens), with the
    paired difference from `first` (name, taus, survives) when given; and its per-prompt taus and survivals."""
    curve, taus, survives = [], [], []
    for k, t in enumerate(lengths):
        tau, alive = consistency_point(prefix[:, k], truth, by_prompt, rejection, t)
        taus.append(tau)
        survives.append(alive)
        point = {"t": t, "kendall_tau": float(np.mean(tau)), "kendall_tau_ci95": bootstrap_ci(tau, seed),
                 "best_survives": float(np.mean(alive)), "best_survives_ci95": bootstrap_ci(alive, seed)}
        if first is not None:
            point.update(diff_vs=first[0], kendall_tau_diff=float(np.mean(tau) - np.mean(first[1][k])),
                         kendall_tau_diff_ci95=bootstrap_ci(tau, seed, paired_with=first[1][k]),
                         best_survives_diff=float(np.mean(alive) - np.mean(first[2][k])),
                         best_survives_diff_ci95=bootstrap_ci(alive, seed, paired_with=first[2][k]))
        curve.append(point)
    return curve, taus, survives


def run_consistency(args, device, dtype):
    """Per t, for every RM: Kendall's tau between its scores of the samples' first t tokens and the reference's
    scores of the complete samples (mean over prompts; --reference self: the RM's own), and the share of prompts
    whose best complete sample (by the reference) survives one rejection of the lowest alpha share at t. 95%
    bootstrap intervals over prompts; every RM after the first also gets its paired difference from the first.
    With --alpha-max, each RM's adaptive rejection schedule (common/search/methods.py, consistency_schedule)."""
    from common.rewards import load_rm, score, score_prefixes
    from common.search.methods import consistency_schedule, make_method

    check_output_differs(args.output, args.generations)
    rows = read_candidates(args.generations)
    specs = [rm_spec(x) for x in args.rm]
    own = args.reference == "self"
    check_prompt_overlap(rows, args.generations, ([] if own else [args.reference]) + [p for _, p in specs],
                         args.data_dir, args.allow_train_overlap)
    owners = [i for i, r in enumerate(rows) for _ in r["candidates"]]
    prompts = [rows[i]["prompt"] for i in owners]
    texts = [c for r in rows for c in r["candidates"]]
    sample_of = lambda n: f"row {rows[owners[n]]['id']!r}, a candidate"  # noqa: E731

    def complete_scores(model, fmt, path):
        scores = np.array(score(model, fmt, prompts, texts, args.batch_size))
        require_finite_scores(scores, path, sample_of)
        return scores

    truncated = {}
    if not own:
        model, fmt = load_rm(args.reference, args.max_length, args.rm_format, device, dtype)
        truth, truncated["reference"] = complete_scores(model, fmt, args.reference), fmt.truncated
    by_prompt = [np.array([j for j, o in enumerate(owners) if o == i]) for i in range(len(rows))]
    rejection = make_method("specrej", alpha=args.alpha)
    lengths = args.prefix_lengths
    result = {"generations": args.generations, "n_prompts": len(rows), "reference": args.reference,
              "alpha": args.alpha, "alpha_max": args.alpha_max, "prefix_lengths": lengths, "rms": {}}
    first = None
    for name, path in specs:
        model, fmt = load_rm(path, args.max_length, args.rm_format, device, dtype)
        if own:
            truth = complete_scores(model, fmt, path)
        prefix = np.array(score_prefixes(model, fmt, prompts, texts, lengths, args.batch_size))  # [samples, t]
        require_finite_scores(prefix, path, lambda n: f"{sample_of(n // len(lengths))}, t={lengths[n % len(lengths)]}")
        truncated[name] = fmt.truncated
        curve, taus, survives = consistency_curve(prefix, truth, by_prompt, rejection, lengths, args.seed, first)
        first = first or (name, taus, survives)
        result["rms"][name] = {"path": path, "curve": curve, "truncated_inputs": fmt.truncated}
        if args.alpha_max is not None:
            result["rms"][name]["alpha_schedule"] = consistency_schedule(curve, args.alpha_max)
        log.info("%s: %s", name, [(c["t"], round(c["kendall_tau"], 3), round(c["best_survives"], 3)) for c in curve])
    result["truncated_inputs"] = truncated
    write_json(args.output, result)
    write_manifest(args.output, args, inputs=[args.generations], extra={"truncated_inputs": truncated},
                   resolved=device_fields(device, dtype))


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


def run_reward_stats(args, device, dtype):
    """An alias of `python -m common.rewards stats`: reward statistics live beside the RM they describe."""
    from common.rewards import write_reward_stats

    write_reward_stats(args, device, dtype)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.command in ("compare", "table"):  # no model
        return {"compare": run_compare, "table": run_table}[args.command](args)
    from common.models import device_setup

    commands = {"metrics": run_metrics, "agreement": run_agreement, "consistency": run_consistency,
                "reward-stats": run_reward_stats}
    commands[args.command](args, *device_setup(args))


if __name__ == "__main__":
    run_main(main)
