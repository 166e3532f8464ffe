"""The whole SP-PRM pipeline, end to end, by running the numbered scripts as a user would.

    python demo.py --scale small --out runs/demo        (make demo)
    python demo.py --scale full  --out runs/demo-full   (make demo SCALE=full: all data, paper settings)

1. ORM: MiniLM-L6 on hh-rlhf:train (01 --truncation full, 03)
2. SP-PRM: SST partial pairs (01 --truncation sst --K 5), weights with the ORM as reference (02 entropy),
   training from the ORM (03); the ablation with uniform weights
3. decoding held-out HH prompts with SmolLM2-135M-Instruct: greedy (base), ARGS-greedy, CBS and Best-of-N,
   each guided by the ORM and by the SP-PRM
4. evaluation: reward by the ORM and by the SP-PRM, diversity, coherence, RM-judge win-tie against greedy,
   agreement curves of ORM, SP-PRM and ablation
5. the results table (paper Table 1 layout) and the figures as PNG
A stage whose output (and manifest) exists is skipped; --redo STAGE[,STAGE] or --redo all reruns.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

SCALES = {
    # Sized for a 2-core CPU: about 10 minutes after setup.
    "small": dict(train_pairs=600, sst_pairs=200, max_length=128, eval_pairs=100, prompts=4, new_tokens=32,
                  args_k=5, cbs=(2, 2, 8), bon=4, prefix_lengths="5,10,20,50", batch_size=8),
    # The paper's settings (GPU-sized).
    "full": dict(train_pairs=None, sst_pairs=None, max_length=512, eval_pairs=None, prompts=None, new_tokens=128,
                 args_k=30, cbs=(8, 8, 30), bon=16, prefix_lengths="5,10,15,20,30,40,50", batch_size=8),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--redo", default="", help="stages to rerun: comma list of names printed below, or all")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    s = SCALES[args.scale]
    out = args.out
    os.makedirs(out, exist_ok=True)
    redo = set(args.redo.split(",")) if args.redo else set()
    py = sys.executable
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    limit = lambda n: ["--limit", str(n)] if n else []  # noqa: E731
    t_start = time.time()
    timings = []

    def stage(name, output, *cmd):
        done = os.path.exists(output) and (os.path.exists(output + ".manifest.json") or
                                           os.path.exists(os.path.join(output, "manifest.json")))
        if done and name not in redo and "all" not in redo:
            print(f"[skip] {name}: {output} exists", flush=True)
            return
        print(f"\n[run] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        if subprocess.run([py, *cmd]).returncode != 0:
            sys.exit(f"demo: stage {name} failed (its message is above); fix it and rerun: finished stages are kept")
        timings.append((name, time.time() - t0))

    L = str(s["max_length"])
    # 1. ORM
    stage("orm-data", f"{out}/orm_pairs.jsonl", "01_build_partial.py", "--input", "hh-rlhf:train", "--output",
          f"{out}/orm_pairs.jsonl", "--tokenizer", "minilm-l6", "--truncation", "full", *limit(s["train_pairs"]), *data)
    stage("orm", f"{out}/orm", "03_train.py", "--input", f"{out}/orm_pairs.jsonl", "--init", "minilm-l6",
          "--output", f"{out}/orm", "--max-length", L, "--eval", "hh-rlhf:heldout", *limit_eval(s), *data)
    # 2. SP-PRM and the ablation
    stage("sst", f"{out}/sst.jsonl", "01_build_partial.py", "--input", "hh-rlhf:train", "--output",
          f"{out}/sst.jsonl", "--tokenizer", "minilm-l6", "--truncation", "sst", "--K", "5",
          *limit(s["sst_pairs"]), *data)
    for scheme in ("entropy", "uniform"):
        cache = f"{out}/weighted_{scheme}.jsonl.scores.jsonl"
        if scheme == "uniform" and not os.path.exists(cache) and os.path.exists(f"{out}/weighted_entropy.jsonl"):
            shutil.copy(f"{out}/weighted_entropy.jsonl.scores.jsonl", cache)  # same reference scores: reuse
        stage(f"weight-{scheme}", f"{out}/weighted_{scheme}.jsonl", "02_weight.py", "--input", f"{out}/sst.jsonl",
              "--output", f"{out}/weighted_{scheme}.jsonl", "--ref-rm", f"{out}/orm", "--scheme", scheme,
              "--max-length", L, "--resume")
    for scheme, name in (("entropy", "prm"), ("uniform", "ablation")):
        stage(name, f"{out}/{name}", "03_train.py", "--input", f"{out}/weighted_{scheme}.jsonl", "--init",
              f"{out}/orm", "--output", f"{out}/{name}", "--max-length", L, "--eval", "hh-rlhf:heldout",
              *limit_eval(s), *data)
    # 3. decoding
    W, K, C = s["cbs"]
    decode = ["04_decode.py", "--prompts", "hh-rlhf:heldout", *limit(s["prompts"]), "--policy",
              "smollm2-135m-instruct", "--max-new-tokens", str(s["new_tokens"]), "--batch-size",
              str(s["batch_size"]), "--resume", *data]
    stage("decode-greedy", f"{out}/gen_greedy.jsonl", *decode, "--method", "greedy", "--output",
          f"{out}/gen_greedy.jsonl")
    methods = {"argsg": ["--k", str(s["args_k"]), "--w", "1.5"],
               "cbs": ["--beam", str(W), "--successors", str(K), "--chunk", str(C)],
               "bon": ["--n", str(s["bon"])]}
    runs = []
    for method, flags in methods.items():
        for rm in ("orm", "prm"):
            path = f"{out}/gen_{method}_{rm}.jsonl"
            stage(f"decode-{method}-{rm}", path, *decode, "--method", method, *flags, "--rm", f"{out}/{rm}",
                  "--output", path)
            runs.append((method, rm, path))
    # 4. evaluation
    labels = {"argsg": "ARGS", "cbs": "CBS", "bon": "BoN"}
    metric_files = []
    base_metrics = ["metrics", "--rm", f"{out}/orm"]
    stage("eval-greedy", f"{out}/metrics_greedy.json", "05_evaluate.py", *base_metrics,
          "--metrics", "reward,diversity,coherence,length", "--generations",
          f"{out}/gen_greedy.jsonl", "--output", f"{out}/metrics_greedy.json", "--label", "Greedy (base)")
    metric_files.append(f"{out}/metrics_greedy.json")
    for method, rm, path in runs:
        label = f"{labels[method]}" + (" +Ours (SP-PRM)" if rm == "prm" else " (ORM)")
        m = f"{out}/metrics_{method}_{rm}.json"
        stage(f"eval-{method}-{rm}", m, "05_evaluate.py", *base_metrics, "--metrics",
              "reward,diversity,coherence,length,winrate", "--generations", path, "--output", m, "--label", label,
              "--baseline", f"{out}/gen_greedy.jsonl", "--judge-rm", f"{out}/orm")
        metric_files.append(m)
    # the same generations scored by the SP-PRM as a second yardstick
    for method, rm, path in runs:
        m = f"{out}/metrics_{method}_{rm}.by_prm.json"
        stage(f"eval-{method}-{rm}-by-prm", m, "05_evaluate.py", "metrics", "--metrics", "reward",
              "--rm", f"{out}/prm", "--generations", path, "--output", m,
              "--label", f"{labels[method]} {'+Ours' if rm == 'prm' else '(ORM)'} [reward by SP-PRM]")
    stage("agreement", f"{out}/agreement.json", "05_evaluate.py", "agreement", "--pairs", "hh-rlhf:heldout",
          *limit(s["eval_pairs"]), "--rm", f"ORM={out}/orm", "--rm", f"SP-PRM={out}/prm", "--rm",
          f"Ablation={out}/ablation", "--prefix-lengths", s["prefix_lengths"], "--max-length", L,
          "--output", f"{out}/agreement.json", *data)
    # 5. table and figures
    print("\n" + "=" * 100)
    subprocess.run([py, "05_evaluate.py", "table", *metric_files, "--output", f"{out}/table.md"], check=True)
    by_prm = [f"{out}/metrics_{m}_{r}.by_prm.json" for m, r, _ in runs]
    subprocess.run([py, "05_evaluate.py", "table", *by_prm, "--output", f"{out}/table_reward_by_prm.md"],
                   check=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common.figures import load_agreement, plot_agreement

    agreement = load_agreement(f"{out}/agreement.json")
    print("\nAR_RM-SC(t) on hh-rlhf:heldout:")
    for name, rm in agreement["rms"].items():
        print(f"  {name:10s} " + "  ".join(f"t={c['t']}: {c['ar_rm_sc']:.3f}" for c in rm["curve"]))
    for path in plot_agreement(agreement, out):
        print(f"figure: {path}")
    total = time.time() - t_start
    print(f"\ndemo finished in {total / 60:.1f} min ({args.scale} scale); stages run: "
          + ", ".join(f"{n} {t:.0f}s" for n, t in timings))


def limit_eval(s):
    return ["--eval-limit", str(s["eval_pairs"])] if s["eval_pairs"] else []


if __name__ == "__main__":
    main()
