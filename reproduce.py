"""The paper's HH-RLHF experiment, every claim judged by its interval: one orchestrator for every scale.

    python reproduce.py --scale demo --out runs/demo             (make demo: minutes on 2 CPU cores)
    python reproduce.py --scale cpu  --out runs/reproduce        (make reproduce: about 2 h on 2 CPU cores)
    python reproduce.py --scale gpu  --out runs/reproduce-gpu    (make reproduce SCALE=gpu: untested on a GPU)
    python reproduce.py --scale full --out runs/reproduce-full   (make reproduce SCALE=full: the uncut sizes)

1. ORMs: MiniLM-L6 on hh-rlhf:train with 03_train.py's settings at max length --max-length of the scale, one
   per seed; held-out accuracy on hh-rlhf:heldout, per seed and over seeds. The first seed's ORM is the
   model converted into a PRM.
2. The reference RM: the candidates (the other seeds' ORMs and the scale's extra references) are trained
   and the one with the highest held-out accuracy is the reference; it is never the model being converted.
   Extra references: minilm-pairs (a MiniLM on more pairs than the ORM), minilm-2ep (the better other-seed
   ORM trained a second epoch), minilm-3ep (3 epochs), smollm2 (a SmolLM2-135M decoder RM).
3. SP-PRM (entropy weights) and, by scale, the ablation (uniform weights, no reference) and the filter-only
   variant (weight 1 where the reference agrees), each trained from the ORM on the SST cuts of the train pairs.
4. Agreement (paper Figure 5): AR_RM-SC(t) and Delta_r(t) of every RM on the held-out pairs, with intervals
   over pairs, each RM's paired difference from the SP-PRM per t, and the growth over t (Observation 1).
5. Decoding (paper Table 1): held-out HH prompts with SmolLM2-135M-Instruct: greedy, and each method guided
   by the ORM and by the SP-PRM with normalised rewards; measured by the reference RM (it guided none of
   them) and by an RM that shaped nothing, when there is one, with 95% intervals over prompts and paired
   SP-PRM minus ORM differences; the ARGS reward-vs-w curve.
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

from common.io import DEVICES
from common.metrics import seed_interval
from common.pipeline import Pipeline

# Every scale's sizes in one table. orm_pairs / eval_pairs / sst_pairs: None = all; reference_pairs: the
# minilm-pairs reference's training pairs; prompts: held-out prompts decoded (None = all 307); cbs: W, K, L.
# w is in standard deviations of the guiding RM's reward (--reward-norm std). tables: the sizes of the tables
# part (prompts, new tokens, BoN's two N, CARDS' flags, and Table 4's GSM8K RMs and problems).
CARDS_SMALL = ("--max-segment", 12, "--max-retries", 4)  # CARDS' defaults (64, 20) outgrow a 24-token reply
SCALES = {
    # the pipeline end to end in minutes; its numbers show it working, not the method's effect
    "demo": dict(seeds=(0,), orm_pairs=128, eval_pairs=64, references=("minilm-pairs",), reference_pairs=320,
                 sst_k=5, sst_pairs=48, variants=("entropy",), max_length=128, prompts=8, new_tokens=24,
                 batch_size=8, methods=("argsg", "bon"), args_k=5, args_w=10.0, cbs=(2, 2, 8), bon=4,
                 sweep_w=(), prefix_lengths="5,10,20,50",
                 specrej=dict(prompts=3, ns=(2, 4), alphas=(0.5,), new_tokens=8, decision_every=2,
                              prefix_lengths="2,4")),
    # the paper's experiment at the size 2 CPU cores afford in about 2 hours (119 min measured: docs/results.md)
    "cpu": dict(seeds=(0, 1, 2), orm_pairs=None, eval_pairs=None, references=("minilm-2ep",), sst_k=1,
                sst_pairs=None, variants=("entropy", "uniform", "filter"), max_length=256, prompts=64,
                new_tokens=32, batch_size=8, methods=("argsg", "cbs", "bon"), args_k=5, args_w=10.0,
                cbs=(2, 2, 8), bon=4, sweep_w=(), prefix_lengths="5,10,15,20,30,40,50",
                specrej=dict(prompts=64, ns=(4, 8, 16), alphas=(0.5, 0.75), new_tokens=32, decision_every=8,
                             prefix_lengths="4,8,16,24"),
                tables=dict(prompts=16, new_tokens=24, bon=(4, 8), cards=CARDS_SMALL,
                            gsm8k=dict(orm_pairs=600, reference_pairs=None, reference_epochs=1, prompts=16,
                                       new_tokens=64))),
    # a few minutes, to try the cpu pipeline end to end (numbers meaningless)
    "smoke": dict(seeds=(0, 1), orm_pairs=48, eval_pairs=32, references=(), sst_k=1, sst_pairs=48,
                  variants=("entropy", "uniform", "filter"), max_length=256, prompts=4, new_tokens=8,
                  batch_size=4, methods=("argsg", "cbs", "bon"), args_k=3, args_w=10.0, cbs=(2, 2, 4), bon=2,
                  sweep_w=(3.0,), prefix_lengths="5,10",
                  specrej=dict(prompts=2, ns=(2, 4), alphas=(0.5,), new_tokens=4, decision_every=2,
                               prefix_lengths="2,4"),
                  tables=dict(prompts=2, new_tokens=4, bon=(2, 3), cards=CARDS_SMALL,
                              gsm8k=dict(orm_pairs=24, reference_pairs=48, reference_epochs=1, prompts=2,
                                         new_tokens=6))),
    # one GPU (untested on a GPU; docs/gpu.md counts its work): all held-out prompts, the paper's search
    # settings, a SmolLM2 reference
    "gpu": dict(device="cuda", seeds=(0, 1, 2), orm_pairs=None, eval_pairs=None, references=("smollm2",), sst_k=5, sst_pairs=None,
                variants=("entropy", "uniform", "filter"), max_length=256, prompts=None, new_tokens=128,
                batch_size=32, methods=("argsg", "cbs", "bon"), args_k=30, args_w=1.5, cbs=(8, 8, 30), bon=16,
                sweep_w=(), prefix_lengths="5,10,15,20,30,40,50",
                specrej=dict(prompts=None, ns=(4, 8, 16), alphas=(0.5, 0.75), new_tokens=128, decision_every=32,
                             prefix_lengths="8,16,32,64"),
                tables=dict(prompts=None, new_tokens=128, bon=(16, 64), cards=(),
                            gsm8k=dict(orm_pairs=None, reference_pairs=None, reference_epochs=3, prompts=None,
                                       new_tokens=256))),
    # the gpu scale's stages at a size the CPU runs in minutes (tests/test_reproduce.py; numbers meaningless)
    "gpu-smoke": dict(seeds=(0, 1), orm_pairs=24, eval_pairs=16, references=("smollm2",), sst_k=5, sst_pairs=24,
                      variants=("entropy", "uniform", "filter"), max_length=256, prompts=3, new_tokens=6,
                      batch_size=4, methods=("argsg", "cbs", "bon"), args_k=3, args_w=1.5, cbs=(2, 2, 3), bon=2,
                      sweep_w=(), prefix_lengths="5,10",
                      specrej=dict(prompts=2, ns=(2, 4), alphas=(0.5,), new_tokens=4, decision_every=2,
                                   prefix_lengths="2,4")),
    # the uncut sizes with the paper's search settings: w = 1.5 on the RMs' raw scale, the paper's training batch
    "full": dict(device="cuda", reward_norm="none", rm_batch=dict(encoder=(8, 8), decoder=(8, 4)), seeds=(0, 1, 2), orm_pairs=None,
                 eval_pairs=None, references=("smollm2", "minilm-3ep"), sst_k=5, sst_pairs=None,
                 variants=("entropy", "uniform", "filter"), max_length=256, prompts=None,
                 new_tokens=128, batch_size=8, methods=("argsg", "cbs", "bon"), args_k=30, args_w=1.5,
                 cbs=(8, 8, 30), bon=16, sweep_w=(0.5, 3.0, 5.0, 10.0), prefix_lengths="5,10,15,20,30,40,50",
                 specrej=dict(prompts=None, ns=(4, 8, 16), alphas=(0.5, 0.75), new_tokens=128, decision_every=32,
                              prefix_lengths="8,16,32,64"),
                 tables=dict(prompts=None, new_tokens=128, bon=(16, 64), cards=(),
                             gsm8k=dict(orm_pairs=None, reference_pairs=None, reference_epochs=3, prompts=None,
                                        new_tokens=256))),
}
VARIANTS = {"entropy": ("sp-prm", "SP-PRM"), "uniform": ("ablation", "Ablation"), "filter": ("filter", "Filter")}
METHODS = {"argsg": "ARGS", "cbs": "CBS", "bon": "BoN"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="cpu")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--redo", default="", help="stages to rerun: a comma list of stage names (a run prints each as "
                   "[run] NAME or [skip] NAME; OUT/stage_seconds.json lists them), or all")
    p.add_argument("--part", choices=["table1", "tables", "specrej"], default="table1",
                   help="table1: agreement and decoding (paper Figure 5, Table 1); tables: Table 1 with every "
                        "method row and the +Ablation rows, Table 3 (AdvBench) and Table 4 (GSM8K, its own RMs), at "
                        "the scale's `tables` sizes (make tables); specrej: Best-of-N against speculative rejection "
                        "guided by the ORM and by the SP-PRM (the same RMs; make specrej)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="every model stage's --device (default: the scale's: cuda for gpu and full, which then "
                        "fail rather than run on the CPU; else each stage's auto)")
    args = p.parse_args()
    s = {"reward_norm": "std", "rm_batch": None, "device": None, **SCALES[args.scale]}
    out = args.out
    os.makedirs(out, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    limit = lambda n: ["--limit", n] if n else []  # noqa: E731
    pipeline = Pipeline("reproduce", args.redo, cost_path=f"{out}/stage_seconds.json",
                        commands_path=f"{out}/stage_commands.json", device=args.device or s["device"],
                        scripts=os.path.dirname(os.path.abspath(__file__)))  # the stages beside this file
    stage = pipeline.stage
    L = s["max_length"]
    train = ["--max-length", L, "--eval", "hh-rlhf:heldout", *(["--eval-limit", s["eval_pairs"]] if s["eval_pairs"]
                                                               else []), *data]

    batch = lambda kind: rm_batch_flags(s, kind)  # noqa: E731

    # 1. ORMs over seeds
    for seed in s["seeds"]:
        stage(f"orm-s{seed}", f"{out}/orm_s{seed}", "03_train.py", "--input", "hh-rlhf:train", "--init", "minilm-l6",
              "--output", f"{out}/orm_s{seed}", "--seed", seed, *limit(s["orm_pairs"]), "--save-steps", 50,
              "--resume", *train, *batch("encoder"))
    orm = f"{out}/orm_s{s['seeds'][0]}"

    # 2. the reference: the strongest candidate that is not the converted ORM
    candidates = {f"ORM seed {seed}": f"{out}/orm_s{seed}" for seed in s["seeds"][1:]}
    parents = {}  # candidate path -> the candidate it was trained from
    if "minilm-pairs" in s["references"]:
        stage("ref-minilm-pairs", f"{out}/ref_minilm_pairs", "03_train.py", "--input", "hh-rlhf:train", "--init",
              "minilm-l6", "--output", f"{out}/ref_minilm_pairs", *limit(s["reference_pairs"]),
              "--resume", *train, *batch("encoder"))
        candidates[f"MiniLM-L6 on {s['reference_pairs']} pairs"] = f"{out}/ref_minilm_pairs"
    if "smollm2" in s["references"]:
        stage("ref-smollm2", f"{out}/ref_smollm2", "03_train.py", "--input", "hh-rlhf:train", "--init",
              "smollm2-135m-instruct", "--output", f"{out}/ref_smollm2", *limit(s["orm_pairs"]), "--resume", *train,
              *batch("decoder"))
        candidates["SmolLM2-135M RM"] = f"{out}/ref_smollm2"
    if "minilm-2ep" in s["references"]:
        # a second epoch for the better other-seed ORM (a fresh schedule, another data order)
        start = max(candidates.values(), key=lambda path: read_json(f"{path}/eval.json")["accuracy"])
        stage("ref-minilm-2ep", f"{out}/ref_minilm_2ep", "03_train.py", "--input", "hh-rlhf:train", "--init", start,
              "--output", f"{out}/ref_minilm_2ep", "--seed", 3, *limit(s["orm_pairs"]), "--save-steps", 50,
              "--resume", *train, *batch("encoder"))
        candidates[f"MiniLM-L6, 2 epochs ({os.path.basename(start)} + 1)"] = f"{out}/ref_minilm_2ep"
        parents[f"{out}/ref_minilm_2ep"] = start
    if "minilm-3ep" in s["references"]:
        stage("ref-minilm-3ep", f"{out}/ref_minilm_3ep", "03_train.py", "--input", "hh-rlhf:train", "--init",
              "minilm-l6", "--output", f"{out}/ref_minilm_3ep", "--epochs", 3, "--seed", 3, *limit(s["orm_pairs"]),
              "--resume", *train, *batch("encoder"))
        candidates["MiniLM-L6, 3 epochs"] = f"{out}/ref_minilm_3ep"
    accuracy = {name: read_json(f"{path}/eval.json") for name, path in candidates.items()}
    ref_name = max(accuracy, key=lambda n: accuracy[n]["accuracy"])
    reference = candidates[ref_name]
    print(f"reference RM: {ref_name} ({reference}), held-out accuracy {accuracy[ref_name]['accuracy']:.3f}")

    # 3. SST cuts of the train pairs, reference weights, the variants trained from the ORM
    stage("sst", f"{out}/sst.jsonl", "01_build_partial.py", "--input", "hh-rlhf:train", "--output",
          f"{out}/sst.jsonl", "--tokenizer", "minilm-l6", "--truncation", "sst", "--K", s["sst_k"],
          *limit(s["sst_pairs"]), *data)
    # the specrej part needs only the SP-PRM, the tables part the SP-PRM and the ablation
    for scheme in {"table1": s["variants"], "tables": s["variants"][:2], "specrej": s["variants"][:1]}[args.part]:
        name = VARIANTS[scheme][0]
        weighted = f"{out}/weighted_{scheme}.jsonl"
        seed_cache(f"{out}/weighted_entropy.jsonl.scores.jsonl", weighted + ".scores.jsonl")
        stage(f"weight-{scheme}", weighted, "02_weight.py", "--input", f"{out}/sst.jsonl", "--output", weighted,
              "--ref-rm", reference, "--scheme", scheme, "--max-length", L, "--resume")
        stage(name, f"{out}/{name}", "03_train.py", "--input", weighted, "--init", orm, "--output", f"{out}/{name}",
              "--save-steps", 50, "--resume", *train, *batch("encoder"))

    independent = independent_of(candidates, reference, parents)
    if args.part == "specrej":
        return specrej_experiment(args, s, pipeline, out, data, orm, reference, independent)
    if args.part == "tables":
        if "tables" not in s or "uniform" not in s["variants"]:
            raise SystemExit(f"error: the {args.scale} scale has no tables part (its sizes or the ablation RM)")
        return tables_experiment(args, s, pipeline, out, data, orm, reference, independent)

    # 4. agreement on the held-out pairs; the SP-PRM first, so every other RM gets its paired difference
    rms = [f"SP-PRM={out}/sp-prm", f"ORM={orm}"] + [f"{VARIANTS[v][1]}={out}/{VARIANTS[v][0]}"
                                                    for v in s["variants"][1:]] + [f"Reference={reference}"]
    stage("agreement", f"{out}/agreement.json", "05_evaluate.py", "agreement", "--pairs", "hh-rlhf:heldout",
          *sum((["--rm", r] for r in rms), []), "--prefix-lengths", s["prefix_lengths"], "--max-length", L,
          *limit(s["eval_pairs"]), "--output", f"{out}/agreement.json", *data)

    # 5. decoding and its evaluation
    decode = ["04_decode.py", "--prompts", "hh-rlhf:heldout", *limit(s["prompts"]),
              "--policy", "smollm2-135m-instruct", "--max-new-tokens", s["new_tokens"], "--batch-size",
              s["batch_size"], "--resume", *data]
    # The reference guided no run but weighted the SP-PRM's training pairs; a candidate it beat shaped
    # nothing at all (`independent`), and is a second yardstick.
    metrics = ["05_evaluate.py", "metrics", "--rm", reference, "--extra-rm", f"ORM={orm}",
               "--extra-rm", f"SP-PRM={out}/sp-prm", "--max-length", L,
               *(["--extra-rm", f"Independent={independent}"] if independent else [])]
    stage("decode-greedy", f"{out}/gen_greedy.jsonl", *decode, "--method", "greedy", "--output",
          f"{out}/gen_greedy.jsonl")
    stage("eval-greedy", f"{out}/metrics_greedy.json", *metrics, "--metrics", "reward,diversity,coherence,length",
          "--generations", f"{out}/gen_greedy.jsonl", "--output", f"{out}/metrics_greedy.json", "--label", "Greedy")
    W, K, C = s["cbs"]
    flags = {"argsg": ["--k", s["args_k"], "--w", s["args_w"]], "cbs": ["--beam", W, "--successors", K, "--chunk", C],
             "bon": ["--n", s["bon"]]}
    metric_files = [f"{out}/metrics_greedy.json"]
    for method in s["methods"]:
        for rm, rm_label in (("orm", "ORM"), ("sp-prm", "SP-PRM")):
            gen, m = f"{out}/gen_{method}_{rm}.jsonl", f"{out}/metrics_{method}_{rm}.json"
            stage(f"decode-{method}-{rm}", gen, *decode, "--method", method, *flags[method], "--rm",
                  orm if rm == "orm" else f"{out}/sp-prm", "--reward-norm", s["reward_norm"], "--output", gen)
            stage(f"eval-{method}-{rm}", m, *metrics, "--metrics", "reward,diversity,coherence,length,winrate",
                  "--generations", gen, "--output", m, "--label", f"{METHODS[method]} ({rm_label})",
                  "--baseline", f"{out}/gen_greedy.jsonl", "--judge-rm", reference)
            metric_files.append(m)
    sweep = [(name, 0.0, metric_files[0]) for name in ("ORM", "SP-PRM")]
    if "argsg" in s["methods"]:
        sweep += [(name, s["args_w"], f"{out}/metrics_argsg_{rm}.json")
                  for rm, name in (("orm", "ORM"), ("sp-prm", "SP-PRM"))]
    for w in s["sweep_w"]:
        for rm, name in (("orm", "ORM"), ("sp-prm", "SP-PRM")):
            gen, m = f"{out}/gen_argsg_{rm}_w{w:g}.jsonl", f"{out}/sweep_argsg_{rm}_w{w:g}.json"
            stage(f"decode-argsg-{rm}-w{w:g}", gen, *decode, "--method", "argsg", "--k", s["args_k"], "--w", w,
                  "--rm", orm if rm == "orm" else f"{out}/sp-prm", "--reward-norm", s["reward_norm"], "--output", gen)
            stage(f"eval-argsg-{rm}-w{w:g}", m, *metrics, "--metrics", "reward", "--generations", gen,
                  "--output", m, "--label", f"ARGS w={w:g} ({name})")
            sweep.append((name, w, m))

    # 6. tables, comparisons, claims, figures
    pipeline.run("05_evaluate.py", "table", *metric_files, "--output", f"{out}/table.md")
    for method in s["methods"]:
        pipeline.run("05_evaluate.py", "compare", f"{out}/metrics_{method}_sp-prm.json",
                     f"{out}/metrics_{method}_orm.json", "--output", f"{out}/compare_{method}.json")
    from common.figures import (load_agreement, paired_differences, plot_agreement, plot_paired_differences,
                                plot_reward_vs_w, reward_vs_w)
    from common.io import atomic_open, write_json

    agreement = load_agreement(f"{out}/agreement.json")
    curve = reward_vs_w(sweep)
    write_json(f"{out}/args_sweep.json", curve)
    figures = [plot_paired_differences(paired_differences(out), out)] + plot_agreement(agreement, out) + \
        [plot_reward_vs_w(curve, out)]
    costs = pipeline.costs()
    text = results_markdown(args, s, out, ref_name, reference, candidates, independent, agreement, curve, costs,
                            figures)
    with atomic_open(f"{out}/results.md") as f:
        f.write(text)
    print("\n" + text)
    print(where_to_look(args, pipeline, out, figures))


def where_to_look(args, pipeline, out, figures):
    """The five lines a run ends with: its time, and where its table, figures, results and notebooks are."""
    notebooks = "notebooks/tables.ipynb, notebooks/figures.ipynb"
    reads = "" if os.path.abspath(out) == os.path.abspath("runs/demo") else f" (with SPPRM_RUN_DIR={out})"
    return "\n".join([
        f"reproduce --scale {args.scale} finished in {(time.time() - pipeline.started) / 60:.1f} min "
        f"({len(pipeline.timings)} stages run now; each stage's seconds: {out}/stage_seconds.json)",
        f"  table:     {out}/table.md",
        "  figures:   " + ", ".join(os.path.relpath(f) for f in figures),
        f"  results:   {out}/results.md (every table, paired difference and claim, in words)",
        f"  notebooks: {notebooks}{reads} (how to open them: README, Notebooks)"])


def rm_batch_flags(s, kind):
    """03's batch flags for an encoder or decoder RM: SCALE=full trains with the paper's batch (its Tables 10 and
    11: 64 pairs for an encoder RM, 32 for a decoder RM) through gradient accumulation, the other scales with 03's
    default of 8 pairs a step."""
    if not s["rm_batch"]:
        return []
    size, accum = s["rm_batch"][kind]
    return ["--batch-size", size, "--grad-accum", accum]


def table_methods(s, x):
    """(tag, label, 04 flags) of every Table 1 method row at the scale's `tables` sizes."""
    W, K, C = s["cbs"]
    rows = [("argsg", "ARGS", ["--method", "argsg", "--k", s["args_k"], "--w", s["args_w"]]),
            ("tbs", "TBS", ["--method", "tbs", "--beam", W, "--successors", K]),
            ("cbs", "CBS", ["--method", "cbs", "--beam", W, "--successors", K, "--chunk", C]),
            ("cards", "CARDS", ["--method", "cards", *x["cards"]])]
    return rows + [(f"bon{n}", f"BoN-{n}", ["--method", "bon", "--n", n]) for n in x["bon"]]


