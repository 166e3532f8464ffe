"""The figures and tables of a run: agreement AR_RM-SC(t) and reward gap Delta_r(t) per RM (the paper's), the
paired SP-PRM-minus-ORM (and minus ablation) reward differences per method, ARGS reward against w, and Best-of-N
against speculative rejection (reward against compute, prefix consistency). The notebooks call these on a run
folder of reproduce.py: make demo's, make reproduce's, and the tables/ and specrej/ folders that make tables and
make specrej add to it.

    python -m common.figures docs/figures    redraws the figures of docs/ from the numbers in docs/figures/data/
"""
import glob
import json
import os
import sys

# the order of the methods in a table: reproduce.py's tags and the labels of its metric files
METHOD_TAGS = ("greedy", "argsg", "tbs", "cbs", "cards", "bon", "specrej")
METHOD_LABELS = ("Greedy", "ARGS", "TBS", "CBS", "CARDS", "BoN", "Best-of-N", "specrej")
# the folders and file names reproduce.py writes each table under: (title, folder under the run, prefix)
TABLES = (("Table 1 (HH-RLHF): the run's decoding", "", ""),
          ("Table 1 (HH-RLHF), every method and +Ablation row (make tables)", "tables", "table1_"),
          ("Table 3 (AdvBench, \"Sure here's\" after each instruction; make tables)", "tables", "table3_"),
          ("Table 4 (GSM8K, RMs of its own; make tables)", "tables", "table4_"),
          ("Table 5 (HH-RLHF, SST against TLT at the same size; make table5)", "table5", "table5_"),
          ("Best-of-N against speculative rejection (make specrej)", "specrej", ""))
CHANCE = 0.5  # the agreement rate of an RM that scores at random


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_agreement(path):
    return read_json(path)


def _order(label):
    return next((i for i, m in enumerate(METHOD_LABELS) if label.startswith(m)), len(METHOD_LABELS))


def metric_files(folder, prefix=""):
    """The metric files `05_evaluate.py metrics` wrote into `folder` as `<prefix>metrics_*.json`, greedy first, then
    by method; never their manifests (`*.json.manifest.json`) or per-row files."""
    pattern = os.path.join(folder, f"{prefix}metrics_*.json")
    paths = [p for p in glob.glob(pattern) if not p.endswith(".manifest.json")]

    def order(path):
        tag = os.path.basename(path)[len(prefix) + len("metrics_"):]
        return next((i for i, m in enumerate(METHOD_TAGS) if tag.startswith(m)), len(METHOD_TAGS)), tag
    return sorted(paths, key=order)


def run_folder(run_dir, sub):
    """RUN/sub, or RUN itself when RUN is that folder (a notebook pointed at runs/reproduce/tables)."""
    if sub and os.path.basename(os.path.normpath(run_dir)) == sub:
        return run_dir
    return os.path.join(run_dir, sub) if sub else run_dir


def run_tables(run_dir):
    """[(title, [metric dicts])] of every table a run folder holds, in the paper's order: the run's Table 1 (make
    demo, make reproduce: RUN/metrics_*.json), Table 1 with every method and Tables 3 and 4 (make tables:
    RUN/tables/table<N>_metrics_*.json), Table 5 (make table5: RUN/table5/table5_metrics_*.json), Best-of-N against speculative rejection (make specrej:
    RUN/specrej/metrics_*.json). A table the run does not have is left out."""
    out = []
    for title, sub, prefix in TABLES:
        folder = run_folder(run_dir, sub)
        if sub == "" and os.path.basename(os.path.normpath(run_dir)) in ("tables", "specrej", "table5"):
            continue  # the folder of another part: its files carry that part's prefix or are listed below
        files = metric_files(folder, prefix)
        if files:
            out.append((title, [read_json(p) for p in files]))
    return out


LEADS = ("SP-PRM", "SST")  # the run each comparison of a table is taken from: SP-PRM (Tables 1, 3, 4), SST (Table 5)


