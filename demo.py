"""The whole SP-PRM pipeline, end to end, by running the numbered scripts as a user would.

    python demo.py --scale small --out runs/demo        (make demo)
    python demo.py --scale full  --out runs/demo-full   (make demo SCALE=full: all data, paper settings)

1. RMs: a reference RM and the ORM to be converted, both MiniLM-L6 on hh-rlhf:train (01 --truncation full,
   03); the reference sees three times the pairs (at the small scale their held-out accuracies, printed with
   intervals, cannot be told apart). It is never the model being trained: 03 refuses weights computed by
   the model it trains.
2. SP-PRM: SST partial pairs (01 --truncation sst --K 5), entropy weights from the reference (02), training
   from the ORM (03); at full scale also the ablation with uniform weights
3. decoding held-out HH prompts with SmolLM2-135M-Instruct: greedy (base), ARGS-greedy, Best-of-N (and CBS at full scale),
   each guided by the ORM and by the SP-PRM, with normalised rewards (--reward-norm std), so one w means the
   same for both RMs and guidance acts
4. evaluation with the reference RM as the yardstick (it guided none of the runs): reward and RM-judge
   win-tie against greedy, the guiding RMs' own scores as extra columns, diversity, coherence, each with a
   95% bootstrap interval over prompts; paired SP-PRM minus ORM differences; agreement curves with bands
5. the results table (paper Table 1 layout) and the figures as PNG
A stage whose output (and manifest) exists is skipped; --redo STAGE[,STAGE] or --redo all reruns.
A stage whose input was remade after its output runs again; an output made with other settings is refused
(--redo it, or use another --out).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common.pipeline import Pipeline

SCALES = {
    # Sized for a 2-core CPU: about 8 minutes with setup (CBS and the w sweep at full scale, or --sweep). ARGS's w is in std units of the RM's scores
    # (--reward-norm std): the demo RMs' single-token score differences are a small fraction of a std, so
    # guidance acts from about w = 5 (the reward-vs-w figure); the paper's w = 1.5 suits its RMs' raw scale.
    "small": dict(ref_pairs=320, orm_pairs=128, sst_pairs=48, ablation=False, max_length=128, eval_pairs=64,
                  prompts=8, new_tokens=24, methods=("argsg", "bon"), args_k=5, args_w=10.0, cbs=(2, 2, 8), bon=4,
                  prefix_lengths="5,10,20,50", batch_size=8, sweep_w=()),
    # The paper's settings (GPU-sized).
    "full": dict(ref_pairs=None, orm_pairs=None, sst_pairs=None, ablation=True, max_length=512, eval_pairs=None,
                 prompts=None, new_tokens=128, methods=("argsg", "cbs", "bon"), args_k=30, args_w=1.5, cbs=(8, 8, 30),
                 bon=16,
                 prefix_lengths="5,10,15,20,30,40,50", batch_size=8, sweep_w=(0.5, 1.0, 3.0, 5.0, 10.0)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--redo", default="", help="stages to rerun: comma list of names printed below, or all")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sweep", default=None,
                   help="ARGS weights w to add to the reward-vs-w curve, e.g. 1.5,5 (each costs two decodes)")
    args = p.parse_args()
    s = dict(SCALES[args.scale])
    if args.sweep:
        s["sweep_w"] = tuple(float(w) for w in args.sweep.split(",") if w.strip())
    out = args.out
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    limit = lambda n: ["--limit", str(n)] if n else []  # noqa: E731
    pipeline = Pipeline("demo", args.redo, commands_path=f"{out}/stage_commands.json")
    stage = pipeline.stage

    L = str(s["max_length"])
    train = ["--max-length", L, "--eval", "hh-rlhf:heldout", *limit_eval(s), *data]
    # 1. the reference RM and the ORM
    stage("pairs", f"{out}/pairs.jsonl", "01_build_partial.py", "--input", "hh-rlhf:train", "--output",
          f"{out}/pairs.jsonl", "--tokenizer", "minilm-l6", "--truncation", "full", *limit(s["ref_pairs"]), *data)
    stage("reference", f"{out}/reference", "03_train.py", "--input", f"{out}/pairs.jsonl", "--init", "minilm-l6",
          "--output", f"{out}/reference", *train)
    stage("orm", f"{out}/orm", "03_train.py", "--input", f"{out}/pairs.jsonl", *limit(s["orm_pairs"]), "--init",
          "minilm-l6", "--output", f"{out}/orm", *train)
    # 2. SP-PRM (and the ablation)
    stage("sst", f"{out}/sst.jsonl", "01_build_partial.py", "--input", "hh-rlhf:train", "--output",
          f"{out}/sst.jsonl", "--tokenizer", "minilm-l6", "--truncation", "sst", "--K", "5",
          *limit(s["sst_pairs"]), *data)
    variants = [("entropy", "prm")] + ([("uniform", "ablation")] if s["ablation"] else [])
    for scheme, name in variants:
        cache = f"{out}/weighted_{scheme}.jsonl.scores.jsonl"
        if scheme != "entropy" and not os.path.exists(cache) and os.path.exists(f"{out}/weighted_entropy.jsonl"):
            shutil.copy(f"{out}/weighted_entropy.jsonl.scores.jsonl", cache)  # same reference: keyed reuse
        stage(f"weight-{scheme}", f"{out}/weighted_{scheme}.jsonl", "02_weight.py", "--input", f"{out}/sst.jsonl",
              "--output", f"{out}/weighted_{scheme}.jsonl", "--ref-rm", f"{out}/reference", "--scheme", scheme,
              "--max-length", L, "--resume")
        stage(name, f"{out}/{name}", "03_train.py", "--input", f"{out}/weighted_{scheme}.jsonl", "--init",
              f"{out}/orm", "--output", f"{out}/{name}", *train)
    # 3. decoding
    W, K, C = s["cbs"]
    decode = ["04_decode.py", "--prompts", "hh-rlhf:heldout", *limit(s["prompts"]), "--policy",
              "smollm2-135m-instruct", "--max-new-tokens", str(s["new_tokens"]), "--batch-size",
              str(s["batch_size"]), "--resume", *data]
    stage("decode-greedy", f"{out}/gen_greedy.jsonl", *decode, "--method", "greedy", "--output",
          f"{out}/gen_greedy.jsonl")
    flags = {"argsg": ["--k", str(s["args_k"]), "--w", str(s["args_w"])],
             "cbs": ["--beam", str(W), "--successors", str(K), "--chunk", str(C)],
             "bon": ["--n", str(s["bon"])]}
    methods = {m: flags[m] for m in s["methods"]}
    runs = []
    for method, flags in methods.items():
        for rm in ("orm", "prm"):
            path = f"{out}/gen_{method}_{rm}.jsonl"
            stage(f"decode-{method}-{rm}", path, *decode, "--method", method, *flags, "--rm", f"{out}/{rm}",
                  "--reward-norm", "std", "--output", path)
            runs.append((method, rm, path))
    # 4. evaluation: the reference RM is the yardstick; the guiding RMs' own scores are extra columns
    labels = {"argsg": "ARGS", "cbs": "CBS", "bon": "BoN"}
    metrics = ["05_evaluate.py", "metrics", "--rm", f"{out}/reference", "--extra-rm", f"ORM={out}/orm",
               "--extra-rm", f"SP-PRM={out}/prm", "--max-length", L]
    metric_files = [f"{out}/metrics_greedy.json"]
    stage("eval-greedy", metric_files[0], *metrics, "--metrics", "reward,diversity,coherence,length",
          "--generations", f"{out}/gen_greedy.jsonl", "--output", metric_files[0], "--label", "Greedy (base)")
    for method, rm, path in runs:
        label = f"{labels[method]}" + (" +Ours (SP-PRM)" if rm == "prm" else " (ORM)")
        m = f"{out}/metrics_{method}_{rm}.json"
        stage(f"eval-{method}-{rm}", m, *metrics, "--metrics", "reward,diversity,coherence,length,winrate",
              "--generations", path, "--output", m, "--label", label, "--baseline", f"{out}/gen_greedy.jsonl",
              "--judge-rm", f"{out}/reference")
        metric_files.append(m)
    # the ARGS reward-vs-w curve: w = 0 is greedy, w = 1.5 the run above, the rest decoded here
    sweep = [(name, 0.0, metric_files[0]) for name in ("ORM", "SP-PRM")]
    sweep += [("ORM" if rm == "orm" else "SP-PRM", s["args_w"], f"{out}/metrics_argsg_{rm}.json")
              for rm in ("orm", "prm")]
    for w in s["sweep_w"]:
        for rm in ("orm", "prm"):
            path, m = f"{out}/gen_argsg_{rm}_w{w:g}.jsonl", f"{out}/sweep_argsg_{rm}_w{w:g}.json"
            stage(f"decode-argsg-{rm}-w{w:g}", path, *decode, "--method", "argsg", "--k", str(s["args_k"]),
                  "--w", str(w), "--rm", f"{out}/{rm}", "--reward-norm", "std", "--output", path)
            stage(f"eval-argsg-{rm}-w{w:g}", m, *metrics, "--metrics", "reward", "--generations", path,
                  "--output", m, "--label", f"ARGS w={w:g} ({rm})")
            sweep.append(("ORM" if rm == "orm" else "SP-PRM", w, m))
    rms = [f"Reference={out}/reference", f"ORM={out}/orm", f"SP-PRM={out}/prm"]
    rms += [f"Ablation={out}/ablation"] if s["ablation"] else []
    stage("agreement", f"{out}/agreement.json", "05_evaluate.py", "agreement", "--pairs", "hh-rlhf:heldout",
          *limit(s["eval_pairs"]), *sum((["--rm", r] for r in rms[1:] + rms[:1]), []),
          "--prefix-lengths", s["prefix_lengths"], "--max-length", L, "--output", f"{out}/agreement.json", *data)
    # 5. table, paired comparisons and figures
    print("\n" + "=" * 100)
    subprocess.run([py, "05_evaluate.py", "table", *metric_files, "--output", f"{out}/table.md"], check=True)
    for method in methods:
        print(f"\n{labels[method]}: SP-PRM-guided minus ORM-guided, paired over prompts (95% interval):")
        subprocess.run([py, "05_evaluate.py", "compare", f"{out}/metrics_{method}_prm.json",
                        f"{out}/metrics_{method}_orm.json", "--output", f"{out}/compare_{method}.json"], check=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common.io import read_jsonl

    greedy = {r["id"]: r["response"] for _, r in read_jsonl(f"{out}/gen_greedy.jsonl")}
    for rm in ("orm", "prm"):
        rows = [r for _, r in read_jsonl(f"{out}/gen_argsg_{rm}.jsonl")]
        differ = sum(r["response"] != greedy.get(r["id"]) for r in rows)
        print(f"ARGS guided by {rm.upper()} differs from greedy on {differ} of {len(rows)} prompts")
    from common.figures import load_agreement, plot_agreement, plot_reward_vs_w, reward_vs_w

    agreement = load_agreement(f"{out}/agreement.json")
    print("\nAR_RM-SC(t) on hh-rlhf:heldout (95% interval over pairs):")
    for name, rm in agreement["rms"].items():
        print(f"  {name:10s} " + "  ".join(f"t={c['t']}: {c['ar_rm_sc']:.3f} [{c['ar_rm_sc_ci95'][0]:.3f}, "
                                           f"{c['ar_rm_sc_ci95'][1]:.3f}]" for c in rm["curve"]))
    for name in ("reference", "orm", "prm"):
        with open(f"{out}/{name}/eval.json") as f:
            e = json.load(f)
        print(f"held-out accuracy of {name}: {e['accuracy']:.3f} [{e['accuracy_ci95'][0]:.3f}, "
              f"{e['accuracy_ci95'][1]:.3f}] on {e['n']} pairs")
    sweep = reward_vs_w(sweep)
    with open(f"{out}/args_sweep.json", "w") as f:
        json.dump(sweep, f, indent=2)
    print("\nARGS reward (by the reference RM) vs w, normalised rewards:")
    for name, points in sweep["rms"].items():
        print(f"  guided by {name:7s} " + "  ".join(f"w={p['w']:g}: {p['reward_mean']:.3f}" for p in points))
    for path in plot_agreement(agreement, out) + [plot_reward_vs_w(sweep, out)]:
        print(f"figure: {path}")
    total = time.time() - pipeline.started
    print(f"\ndemo finished in {total / 60:.1f} min ({args.scale} scale); stages run: {pipeline.summary()}")


def limit_eval(s):
    return ["--eval-limit", str(s["eval_pairs"])] if s["eval_pairs"] else []


if __name__ == "__main__":
    main()