def decode_table(pipeline, out, name, decode, evaluate, metrics, methods, guides, judge=None):
    """Greedy and every method guided by each (tag, label, path) RM: decode, evaluate (`metrics`, and with a judge
    the win rate against greedy), and the paired difference of each guide after the first from the first
    (SP-PRM minus ORM, SP-PRM minus Ablation). Returns the metric files in table order."""
    stage = pipeline.stage
    greedy = f"{out}/{name}_gen_greedy.jsonl"
    stage(f"{name}-decode-greedy", greedy, *decode, "--method", "greedy", "--output", greedy)
    files = [f"{out}/{name}_metrics_greedy.json"]
    stage(f"{name}-eval-greedy", files[0], *evaluate, "--metrics", metrics, "--generations", greedy, "--output",
          files[0], "--label", "Greedy")
    winrate = [",winrate", "--baseline", greedy, *judge] if judge else [""]
    for tag, label, flags in methods:  # flags carry --reward-norm
        runs = []
        for rm, rm_label, path in guides:
            gen, m = f"{out}/{name}_gen_{tag}_{rm}.jsonl", f"{out}/{name}_metrics_{tag}_{rm}.json"
            stage(f"{name}-decode-{tag}-{rm}", gen, *decode, *flags, "--rm", path, "--output", gen)
            stage(f"{name}-eval-{tag}-{rm}", m, *evaluate, "--metrics", metrics + winrate[0], *winrate[1:],
                  "--generations", gen, "--output", m, "--label", f"{label} ({rm_label})")
            runs.append(m)
        files += runs
        for m in runs[1:]:  # SP-PRM first: every other guide against it
            pipeline.run("05_evaluate.py", "compare", runs[0], m, "--output", m.replace("_metrics_", "_compare_"))
    pipeline.run("05_evaluate.py", "table", *files, "--output", f"{out}/{name}.md")
    return files