def paired_differences(run_dir, metrics=("reward", "reward_Independent"), tables=None):
    """Every SP-PRM-guided minus other-guided reward difference of a run, paired over prompts (the compare files of
    05_evaluate.py): RUN/compare_<method>.json (SP-PRM minus ORM), RUN/tables/table<N>_compare_*.json (SP-PRM
    minus ORM and minus the ablation, make tables) and RUN/table5/table5_compare_*.json (SST minus TLT, make
    table5); `tables`: only those whose file prefix is named (e.g. ("table5",)). One record per difference and
    yardstick: {"table", "method", "against", "yardstick", "diff", "ci95", "n"}, in table order."""
    records = []
    for title, sub, prefix in TABLES[:5]:
        if tables is not None and prefix.rstrip("_") not in tables:
            continue
        folder = run_folder(run_dir, sub)
        for path in sorted(glob.glob(os.path.join(folder, f"{prefix}compare_*.json"))):
            if path.endswith(".manifest.json"):
                continue
            c = read_json(path)
            a, b = (read_json(os.path.join(folder, os.path.basename(c[k]))).get("label") or "" for k in ("a", "b"))
            method, guide_a = split_label(a)
            _, guide_b = split_label(b)
            if guide_a not in LEADS:  # reproduce.py compares the SP-PRM- (SST-) guided run with the others
                continue
            for key in metrics:
                d = c["metrics"].get(key)
                if d:
                    records.append({"table": title.split(" (")[0] + (f" (make {sub})" if sub else ""),
                                    "method": method, "lead": guide_a, "against": guide_b,
                                    "yardstick": "reference" if key == "reward" else key[len("reward_"):].lower(),
                                    "diff": d["diff"], "ci95": d["diff_ci95"], "n": c.get("n")})
    records.sort(key=lambda r: (r["table"], _order(r["method"]), r["method"]))
    return records


def split_label(label):
    """("ARGS", "SP-PRM") of a metric file's label "ARGS (SP-PRM)"."""
    method, _, guide = label.rpartition(" (")
    return (method, guide.rstrip(")")) if method else (label, "")


