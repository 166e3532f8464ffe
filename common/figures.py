"""The paper's figures from run outputs: agreement AR_RM-SC(t) and reward gap Delta_r(t) per RM."""
import json
import os


def load_agreement(path):
    with open(path) as f:
        return json.load(f)


def plot_agreement(agreement, out_dir, prefix="agreement"):
    """AR_RM-SC(t) (Figures 1-bottom, 5), Delta_r(t) (Figure 2c) and, with judge labels, AR_RM-HP /
    AR_SC-HP (Figures 2a-b). Returns the PNG paths written."""
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
            pts = [(c["t"], c[key]) for c in curve if key in c]
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=name)
        if key == "ar_rm_hp":
            sc = next(iter(curves.values()))
            pts = [(c["t"], c["ar_sc_hp"]) for c in sc if "ar_sc_hp" in c]
            ax.plot([t for t, _ in pts], [v for _, v in pts], "k--", label="AR$_{SC-HP}$")
        ax.set_xlabel("prefix length t (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{key}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