def tables_experiment(args, s, pipeline, out, data, orm, reference, independent):
    """Table 1 with every method (ARGS, TBS, CBS, CARDS, BoN at two N) guided by the SP-PRM, the ORM and the
    ablation RM; Table 3: the same RMs on AdvBench with "Sure here's" after each instruction; Table 4: an ORM and
    an SP-PRM trained on gsm8k-pairs:train, decoding the held-out GSM8K problems. Writes tables/results_tables.md."""
    x = s["tables"]
    stage = pipeline.stage
    t = f"{out}/tables"
    os.makedirs(t, exist_ok=True)
    L = s["max_length"]
    limit = lambda n: ["--limit", n] if n else []  # noqa: E731
    base = ["04_decode.py", "--policy", "smollm2-135m-instruct", "--batch-size", s["batch_size"], "--resume", *data]
    methods = [(tag, label, [*flags, "--reward-norm", s["reward_norm"]]) for tag, label, flags in table_methods(s, x)]
    hh_guides = [("sp-prm", "SP-PRM", f"{out}/sp-prm"), ("orm", "ORM", orm), ("ablation", "Ablation",
                                                                           f"{out}/ablation")]
    yardsticks = ["--rm", reference, "--max-length", L, "--extra-rm", f"ORM={orm}", "--extra-rm",
                  f"SP-PRM={out}/sp-prm", *(["--extra-rm", f"Independent={independent}"] if independent else [])]
    evaluate = ["05_evaluate.py", "metrics", *yardsticks]

    # Table 1: held-out HH prompts, every method, three guides; win rate against greedy judged by the reference
    decode = [*base, "--prompts", "hh-rlhf:heldout", *limit(x["prompts"]), "--max-new-tokens", x["new_tokens"]]
    table1 = decode_table(pipeline, t, "table1", decode, evaluate, "reward,diversity,coherence,length", methods,
                          hh_guides, judge=["--judge-rm", reference])
    # Table 3: AdvBench with "Sure here's" after each instruction, the HH RMs (harmless pairs)
    decode = [*base, "--prompts", "advbench", "--advbench-prefill", *limit(x["prompts"]), "--max-new-tokens",
              x["new_tokens"]]
    table3 = decode_table(pipeline, t, "table3", decode, evaluate, "reward,asr,diversity,coherence", methods,
                          hh_guides[:2])
    # Table 4: GSM8K RMs of their own; the reference is trained on more pairs than the ORM
    g = x["gsm8k"]
    gtrain = ["--max-length", L, "--eval", "gsm8k-pairs:heldout", *data, *rm_batch_flags(s, "encoder")]
    gorm, gref, gprm = f"{t}/gsm8k_orm", f"{t}/gsm8k_reference", f"{t}/gsm8k_sp-prm"
    stage("gsm8k-orm", gorm, "03_train.py", "--input", "gsm8k-pairs:train", "--init", "minilm-l6", "--output", gorm,
          *limit(g["orm_pairs"]), "--resume", *gtrain)
    stage("gsm8k-reference", gref, "03_train.py", "--input", "gsm8k-pairs:train", "--init", "minilm-l6", "--output",
          gref, "--seed", 1, *limit(g["reference_pairs"]), "--epochs", g["reference_epochs"], "--resume", *gtrain)
    stage("gsm8k-sst", f"{t}/gsm8k_sst.jsonl", "01_build_partial.py", "--input", "gsm8k-pairs:train", "--output",
          f"{t}/gsm8k_sst.jsonl", "--tokenizer", "minilm-l6", "--truncation", "sst", "--K", s["sst_k"],
          *limit(g["orm_pairs"]), *data)
    stage("gsm8k-weight", f"{t}/gsm8k_weighted.jsonl", "02_weight.py", "--input", f"{t}/gsm8k_sst.jsonl", "--output",
          f"{t}/gsm8k_weighted.jsonl", "--ref-rm", gref, "--scheme", "entropy", "--max-length", L, "--resume")
    stage("gsm8k-sp-prm", gprm, "03_train.py", "--input", f"{t}/gsm8k_weighted.jsonl", "--init", gorm, "--output",
          gprm, "--resume", *gtrain)
    decode = [*base, "--prompts", "gsm8k:heldout", *limit(g["prompts"]), "--max-new-tokens", g["new_tokens"]]
    gevaluate = ["05_evaluate.py", "metrics", "--rm", gref, "--max-length", L, "--extra-rm", f"ORM={gorm}",
                 "--extra-rm", f"SP-PRM={gprm}"]
    table4 = decode_table(pipeline, t, "table4", decode, gevaluate, "reward,accuracy,diversity,coherence", methods,
                          [("sp-prm", "SP-PRM", gprm), ("orm", "ORM", gorm)])
    text = tables_markdown(args, s, x, t, reference, independent, (table1, table3, table4), pipeline.costs())
    with open(f"{t}/results_tables.md", "w", encoding="utf-8") as f:
        f.write(text)
    print("\n" + text)