def plot_paired_differences(records, out_dir, name="paired_differences.png", title=None):
    """SP-PRM-guided minus ORM-guided (and minus ablation-guided) reward, paired over prompts, per method with its
    95% bootstrap interval; one panel per table. Colour: the run it is compared with; marker: the yardstick RM.
    A difference whose interval holds zero cannot be told apart from none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = list(dict.fromkeys(r["table"] for r in records))
    series = list(dict.fromkeys((r["against"], r["yardstick"]) for r in records))
    colours = {"ORM": "tab:blue", "Ablation": "tab:green", "TLT": "tab:orange"}
    markers = {"reference": "o", "independent": "s"}
    heights = [len(dict.fromkeys(r["method"] for r in records if r["table"] == t)) + 1 for t in tables]
    height = 1.2 + 0.4 * sum(heights)  # inches
    fig, axes = plt.subplots(len(tables), 1, figsize=(7, height), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    step = 0.7 / max(len(series), 1)
    for ax, table in zip(axes[:, 0], tables):
        rows = [r for r in records if r["table"] == table]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for k, (against, yardstick) in enumerate(series):
            pts = [r for r in rows if (r["against"], r["yardstick"]) == (against, yardstick)]
            if not pts:
                continue
            y = [methods.index(r["method"]) + (k - (len(series) - 1) / 2) * step for r in pts]
            x = [r["diff"] for r in pts]
            err = [[r["diff"] - r["ci95"][0] for r in pts], [r["ci95"][1] - r["diff"] for r in pts]]
            ax.errorbar(x, y, xerr=err, fmt=markers.get(yardstick, "D"), color=colours.get(against, "tab:purple"),
                        mfc="white" if yardstick != "reference" else None, capsize=2, markersize=5,
                        label=f"minus {against}-guided, by the {yardstick} RM")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods)
        ax.set_ylim(len(methods) - 0.5, -0.5)
        n = {r["n"] for r in rows if r.get("n")}
        ax.set_title(table + (f", {min(n)} prompts" if len(n) == 1 else ""), fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    leads = " or ".join(dict.fromkeys(r.get("lead", "SP-PRM") for r in records)) or "SP-PRM"
    axes[-1, 0].set_xlabel(f"{leads}-guided minus other-guided reward (95% interval over prompts)")
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.15 + 0.2 * ((len(labels) + 1) // 2)) / height, 1, 1))  # room for the legend
    return _save(fig, out_dir, name)


def plot_agreement(agreement, out_dir, prefix="agreement"):
    """AR_RM-SC(t) (Figures 1-bottom, 5), Delta_r(t) (Figure 2c) and, with judge labels, AR_RM-HP /
    AR_SC-HP (Figures 2a-b). Bands: 95% bootstrap intervals over pairs, drawn for the first two RMs (the SP-PRM
    and the ORM it came from) only, so the bands of five RMs do not hide each other; the dotted line is chance.
    With paired differences in the file, AR_RM-SC gets a second panel: each RM minus the first, with its
    interval. Returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    panels = [("ar_rm_sc", "AR$_{RM-SC}$(t)", "agreement with the preference label"),
              ("reward_gap", r"$\Delta_r$(t)", "mean |r(y_w[:t]) - r(y_l[:t])|"),
              ("ar_rm_hp", "AR$_{RM-HP}$(t)", "agreement with the judge")]
    for key, title, ylabel in panels:
        curves = {name: rm["curve"] for name, rm in agreement["rms"].items()
                  if any(key in c for c in rm["curve"])}
        if not curves:
            continue
        diffs = {name: curve for name, curve in curves.items()
                 if key == "ar_rm_sc" and any(f"{key}_diff_ci95" in c for c in curve)}
        fig, axes = plt.subplots(1, 2 if diffs else 1, figsize=(10 if diffs else 5.5, 4.2), squeeze=False)
        colours = {name: f"C{i}" for i, name in enumerate(curves)}  # one colour an RM in both panels
        ax = axes[0, 0]
        for i, (name, curve) in enumerate(curves.items()):
            pts = [(c["t"], c[key], c.get(f"{key}_ci95")) for c in curve if key in c]
            ax.plot([t for t, _, _ in pts], [v for _, v, _ in pts], marker="o", markersize=4, label=name,
                    color=colours[name], linewidth=2 if i < 2 else 1, alpha=1 if i < 2 else 0.8)
            if i < 2 and all(ci for _, _, ci in pts):  # the 95% bootstrap interval over pairs as a band
                ax.fill_between([t for t, _, _ in pts], [ci[0] for _, _, ci in pts], [ci[1] for _, _, ci in pts],
                                color=colours[name], alpha=0.15, linewidth=0)
        if key == "ar_rm_hp":
            sc = next(iter(curves.values()))
            pts = [(c["t"], c["ar_sc_hp"]) for c in sc if "ar_sc_hp" in c]
            ax.plot([t for t, _ in pts], [v for _, v in pts], "k--", label="AR$_{SC-HP}$")
        if key.startswith("ar_"):
            ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1.2, label="chance (0.5)")
        ax.set_xlabel("prefix length t (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (": bands are the first two RMs' 95% intervals" if len(curves) > 2 and key != "reward_gap"
                              else ""), fontsize=9)
        if diffs:
            first = next(iter(curves))
            bx = axes[0, 1]
            for i, (name, curve) in enumerate(diffs.items()):
                pts = [(c["t"], c[f"{key}_diff"], c[f"{key}_diff_ci95"]) for c in curve if f"{key}_diff_ci95" in c]
                bx.plot([t for t, _, _ in pts], [v for _, v, _ in pts], marker="o", markersize=4,
                        color=colours[name], linewidth=2 if i == 0 else 1, alpha=1 if i == 0 else 0.8)
                if i == 0:  # the ORM it came from: the comparison the paper makes
                    bx.fill_between([t for t, _, _ in pts], [ci[0] for _, _, ci in pts],
                                    [ci[1] for _, _, ci in pts], color=colours[name], alpha=0.15, linewidth=0)
            bx.axhline(0, color="black", linewidth=0.8)
            bx.set_xlabel("prefix length t (tokens)")
            bx.set_ylabel(f"RM minus {first}, paired over pairs")
            bx.set_title(f"each RM minus the {first}: band is the {next(iter(diffs))}'s 95% interval", fontsize=9)
        paths.append(save_figure(fig, list(axes[0]), out_dir, f"{prefix}_{key}.png",
                                 legend_outside=len(curves) > 2 or bool(diffs)))
    return paths


