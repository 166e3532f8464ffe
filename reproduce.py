"""The paper's HH-RLHF experiment at the size this machine affords, every claim judged by its interval.

    python reproduce.py --scale cpu  --out runs/reproduce        (make reproduce: under 2 h on 2 CPU cores)
    python reproduce.py --scale gpu  --out runs/reproduce-gpu    (make reproduce SCALE=gpu: ~8 min on one H200)
    python reproduce.py --scale full --out runs/reproduce-full   (make reproduce SCALE=full: the uncut sizes)

1. ORMs: MiniLM-L6 on all 2,000 hh-rlhf:train pairs with 03_train.py's defaults (max length 256, 1 epoch),
   seeds 0, 1, 2: held-out accuracy on all 307 hh-rlhf:heldout pairs, per seed and over seeds. The seed-0 ORM
   is the model converted into a PRM.
2. The reference RM: the candidates are trained and the one with the highest held-out accuracy is the
   reference; it is never the model being converted. cpu: the ORMs of seeds 1 and 2, and a MiniLM trained
   for a second epoch (the better of those two ORMs, one more epoch on a new seed's order: a MiniLM trained
   longer, at the cost of one ORM); full: also a SmolLM2-135M decoder RM and a MiniLM trained 3 epochs.
3. SP-PRM (entropy weights), the ablation (uniform weights, no reference) and the filter-only variant
   (weight 1 where the reference agrees, 0 elsewhere), each trained from the ORM on the SST cuts of all 2,000
   train pairs (cpu: K = 1, one cut a pair on average, so that each variant costs about one ORM epoch; full:
   the paper's K = 5).
4. Agreement (paper Figure 5): AR_RM-SC(t) and Delta_r(t) of every RM on all 307 held-out pairs, with
   intervals over pairs, each RM's paired difference from the SP-PRM per t, and the growth from the shortest
   to the longest prefix (Observation 1).
5. Decoding (paper Table 1): held-out HH prompts (cpu: 64, 32 new tokens) with SmolLM2-135M-Instruct:
   greedy, and ARGS, CBS and BoN each guided by the ORM and by the SP-PRM with normalised rewards; measured by
   the reference RM (it guided none of them), with 95% intervals over prompts and paired SP-PRM minus ORM
   differences; the ARGS reward-vs-w curve.
6. results.md: the tables, the claims list and the cost of every stage; figures as PNG.
Finished stages are skipped (rerun the same command to resume); --redo STAGE[,STAGE] or --redo all reruns.
A stage whose input was remade after its output runs again; an output made with other settings is refused
(--redo it, or use another --out).
"""
import argparse
import json
import os
import sys
import time

from common.metrics import seed_interval
from common.pipeline import Pipeline