def tables_markdown(args, s, x, t, reference, independent, tables, costs):
    g = x["gsm8k"]
    W, K, C = s["cbs"]
    gacc = read_json(f"{t}/gsm8k_orm/eval.json"), read_json(f"{t}/gsm8k_reference/eval.json")
    lines = [f"Made by `python reproduce.py --scale {args.scale} --part tables --out {os.path.dirname(t)}`. Policy "
             f"SmolLM2-135M-Instruct; rewards normalised (`--reward-norm std`); ARGS k={s['args_k']}, "
             f"w={s['args_w']:g}; TBS W, K = {W}, {K}; CBS W, K, L = {W}, {K}, {C}; CARDS "
             f"`{' '.join(map(str, x['cards']))}`; BoN N = {', '.join(map(str, x['bon']))}. ± is the half-width "
             f"of the 95% bootstrap interval over prompts. Reward = the reference RM's score (`{reference}`, it "
             "guided no run; Table 4: the GSM8K reference); Reward (decoding RM) = the score of the RM that guided "
             "the row (the paper's reward column, C.2); Reward (ORM), (SP-PRM) = those RMs' views"
             + (f"; Reward (Independent) = `{independent}`, an RM that shaped nothing." if independent else "."), ""]
    titles = [f"Table 1 (HH-RLHF): {x['prompts'] or 'all'} held-out prompts, {x['new_tokens']} new tokens; Win rate "
              "against greedy judged by the reference RM (a proxy †)",
              f"Table 3 (AdvBench, \"Sure here's\" after each instruction): {x['prompts'] or 'all'} prompts, "
              f"{x['new_tokens']} new tokens, guided by the HH RMs",
              f"Table 4 (GSM8K): {g['prompts'] or 'all'} held-out problems (gsm8k:heldout), {g['new_tokens']} new "
              f"tokens; RMs trained on gsm8k-pairs:train (ORM {g['orm_pairs'] or 'all'} pairs, held-out accuracy "
              f"{gacc[0]['accuracy']:.3f}; reference {g['reference_pairs'] or 'all'} pairs, {g['reference_epochs']} "
              f"epoch{'s' if g['reference_epochs'] > 1 else ''}, {gacc[1]['accuracy']:.3f}); accuracy by exact match "
              "(no LLM judge offline)"]
    for name, title, files in zip(("table1", "table3", "table4"), titles, tables):
        with open(f"{t}/{name}.md", encoding="utf-8") as f:
            lines += [f"### {title}", "", f.read().strip(), "", "Paired differences over the same prompts "
                      "(reward: the reference RM's):", ""]
        for m in files:
            c = m.replace("_metrics_", "_compare_")
            if os.path.exists(c):
                d = read_json(c)
                cells = [f"{k} {fmt_ci(v['diff'], v['diff_ci95'], digits=4)}" for k, v in d["metrics"].items()
                         if k in ("reward", "reward_Independent", "asr", "asr_target_opening", "accuracy")]
                lines.append(f"- {read_json(d['a'])['label']} minus {read_json(d['b'])['label']}: "
                             + "; ".join(cells))
        lines.append("")
    stage_costs = {k: v for k, v in costs.items() if k.startswith(("table", "gsm8k"))}
    lines += [f"Cost of the part's stages: {sum(stage_costs.values()) / 60:.1f} min (the HH RMs it shares with "
              "`make reproduce` not counted).", ""]
    return "\n".join(lines) + "\n"