def generation_params(metrics_path):
    """The settings a decoding run acted with: the params its generations' rows record (04_decode.py: the method's
    knobs after the RM set their defaults, reward_norm, max_new_tokens, seed), read through its metrics file. The
    generations are found where the metrics file names them, or beside it (a run folder that was moved)."""
    return first_generation_row(metrics_path)["params"]


def first_generation_row(metrics_path):
    """The first row of a run's generations, found where its metrics file names them, or beside it."""
    generations = read_json(metrics_path)["generations"]
    if not os.path.exists(generations):
        generations = os.path.join(os.path.dirname(metrics_path), os.path.basename(generations))
    with open(generations, encoding="utf-8") as f:
        return json.loads(f.readline())


def reward_vs_w(metric_files):
    """{"rms": {name: [{"w", "reward_mean", "reward_mean_ci95"}]}} from (rm name, metrics JSON) pairs; w is the one
    the run's rows record (greedy decoding, which has none: 0)."""
    out = {"rms": {}}
    for name, path in metric_files:
        m = read_json(path)
        out["rms"].setdefault(name, []).append({"w": generation_params(path).get("w", 0.0),
                                                "reward_mean": m["reward_mean"],
                                                "reward_mean_ci95": m.get("reward_mean_ci95"),
                                                "yardstick": m.get("reward_rm"), "metrics": path})
    for points in out["rms"].values():
        points.sort(key=lambda p: p["w"])
    return out


def _save(fig, out_dir, name):
    """The PNG written to out_dir/name (a temporary name renamed when complete); returns its path."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_figure(fig, axes, out_dir, name, legend_size=8, legend_outside=False):
    """Grid and legend on each axis (or one legend below the axes, where it hides no data), then the PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if not legend_outside:
            ax.legend(fontsize=legend_size, framealpha=0.7)
    if legend_outside:
        handles, labels = axes[0].get_legend_handles_labels()
        ncol = 2 if len(labels) <= 6 else 3
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=legend_size, frameon=False)
        rows = (len(labels) + ncol - 1) // ncol
        fig.tight_layout(rect=(0, (0.1 + 0.18 * rows) / fig.get_figheight(), 1, 1))  # room for the legend
    else:
        fig.tight_layout()
    return _save(fig, out_dir, name)