SCALES = {
    "cpu": dict(seeds=(0, 1, 2), extra_references=("minilm-2ep",), sst_k=1, prompts=64, new_tokens=32, batch_size=8,
                args_k=5, args_w=10.0, cbs=(2, 2, 8), bon=4, sweep_w=(),
                prefix_lengths="5,10,15,20,30,40,50"),
    # a few minutes, to try the pipeline end to end (numbers meaningless)
    "smoke": dict(seeds=(0, 1), extra_references=(), sst_k=1, prompts=4, new_tokens=8, batch_size=4,
                  args_k=3, args_w=10.0, cbs=(2, 2, 4), bon=2, sweep_w=(3.0,), prefix_lengths="5,10",
                  train_limit=48, eval_limit=32),
    # one H200-class GPU in about 8 minutes: all held-out prompts, the paper's search settings, a SmolLM2 reference
    "gpu": dict(seeds=(0, 1, 2), extra_references=("smollm2",), sst_k=5, prompts=None, new_tokens=128,
                batch_size=32, args_k=30, args_w=1.5, cbs=(8, 8, 30), bon=16, sweep_w=(),
                prefix_lengths="5,10,15,20,30,40,50"),
    # the gpu scale's stages at a size the CPU runs in minutes (tests/test_reproduce.py; numbers meaningless)
    "gpu-smoke": dict(seeds=(0, 1), extra_references=("smollm2",), sst_k=5, prompts=3, new_tokens=6,
                      batch_size=4, args_k=3, args_w=1.5, cbs=(2, 2, 3), bon=2, sweep_w=(),
                      prefix_lengths="5,10", train_limit=24, eval_limit=16),
    "full": dict(seeds=(0, 1, 2), extra_references=("smollm2", "minilm-3ep"), sst_k=5, prompts=None,
                 new_tokens=128, batch_size=8, args_k=30, args_w=1.5, cbs=(8, 8, 30), bon=16,
                 sweep_w=(0.5, 3.0, 5.0, 10.0), prefix_lengths="5,10,15,20,30,40,50"),
}
MAX_LENGTH = "256"
VARIANTS = (("entropy", "sp-prm", "SP-PRM"), ("uniform", "ablation", "Ablation"), ("filter", "filter", "Filter"))
METHODS = {"argsg": "ARGS", "cbs": "CBS", "bon": "BoN"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--redo", default="", help="stages to rerun: comma list of names printed below, or all")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    s = SCALES[args.scale]
    out = args.out
    os.makedirs(out, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    pipeline = Pipeline("reproduce", args.redo, cost_path=f"{out}/stage_seconds.json",
                        commands_path=f"{out}/stage_commands.json")
    stage = pipeline.stage
    train = ["--max-length", MAX_LENGTH, "--eval", "hh-rlhf:heldout", *data]
    if s.get("train_limit"):
        train += ["--limit", s["train_limit"], "--eval-limit", s["eval_limit"]]

    # 1. ORMs over seeds, with 03's defaults
    for seed in s["seeds"]:
        stage(f"orm-s{seed}", f"{out}/orm_s{seed}", "03_train.py", "--input", "hh-rlhf:train", "--init", "minilm-l6",
              "--output", f"{out}/orm_s{seed}", "--seed", seed, "--save-steps", 50, "--resume", *train)
    orm = f"{out}/orm_s{s['seeds'][0]}"

    # 2. the reference: the strongest candidate that is not the converted ORM
    candidates = {f"ORM seed {seed}": f"{out}/orm_s{seed}" for seed in s["seeds"][1:]}
    parents = {}  # candidate path -> the candidate it was trained from
    if "smollm2" in s["extra_references"]:
        stage("ref-smollm2", f"{out}/ref_smollm2", "03_train.py", "--input", "hh-rlhf:train", "--init",
              "smollm2-135m-instruct", "--output", f"{out}/ref_smollm2", "--resume", *train)
        candidates["SmolLM2-135M RM"] = f"{out}/ref_smollm2"
    if "minilm-2ep" in s["extra_references"]:
        # a second epoch for the better other-seed ORM (a fresh schedule, another data order)
        start = max(candidates.values(), key=lambda path: read_json(f"{path}/eval.json")["accuracy"])
        stage("ref-minilm-2ep", f"{out}/ref_minilm_2ep", "03_train.py", "--input", "hh-rlhf:train", "--init", start,
              "--output", f"{out}/ref_minilm_2ep", "--seed", 3, "--save-steps", 50, "--resume", *train)
        candidates[f"MiniLM-L6, 2 epochs ({os.path.basename(start)} + 1)"] = f"{out}/ref_minilm_2ep"
        parents[f"{out}/ref_minilm_2ep"] = start
    if "minilm-3ep" in s["extra_references"]:
        stage("ref-minilm-3ep", f"{out}/ref_minilm_3ep", "03_train.py", "--input", "hh-rlhf:train", "--init",
              "minilm-l6", "--output", f"{out}/ref_minilm_3ep", "--epochs", 3, "--seed", 3, "--resume", *train)
        candidates["MiniLM-L6, 3 epochs"] = f"{out}/ref_minilm_3ep"
    accuracy = {name: read_json(f"{path}/eval.json") for name, path in candidates.items()}
    ref_name = max(accuracy, key=lambda n: accuracy[n]["accuracy"])
    reference = candidates[ref_name]
    print(f"reference RM: {ref_name} ({reference}), held-out accuracy {accuracy[ref_name]['accuracy']:.3f}")

    # 3. SST cuts of all train pairs, reference weights, the three variants trained from the ORM
    stage("sst", f"{out}/sst.jsonl", "01_build_partial.py", "--input", "hh-rlhf:train", "--output",
          f"{out}/sst.jsonl", "--tokenizer", "minilm-l6", "--truncation", "sst", "--K", s["sst_k"],
          *(["--limit", s["train_limit"]] if s.get("train_limit") else []), *data)
    for scheme, name, _ in VARIANTS:
        weighted = f"{out}/weighted_{scheme}.jsonl"
        seed_cache(f"{out}/weighted_entropy.jsonl.scores.jsonl", weighted + ".scores.jsonl")
        stage(f"weight-{scheme}", weighted, "02_weight.py", "--input", f"{out}/sst.jsonl", "--output", weighted,
              "--ref-rm", reference, "--scheme", scheme, "--max-length", MAX_LENGTH, "--resume")
        stage(name, f"{out}/{name}", "03_train.py", "--input", weighted, "--init", orm, "--output", f"{out}/{name}",
              "--save-steps", 50, "--resume", *train)

    # 4. agreement on all held-out pairs; the SP-PRM first, so every other RM gets its paired difference
    rms = [f"SP-PRM={out}/sp-prm", f"ORM={orm}", f"Ablation={out}/ablation", f"Filter={out}/filter",
           f"Reference={reference}"]
    stage("agreement", f"{out}/agreement.json", "05_evaluate.py", "agreement", "--pairs", "hh-rlhf:heldout",
          *sum((["--rm", r] for r in rms), []), "--prefix-lengths", s["prefix_lengths"], "--max-length", MAX_LENGTH,
          *(["--limit", s["eval_limit"]] if s.get("eval_limit") else []),
          "--output", f"{out}/agreement.json", *data)

    # 5. decoding and its evaluation
    decode = ["04_decode.py", "--prompts", "hh-rlhf:heldout", *(["--limit", s["prompts"]] if s["prompts"] else []),
              "--policy", "smollm2-135m-instruct", "--max-new-tokens", s["new_tokens"], "--batch-size",
              s["batch_size"], "--resume", *data]
    # The reference guided no run but weighted the SP-PRM's training pairs; a candidate it beat shaped
    # nothing at all, and is a second yardstick.
    independent = independent_of(candidates, reference, parents)
    metrics = ["05_evaluate.py", "metrics", "--rm", reference, "--extra-rm", f"ORM={orm}",
               "--extra-rm", f"SP-PRM={out}/sp-prm", "--max-length", MAX_LENGTH,
               *(["--extra-rm", f"Independent={independent}"] if independent else [])]
    stage("decode-greedy", f"{out}/gen_greedy.jsonl", *decode, "--method", "greedy", "--output",
          f"{out}/gen_greedy.jsonl")
    stage("eval-greedy", f"{out}/metrics_greedy.json", *metrics, "--metrics", "reward,diversity,coherence,length",
          "--generations", f"{out}/gen_greedy.jsonl", "--output", f"{out}/metrics_greedy.json", "--label", "Greedy")
    W, K, C = s["cbs"]
    flags = {"argsg": ["--k", s["args_k"], "--w", s["args_w"]], "cbs": ["--beam", W, "--successors", K, "--chunk", C],
             "bon": ["--n", s["bon"]]}
    metric_files = [f"{out}/metrics_greedy.json"]
    for method, label in METHODS.items():
        for rm, rm_label in (("orm", "ORM"), ("sp-prm", "SP-PRM")):
            gen, m = f"{out}/gen_{method}_{rm}.jsonl", f"{out}/metrics_{method}_{rm}.json"
            stage(f"decode-{method}-{rm}", gen, *decode, "--method", method, *flags[method], "--rm",
                  orm if rm == "orm" else f"{out}/sp-prm", "--reward-norm", "std", "--output", gen)
            stage(f"eval-{method}-{rm}", m, *metrics, "--metrics", "reward,diversity,coherence,length,winrate",
                  "--generations", gen, "--output", m, "--label", f"{label} ({rm_label})",
                  "--baseline", f"{out}/gen_greedy.jsonl", "--judge-rm", reference)
            metric_files.append(m)
    sweep = [(name, 0.0, metric_files[0]) for name in ("ORM", "SP-PRM")]
    sweep += [(name, s["args_w"], f"{out}/metrics_argsg_{rm}.json") for rm, name in (("orm", "ORM"), ("sp-prm", "SP-PRM"))]
    for w in s["sweep_w"]:
        for rm, name in (("orm", "ORM"), ("sp-prm", "SP-PRM")):
            gen, m = f"{out}/gen_argsg_{rm}_w{w:g}.jsonl", f"{out}/sweep_argsg_{rm}_w{w:g}.json"
            stage(f"decode-argsg-{rm}-w{w:g}", gen, *decode, "--method", "argsg", "--k", s["args_k"], "--w", w,
                  "--rm", orm if rm == "orm" else f"{out}/sp-prm", "--reward-norm", "std", "--output", gen)
            stage(f"eval-argsg-{rm}-w{w:g}", m, *metrics, "--metrics", "reward", "--generations", gen,
                  "--output", m, "--label", f"ARGS w={w:g} ({name})")
            sweep.append((name, w, m))

    # 6. tables, comparisons, claims, figures
    pipeline.run("05_evaluate.py", "table", *metric_files, "--output", f"{out}/table.md")
    for method in METHODS:
        pipeline.run("05_evaluate.py", "compare", f"{out}/metrics_{method}_sp-prm.json", f"{out}/metrics_{method}_orm.json",
                     "--output", f"{out}/compare_{method}.json")
    from common.figures import load_agreement, plot_agreement, plot_reward_vs_w, reward_vs_w

    agreement = load_agreement(f"{out}/agreement.json")
    curve = reward_vs_w(sweep)
    figures = plot_agreement(agreement, out) + [plot_reward_vs_w(curve, out)]
    costs = pipeline.costs()
    text = results_markdown(args, s, out, ref_name, reference, candidates, independent, agreement, curve, costs,
                            figures)
    with open(f"{out}/results.md", "w", encoding="utf-8") as f:
        f.write(text)
    print("\n" + text)
    print(f"reproduce finished in {(time.time() - pipeline.started) / 60:.1f} min; stages run now: {pipeline.summary()}")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def seed_cache(source, target):
    """The variants share one reference: 02's score cache (keyed by weights, length and texts) is reused."""
    import shutil

    if source != target and os.path.exists(source) and not os.path.exists(target):
        shutil.copy(source, target)


def independent_of(candidates, reference, parents):
    """The first candidate that is neither the reference nor what the reference was trained from: it
    guided, weighted and trained nothing."""
    return next((path for path in candidates.values() if path not in (reference, parents.get(reference))), None)


def verdict(ci, sign=1.0):
    """How a claimed positive difference fares against its 95% interval."""
    lo, hi = sorted((sign * ci[0], sign * ci[1]))
    if lo > 0:
        return "reproduces"
    if hi < 0:
        return "does not reproduce (the opposite holds)"
    return "cannot be told apart at this size"


def fmt_ci(value, ci, scale=1.0, digits=3):
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def results_markdown(args, s, out, ref_name, reference, candidates, independent, agreement, curve, costs, figures):
    make = "make reproduce" + (f" SCALE={args.scale}" if args.scale in ("full", "gpu") else "")
    lines = [f"Made by `python reproduce.py --scale {args.scale} --out {out}` (`{make}`). Every interval is a 95% interval: "
             "percentile bootstrap over pairs or prompts (10,000 resamples), or a t-interval over training seeds.", ""]
    # RMs
    lines += ["### Reward models: held-out accuracy on hh-rlhf:heldout", "",
              "| RM | held-out accuracy | role |", "|---|---|---|"]
    accs = []
    for seed in s["seeds"]:
        e = read_json(f"{out}/orm_s{seed}/eval.json")
        accs.append(e["accuracy"])
        role = "converted into the PRM" if seed == s["seeds"][0] else (
            "reference" if candidates.get(ref_name) == f"{out}/orm_s{seed}" else "reference candidate")
        lines.append(f"| ORM, MiniLM-L6, seed {seed} | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} (n={e['n']}) | {role} |")
    for name, path in candidates.items():
        if not path.startswith(f"{out}/orm_s"):
            e = read_json(f"{path}/eval.json")
            lines.append(f"| {name} | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} | "
                         + ("reference" if name == ref_name else "reference candidate") + " |")
    mean, ci = seed_interval(accs)
    lines.append(f"| ORM, mean over seeds {', '.join(map(str, s['seeds']))} | {fmt_ci(mean, ci)} (t over seeds) | |")
    for _, name, label in VARIANTS:
        e = read_json(f"{out}/{name}/eval.json")
        lines.append(f"| {label} (from the seed-{s['seeds'][0]} ORM) | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} | |")
    lines += ["", f"The reference is {ref_name} (`{reference}`), the candidate with the highest held-out accuracy; "
              "it was chosen on the same held-out pairs the agreement curves use.", ""]
    # agreement
    rms = agreement["rms"]
    ts = [c["t"] for c in rms["SP-PRM"]["curve"]]
    lines += ["### Agreement with the data's preference, AR_RM-SC(t), on all held-out pairs (paper Figure 5)", "",
              "| RM | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name, rm in rms.items():
        lines.append(f"| {name} | " + " | ".join(fmt_ci(c["ar_rm_sc"], c["ar_rm_sc_ci95"]) for c in rm["curve"]) + " |")
    lines += ["", "Paired difference from the SP-PRM over the same pairs (RM minus SP-PRM):", "",
              "| RM | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name, rm in rms.items():
        if name != "SP-PRM":
            lines.append(f"| {name} - SP-PRM | " + " | ".join(fmt_ci(c["ar_rm_sc_diff"], c["ar_rm_sc_diff_ci95"])
                                                       for c in rm["curve"]) + " |")
    lines += ["", "Reward gap Delta_r(t) = mean |r(y_w[:t]) - r(y_l[:t])|:", "",
              "| RM | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name, rm in rms.items():
        lines.append(f"| {name} | " + " | ".join(f"{c['reward_gap']:.3f}" for c in rm["curve"]) + " |")
    # decoding
    with open(f"{out}/table.md", encoding="utf-8") as f:
        table = f.read().strip()
    n_prompts = read_json(f"{out}/metrics_greedy.json")["n"]
    lines += ["", f"### Decoding (paper Table 1): {n_prompts} held-out prompts, SmolLM2-135M-Instruct, "
              f"{s['new_tokens']} new tokens, rewards normalised (`--reward-norm std`)", "",
              f"Reward = the reference RM's score (it guided none of these runs, but its scores weighted the "
              f"SP-PRM's training pairs); Reward (Independent) = an RM that shaped nothing here"
              + (f" (`{independent}`)" if independent else "")
              + "; Win-Tie = win_rate against greedy "
              f"judged by the reference RM (a proxy †). ARGS k={s['args_k']}, w={s['args_w']:g}; CBS W, K, L = "
              f"{', '.join(map(str, s['cbs']))}; BoN N={s['bon']}.", "", table, "",
              "Paired SP-PRM-guided minus ORM-guided, over the same prompts:", "",
              "| method | reward (reference RM) | reward (independent RM) | reward (ORM's own view) "
              "| reward (SP-PRM's own view) |", "|---|---|---|---|---|"]
    compares = {m: read_json(f"{out}/compare_{m}.json") for m in METHODS}
    for method, label in METHODS.items():
        d = compares[method]["metrics"]
        cells = []
        for key in ("reward", "reward_Independent", "reward_ORM", "reward_SP-PRM"):
            x = d.get(key)
            cells.append(fmt_ci(x["diff"], x["diff_ci95"], digits=4) if x else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "ARGS reward (reference RM) against w:", ""]
    for name, points in curve["rms"].items():
        lines.append(f"- guided by {name}: " + ", ".join(
            f"w={pt['w']:g}: {fmt_ci(pt['reward_mean'], pt['reward_mean_ci95'], digits=4)}" if pt.get("reward_mean_ci95")
            else f"w={pt['w']:g}: {pt['reward_mean']:.4f}" for pt in points))
    # claims
    orm_growth = rms["ORM"]["growth"]
    short = [c for c in rms["ORM"]["curve"] if c["t"] <= 10]
    ablation_short = [c for c in rms["Ablation"]["curve"] if c["t"] <= 10]
    lines += ["", "### The paper's claims at this size", "",
              f"- Observation 1, ORM agreement grows with t: AR_RM-SC(t={orm_growth['to_t']}) - AR_RM-SC(t="
              f"{orm_growth['from_t']}) = {fmt_ci(orm_growth['diff'], orm_growth['diff_ci95'])}: "
              f"{verdict(orm_growth['diff_ci95'])}."]
    for c in short:
        lines.append(f"- Figure 5, SP-PRM above the ORM at t={c['t']}: SP-PRM - ORM = "
                     f"{fmt_ci(-c['ar_rm_sc_diff'], [-c['ar_rm_sc_diff_ci95'][1], -c['ar_rm_sc_diff_ci95'][0]])}: "
                     f"{verdict(c['ar_rm_sc_diff_ci95'], -1)}.")
    for method, label in METHODS.items():
        for key, who in (("reward", "reference RM"), ("reward_Independent", "independent RM")):
            x = compares[method]["metrics"].get(key)
            if x:
                lines.append(f"- Table 1, SP-PRM-guided {label} beats ORM-guided {label} ({who}'s reward): "
                             f"{fmt_ci(x['diff'], x['diff_ci95'], digits=4)}: {verdict(x['diff_ci95'])}.")
    for c in ablation_short:
        lines.append(f"- Ablation, removing the reference hurts at t={c['t']}: SP-PRM - Ablation = "
                     f"{fmt_ci(-c['ar_rm_sc_diff'], [-c['ar_rm_sc_diff_ci95'][1], -c['ar_rm_sc_diff_ci95'][0]])}: "
                     f"{verdict(c['ar_rm_sc_diff_ci95'], -1)}.")
    # costs
    lines += ["", "### Cost of each stage (seconds on this machine)", "",
              ", ".join(f"{name} {sec:.0f}" for name, sec in costs.items()),
              f"Total of the stages: {sum(costs.values()) / 60:.1f} min.", "",
              "Figures: " + ", ".join(os.path.relpath(f, out) for f in figures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