def specrej_experiment(args, s, pipeline, out, data, orm, reference, independent):
    """Best-of-N at each N and speculative rejection at the same N and each alpha, each guided by the ORM and by
    the SP-PRM (rewards normalised), on held-out prompts; reward by the reference and the independent RM
    against compute; the prefix consistency of both RMs on Best-of-N's largest sample set; the compute each
    method needs to reach the largest Best-of-N's reward. Writes results_specrej.md and two figures."""
    x = s["specrej"]
    stage = pipeline.stage
    os.makedirs(f"{out}/specrej", exist_ok=True)
    n_max = max(x["ns"])
    decode = ["04_decode.py", "--prompts", "hh-rlhf:heldout", *(["--limit", x["prompts"]] if x["prompts"] else []),
              "--policy", "smollm2-135m-instruct", "--max-new-tokens", x["new_tokens"], "--batch-size",
              s["batch_size"], "--reward-norm", s["reward_norm"], "--resume", *data]
    metrics = ["05_evaluate.py", "metrics", "--rm", reference, "--max-length", s["max_length"], "--metrics",
               "reward,length", *(["--extra-rm", f"Independent={independent}"] if independent else [])]
    runs = []  # (family, N, alpha, rm label, metrics file)
    for rm, rm_label in (("orm", "ORM"), ("sp-prm", "SP-PRM")):
        path = orm if rm == "orm" else f"{out}/sp-prm"
        settings = [("Best-of-N", n, None) for n in x["ns"]] + \
            [(f"specrej alpha={a:g}", n, a) for a in x["alphas"] for n in x["ns"]]
        for family, n, alpha in settings:
            tag = f"bon{n}" if alpha is None else f"specrej{n}_a{alpha:g}"
            gen, m = f"{out}/specrej/gen_{tag}_{rm}.jsonl", f"{out}/specrej/metrics_{tag}_{rm}.json"
            flags = ["--method", "bon", "--n", n] if alpha is None else \
                ["--method", "specrej", "--n", n, "--alpha", alpha, "--decision-every", x["decision_every"]]
            if alpha is None and n == n_max:
                flags.append("--save-candidates")
            stage(f"specrej-decode-{tag}-{rm}", gen, *decode, *flags, "--rm", path, "--output", gen)
            stage(f"specrej-eval-{tag}-{rm}", m, *metrics, "--generations", gen, "--output", m,
                  "--label", f"{family}, N={n} ({rm_label})")
            runs.append((family, n, alpha, rm_label, m))
    consistency = f"{out}/specrej/consistency.json"
    stage("specrej-consistency", consistency, "05_evaluate.py", "consistency", "--generations",
          f"{out}/specrej/gen_bon{n_max}_orm.jsonl", "--rm", f"SP-PRM={out}/sp-prm", "--rm", f"ORM={orm}",
          "--reference", reference, "--prefix-lengths", x["prefix_lengths"], "--alpha", x["alphas"][0],
          "--max-length", s["max_length"], "--output", consistency)
    for family, n, alpha, _, _ in runs:  # the ORM-rejector minus the SP-PRM-rejector, paired over prompts
        tag = f"bon{n}" if alpha is None else f"specrej{n}_a{alpha:g}"
        pipeline.run("05_evaluate.py", "compare", f"{out}/specrej/metrics_{tag}_orm.json",
                     f"{out}/specrej/metrics_{tag}_sp-prm.json", "--output", f"{out}/specrej/compare_{tag}.json")
    for rm in ("orm", "sp-prm"):  # every run against the largest Best-of-N guided by the same RM
        for family, n, alpha, _, m in runs:
            if m.endswith(f"_{rm}.json") and m != f"{out}/specrej/metrics_bon{n_max}_{rm}.json":
                pipeline.run("05_evaluate.py", "compare", m, f"{out}/specrej/metrics_bon{n_max}_{rm}.json", "--output",
                             m.replace("metrics_", "vs_bon_"))
    from common.figures import plot_consistency, plot_reward_vs_compute

    points = []
    for family, n, alpha, rm_label, m in runs:
        metric = read_json(m)
        c = metric["compute_per_response"]
        points.append({"family": family, "n": n, "alpha": alpha, "rm": rm_label, "file": m,
                       "compute": c["policy_tokens"] + c["rm_tokens"], "policy_tokens": c["policy_tokens"],
                       "rm_tokens": c["rm_tokens"], "seconds": c["seconds"], "reward_mean": metric["reward_mean"],
                       "reward_mean_ci95": metric["reward_mean_ci95"],
                       "independent": metric.get("reward_Independent_mean"),
                       "independent_ci95": metric.get("reward_Independent_mean_ci95")})
    from common.io import write_json

    write_json(f"{out}/specrej/points.json", points)  # the figure's input, for notebooks/figures.ipynb
    figures = [plot_reward_vs_compute(points, f"{out}/specrej"), plot_consistency(read_json(consistency),
                                                                                    f"{out}/specrej")]
    text = specrej_markdown(args, x, out, points, read_json(consistency), n_max, figures, pipeline.costs())
    with open(f"{out}/specrej/results_specrej.md", "w", encoding="utf-8") as f:
        f.write(text)
    print("\n" + text)