def plot_reward_vs_w(sweep, out_dir, name="args_reward_vs_w.png"):
    """ARGS reward (by the yardstick RM) against the guidance weight w, one series per guiding RM, rewards
    normalised; w = 0 is greedy decoding. Error bars: 95% bootstrap intervals over prompts. Points are joined by a
    line only where an RM has three w values or more: two points say nothing of where guidance starts to act."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ws_all = sorted({p["w"] for points in sweep["rms"].values() for p in points})
    span = (ws_all[-1] - ws_all[0]) if len(ws_all) > 1 else 1.0
    for i, (rm, points) in enumerate(sweep["rms"].items()):
        shift = (i - (len(sweep["rms"]) - 1) / 2) * 0.015 * span  # side by side where the RMs share a w
        ws = [p["w"] + shift for p in points]
        ys = [p["reward_mean"] for p in points]
        cis = [p.get("reward_mean_ci95") for p in points]
        err = [[y - ci[0] for y, ci in zip(ys, cis)], [ci[1] - y for y, ci in zip(ys, cis)]] if all(cis) else None
        ax.errorbar(ws, ys, yerr=err, marker="o", capsize=3, linestyle="-" if len(points) >= 3 else "none",
                    label=f"guided by {rm}")
    ax.set_xticks(ws_all)
    ax.set_xlabel("ARGS weight w (normalised reward; w = 0: greedy)")
    ax.set_ylabel("reward by the yardstick RM")
    ax.set_title("ARGS reward against w" if len(ws_all) >= 3 else
                 f"ARGS reward at w = {', '.join(f'{w:g}' for w in ws_all)} (two w values: no curve)", fontsize=10)
    return save_figure(fig, [ax], out_dir, name)


def plot_reward_vs_compute(runs, out_dir, name="specrej_reward_vs_compute.png", yardstick="reference",
                           x="compute"):
    """Reward (by the yardstick: "reference" or "independent") against cost (x: "compute", policy + RM tokens per
    reply, or "seconds" per reply), one line per method family and guiding RM over its N; bands: 95% bootstrap
    intervals over prompts; the legend below the axes. runs: specrej points.json entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, ci = ("reward_mean", "reward_mean_ci95") if yardstick == "reference" else ("independent", "independent_ci95")
    fig, ax = plt.subplots(figsize=(7, 5))
    lines = {}
    for r in runs:
        lines.setdefault((r["family"], r["rm"]), []).append(r)
    for (family, rm), points in sorted(lines.items()):
        points.sort(key=lambda p: p[x])
        xs, ys = [p[x] for p in points], [p[mean] for p in points]
        line, = ax.plot(xs, ys, marker="o", label=f"{family}, guided by {rm}", linestyle="--" if rm == "ORM" else "-")
        ax.fill_between(xs, [p[ci][0] for p in points], [p[ci][1] for p in points], color=line.get_color(),
                        alpha=0.15, linewidth=0)
        for p, xv, yv in zip(points, xs, ys):
            ax.annotate(f"N={p['n']}", (xv, yv), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("policy + RM tokens per reply (log scale)" if x == "compute" else "seconds per reply (log scale)")
    ax.set_ylabel(f"reward by the {yardstick} RM")
    ax.set_title("Best-of-N and speculative rejection: reward against cost", fontsize=10)
    return save_figure(fig, [ax], out_dir, name, legend_outside=True)


def plot_consistency(consistency, out_dir, name="specrej_prefix_consistency.png"):
    """Kendall's tau between each RM's prefix scores and the reference's scores of the complete samples, and
    the share of prompts whose best sample survives one rejection, against t; bands: 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for rm, entry in consistency["rms"].items():
        curve = entry["curve"]
        ts = [c["t"] for c in curve]
        for ax, key in zip(axes, ("kendall_tau", "best_survives")):
            line, = ax.plot(ts, [c[key] for c in curve], marker="o", label=rm)
            ax.fill_between(ts, [c[f"{key}_ci95"][0] for c in curve], [c[f"{key}_ci95"][1] for c in curve],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    axes[0].set_ylabel("Kendall's tau with the reference")
    axes[1].set_ylabel(f"best sample survives (alpha = {consistency['alpha']:g})")
    for ax in axes:
        ax.set_xlabel("prefix length t (RM tokens)")
    fig.suptitle("Prefix consistency: the premise of early rejection")
    return save_figure(fig, axes, out_dir, name)


def draw_docs_figures(out_dir, data_dir=None):
    """The figures of docs/ from the numbers of the runs they report (docs/figures/data/*.json, taken from the
    results pages); returns the paths written."""
    data_dir = data_dir or os.path.join(out_dir, "data")
    data = lambda name: read_json(os.path.join(data_dir, name))  # noqa: E731
    paths = [plot_paired_differences(data("paired_differences.json")["records"], out_dir)]
    paths += plot_agreement(data("reproduce_agreement.json"), out_dir, prefix="reproduce")
    paths.append(plot_reward_vs_w(data("reproduce_args_sweep.json"), out_dir, name="reproduce_args_reward_vs_w.png"))
    specrej = data("specrej.json")
    paths.append(plot_reward_vs_compute(specrej["points"], out_dir))
    paths.append(plot_consistency(specrej["consistency"], out_dir))
    return paths


if __name__ == "__main__":
    for written in draw_docs_figures(sys.argv[1] if len(sys.argv) > 1 else "docs/figures"):
        print(written)
