"""The figures of a run: agreement AR_RM-SC(t) and reward gap Delta_r(t) per RM (the paper's), ARGS reward
against w, and Best-of-N against speculative rejection (reward against compute, prefix consistency)."""
import json
import os


def load_agreement(path):
    with open(path) as f:
        return json.load(f)


def plot_agreement(agreement, out_dir, prefix="agreement"):
    """AR_RM-SC(t) (Figures 1-bottom, 5), Delta_r(t) (Figure 2c) and, with judge labels, AR_RM-HP /
    AR_SC-HP (Figures 2a-b). Bands: 95% bootstrap intervals over pairs. Returns the PNG paths written."""
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
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, curve in curves.items():
            pts = [(c["t"], c[key], c.get(f"{key}_ci95")) for c in curve if key in c]
            line, = ax.plot([t for t, _, _ in pts], [v for _, v, _ in pts], marker="o", label=name)
            if all(ci for _, _, ci in pts):  # the 95% bootstrap interval over pairs as a band
                ax.fill_between([t for t, _, _ in pts], [ci[0] for _, _, ci in pts], [ci[1] for _, _, ci in pts],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        if key == "ar_rm_hp":
            sc = next(iter(curves.values()))
            pts = [(c["t"], c["ar_sc_hp"]) for c in sc if "ar_sc_hp" in c]
            ax.plot([t for t, _ in pts], [v for _, v in pts], "k--", label="AR$_{SC-HP}$")
        ax.set_xlabel("prefix length t (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        paths.append(save_figure(fig, [ax], out_dir, f"{prefix}_{key}.png"))
    return paths


def reward_vs_w(metric_files):
    """{"rms": {name: [{"w", "reward_mean", "reward_mean_ci95"}]}} from (rm name, w, metrics JSON) triples."""
    out = {"rms": {}}
    for name, w, path in metric_files:
        with open(path) as f:
            m = json.load(f)
        out["rms"].setdefault(name, []).append({"w": w, "reward_mean": m["reward_mean"],
                                                "reward_mean_ci95": m.get("reward_mean_ci95"),
                                                "yardstick": m.get("reward_rm"), "metrics": path})
    for points in out["rms"].values():
        points.sort(key=lambda p: p["w"])
    return out


def save_figure(fig, axes, out_dir, name, legend_size=8):
    """Grid and legend on each axis, then the PNG written to out_dir/name; returns its path."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size, framealpha=0.7)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reward_vs_w(sweep, out_dir, name="args_reward_vs_w.png"):
    """ARGS reward (by the yardstick RM) against the guidance weight w, one line per guiding RM, rewards
    normalised; w = 0 is greedy decoding. Bands: 95% bootstrap intervals over prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for rm, points in sweep["rms"].items():
        ws = [p["w"] for p in points]
        line, = ax.plot(ws, [p["reward_mean"] for p in points], marker="o", label=f"guided by {rm}")
        if all(p.get("reward_mean_ci95") for p in points):
            ax.fill_between(ws, [p["reward_mean_ci95"][0] for p in points], [p["reward_mean_ci95"][1] for p in points],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("ARGS weight w (normalised reward)")
    ax.set_ylabel("reward by the yardstick RM")
    ax.set_title("ARGS: where guidance starts to act")
    return save_figure(fig, [ax], out_dir, name)


def plot_reward_vs_compute(runs, out_dir, name="specrej_reward_vs_compute.png"):
    """Reward (by the yardstick RM) against compute (policy + RM tokens per reply), one line per method family
    and guiding RM; error bars: 95% bootstrap intervals over prompts. runs: [{"family", "rm", "compute",
    "reward_mean", "reward_mean_ci95", "label"}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines = {}
    for r in runs:
        lines.setdefault((r["family"], r["rm"]), []).append(r)
    for (family, rm), points in sorted(lines.items()):
        points.sort(key=lambda p: p["compute"])
        x, y = [p["compute"] for p in points], [p["reward_mean"] for p in points]
        lo = [p["reward_mean"] - p["reward_mean_ci95"][0] for p in points]
        hi = [p["reward_mean_ci95"][1] - p["reward_mean"] for p in points]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=f"{family}, guided by {rm}",
                    linestyle="--" if rm == "ORM" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("policy + RM tokens per reply (log scale)")
    ax.set_ylabel("reward by the yardstick RM")
    ax.set_title("Best-of-N and speculative rejection: reward against compute")
    return save_figure(fig, [ax], out_dir, name, legend_size=7)


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