def specrej_markdown(args, x, out, points, consistency, n_max, figures, costs):
    lines = [f"Made by `python reproduce.py --scale {args.scale} --part specrej --out {out}`: "
             f"{consistency['n_prompts']} held-out prompts, {x['new_tokens']} new tokens, a decision every "
             f"{x['decision_every']} tokens, rewards normalised. Reward = the reference RM's score; Independent = "
             "an RM that shaped nothing. Compute = policy + RM tokens computed per reply. Every interval is a 95% "
             "bootstrap interval over prompts.", "",
             "| run | guided by | compute | reward (reference) | reward (independent) | reward - Best-of-"
             f"{n_max} (same RM, paired) |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["rm"], p["family"], p["n"])):
        vs = p["file"].replace("metrics_", "vs_bon_")
        d = read_json(vs)["metrics"].get("reward") if os.path.exists(vs) else None
        lines.append(f"| {p['family']}, N={p['n']} | {p['rm']} | {p['compute']:.0f} | "
                     f"{fmt_ci(p['reward_mean'], p['reward_mean_ci95'], digits=4)} | "
                     + (fmt_ci(p["independent"], p["independent_ci95"], digits=4) if p["independent"] is not None
                        else "-") + " | "
                     + (fmt_ci(d["diff"], d["diff_ci95"], digits=4) + f": {reach(d['diff_ci95'])}" if d else "-")
                     + " |")
    lines += ["", f"Compute needed to reach Best-of-{n_max}'s reward (the cheapest run whose paired difference "
                  f"from Best-of-{n_max} guided by the same RM is not below zero):", ""]
    for rm in ("ORM", "SP-PRM"):
        ok = [p for p in points if p["rm"] == rm and (p["n"] == n_max and p["alpha"] is None or (
            os.path.exists(p["file"].replace("metrics_", "vs_bon_")) and reach(read_json(
                p["file"].replace("metrics_", "vs_bon_"))["metrics"]["reward"]["diff_ci95"]) != "below"))]
        best = min(ok, key=lambda p: p["compute"])
        full = next(p for p in points if p["rm"] == rm and p["n"] == n_max and p["alpha"] is None)
        lines.append(f"- rejector {rm}: {best['family']}, N={best['n']}: {best['compute']:.0f} tokens per reply, "
                     f"{best['compute'] / full['compute']:.2f}x Best-of-{n_max}'s {full['compute']:.0f}.")
    lines += ["", "ORM-rejector minus SP-PRM-rejector reward (reference RM), paired over prompts:", ""]
    for p in sorted((p for p in points if p["rm"] == "ORM"), key=lambda p: (p["family"], p["n"])):
        tag = f"bon{p['n']}" if p["alpha"] is None else f"specrej{p['n']}_a{p['alpha']:g}"
        d = read_json(f"{out}/specrej/compare_{tag}.json")["metrics"]["reward"]
        lines.append(f"- {p['family']}, N={p['n']}: {fmt_ci(d['diff'], d['diff_ci95'], digits=4)}: "
                     f"{higher(d['diff_ci95'], 'the ORM-rejector', 'the SP-PRM-rejector')}")
    lines += ["", f"Prefix consistency on Best-of-{n_max}'s samples (Kendall's tau with the reference's scores of "
                  "the complete samples; the share of prompts whose best sample survives one rejection of "
                  f"alpha = {consistency['alpha']:g}):", "",
              "| RM | t | Kendall's tau | best survives | difference from the first RM (tau; survives) |",
              "|---|---|---|---|---|"]
    for rm, entry in consistency["rms"].items():
        for c in entry["curve"]:
            diff = (f"{fmt_ci(c['kendall_tau_diff'], c['kendall_tau_diff_ci95'])}; "
                    f"{fmt_ci(c['best_survives_diff'], c['best_survives_diff_ci95'])}") if "diff_vs" in c else "-"
            lines.append(f"| {rm} | {c['t']} | {fmt_ci(c['kendall_tau'], c['kendall_tau_ci95'])} | "
                         f"{fmt_ci(c['best_survives'], c['best_survives_ci95'])} | {diff} |")
    stage_costs = {k: v for k, v in costs.items() if k.startswith("specrej")}
    lines += ["", f"Cost of the part's stages: {sum(stage_costs.values()) / 60:.1f} min.", "",
              "Figures: " + ", ".join(os.path.relpath(f, out) for f in figures)]
    return "\n".join(lines) + "\n"


def higher(ci, a, b):
    """Which run of a paired difference A - B is higher, by its 95% interval."""
    return f"{a} higher" if ci[0] > 0 else f"{b} higher" if ci[1] < 0 else "cannot be told apart"


def reach(ci):
    """Whether a paired difference from the reference run is below it, above it, or cannot be told apart."""
    return "below" if ci[1] < 0 else "above" if ci[0] > 0 else "cannot be told apart"


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
    make = {"demo": "make demo", "cpu": "make reproduce"}.get(args.scale, f"make reproduce SCALE={args.scale}")
    lines = [f"Made by `python reproduce.py --scale {args.scale} --out {out}` (`{make}`). Every interval is a 95% "
             "interval: percentile bootstrap over pairs or prompts (10,000 resamples), or a t-interval over "
             "training seeds.", ""]
    # RMs
    lines += ["### Reward models: held-out accuracy on hh-rlhf:heldout", "",
              "| RM | held-out accuracy | role |", "|---|---|---|"]
    accs = []
    for seed in s["seeds"]:
        e = read_json(f"{out}/orm_s{seed}/eval.json")
        accs.append(e["accuracy"])
        role = "converted into the PRM" if seed == s["seeds"][0] else (
            "reference" if candidates.get(ref_name) == f"{out}/orm_s{seed}" else "reference candidate")
        lines.append(f"| ORM, MiniLM-L6, seed {seed} | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} (n={e['n']}) "
                     f"| {role} |")
    for name, path in candidates.items():
        if not path.startswith(f"{out}/orm_s"):
            e = read_json(f"{path}/eval.json")
            lines.append(f"| {name} | {fmt_ci(e['accuracy'], e['accuracy_ci95'])} | "
                         + ("reference" if name == ref_name else "reference candidate") + " |")
    if len(accs) > 1:
        mean, ci = seed_interval(accs)
        lines.append(f"| ORM, mean over seeds {', '.join(map(str, s['seeds']))} | {fmt_ci(mean, ci)} (t over seeds) "
                     "| |")
    for name, label in (VARIANTS[v] for v in s["variants"]):
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
              "Reward = the reference RM's score (it guided none of these runs, but its scores weighted the "
              "SP-PRM's training pairs); Reward (Independent) = an RM that shaped nothing here"
              + (f" (`{independent}`)" if independent else "")
              + "; Win rate = (wins + ties / 2) / prompts against greedy "
              f"judged by the reference RM (a proxy †). ARGS k={s['args_k']}, w={s['args_w']:g}; CBS W, K, L = "
              f"{', '.join(map(str, s['cbs']))}; BoN N={s['bon']} (the methods run: "
              f"{', '.join(METHODS[m] for m in s['methods'])}).", "", table, "",
              "Paired SP-PRM-guided minus ORM-guided, over the same prompts:", "",
              "| method | reward (reference RM) | reward (independent RM) | reward (ORM's own view) "
              "| reward (SP-PRM's own view) |", "|---|---|---|---|---|"]
    compares = {m: read_json(f"{out}/compare_{m}.json") for m in s["methods"]}
    for method in s["methods"]:
        label = METHODS[method]
        d = compares[method]["metrics"]
        cells = []
        for key in ("reward", "reward_Independent", "reward_ORM", "reward_SP-PRM"):
            x = d.get(key)
            cells.append(fmt_ci(x["diff"], x["diff_ci95"], digits=4) if x else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "ARGS reward (reference RM) against w:", ""]
    for name, points in curve["rms"].items():
        lines.append(f"- guided by {name}: " + ", ".join(
            f"w={pt['w']:g}: {fmt_ci(pt['reward_mean'], pt['reward_mean_ci95'], digits=4)}"
            if pt.get("reward_mean_ci95") else f"w={pt['w']:g}: {pt['reward_mean']:.4f}" for pt in points))
    # claims
    orm_growth = rms["ORM"]["growth"]
    short = [c for c in rms["ORM"]["curve"] if c["t"] <= 10]
    ablation_short = [c for c in rms["Ablation"]["curve"] if c["t"] <= 10] if "Ablation" in rms else []
    lines += ["", "### The paper's claims at this size", "",
              f"- Observation 1, ORM agreement grows with t: AR_RM-SC(t={orm_growth['to_t']}) - AR_RM-SC(t="
              f"{orm_growth['from_t']}) = {fmt_ci(orm_growth['diff'], orm_growth['diff_ci95'])}: "
              f"{verdict(orm_growth['diff_ci95'])}."]
    for c in short:
        lines.append(f"- Figure 5, SP-PRM above the ORM at t={c['t']}: SP-PRM - ORM = "
                     f"{fmt_ci(-c['ar_rm_sc_diff'], [-c['ar_rm_sc_diff_ci95'][1], -c['ar_rm_sc_diff_ci95'][0]])}: "
                     f"{verdict(c['ar_rm_sc_diff_ci95'], -1)}.")
    for method, label in ((m, METHODS[m]) for m in s["methods"]):
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
