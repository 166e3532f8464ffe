"""Writes figures.ipynb and tables.ipynb (kept as code here so that diffs stay readable)."""
import os

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))
SETUP = """import glob, json, os, sys
ROOT = os.path.abspath(os.path.join(os.getcwd(), "..")) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
# The run to read; point it elsewhere (or set SPPRM_RUN_DIR) to read another run.
RUN_DIR = os.environ.get("SPPRM_RUN_DIR", os.path.join(ROOT, "runs", "demo"))
print("reading", RUN_DIR)"""

figures = nbf.v4.new_notebook()
figures.cells = [
    nbf.v4.new_markdown_cell("# SP-PRM figures\n\nAgreement of each RM's prefix scores with the preference "
                             "label, AR_RM-SC(t) (paper Figures 1-bottom and 5), the reward gap Delta_r(t) "
                             "(Figure 2c), and, when judge labels exist, AR_RM-HP(t) and AR_SC-HP(t) "
                             "(Figures 2a-b). Input: `agreement.json` from `05_evaluate.py agreement`."),
    nbf.v4.new_code_cell(SETUP),
    nbf.v4.new_code_cell("""from common.figures import load_agreement, plot_agreement
agreement = load_agreement(os.path.join(RUN_DIR, "agreement.json"))
for name, rm in agreement["rms"].items():
    print(f"{name:10s}", "  ".join(f"t={c['t']}: AR={c['ar_rm_sc']:.3f} gap={c['reward_gap']:.3f}" for c in rm["curve"]))"""),
    nbf.v4.new_code_cell("""from IPython.display import Image, display
paths = plot_agreement(agreement, RUN_DIR)
for p in paths:
    display(Image(filename=p))
paths"""),
    nbf.v4.new_markdown_cell("## ARGS reward vs w\n\nReward of ARGS-greedy output, measured by the yardstick RM "
                             "(the reference, which guided none of these runs), against the guidance weight w, "
                             "with rewards normalised (`04_decode.py --reward-norm std`) so that one w means the "
                             "same for the ORM and the SP-PRM; w = 0 is greedy decoding. Bands: 95% bootstrap "
                             "intervals over prompts. Input: `args_sweep.json` (written by the demo)."),
    nbf.v4.new_code_cell("""from common.figures import plot_reward_vs_w
path = os.path.join(RUN_DIR, "args_sweep.json")
if os.path.exists(path):
    with open(path) as f:
        sweep = json.load(f)
    for name, points in sweep["rms"].items():
        print(f"guided by {name:7s}", "  ".join(f"w={p['w']:g}: {p['reward_mean']:.3f}" for p in points))
    display(Image(filename=plot_reward_vs_w(sweep, RUN_DIR)))
else:
    print("no args_sweep.json in", RUN_DIR)"""),
]

tables = nbf.v4.new_notebook()
tables.cells = [
    nbf.v4.new_markdown_cell("# SP-PRM tables\n\nThe paper's table layouts (method rows, '+Ours' rows, metric "
                             "columns, each value ± the half-width of its 95% bootstrap interval over prompts) from the metric files of a run "
                             "(`05_evaluate.py metrics`). Table 1 (HH-RLHF dialogue) is what the demo "
                             "produces; Tables 2-5 appear when their runs (TL;DR, AdvBench, GSM8K, "
                             "ablations) are in RUN_DIR as `metrics_<task>_*.json`.\n\n"
                             "The paper's reported numbers belong beside rows whose settings match its own "
                             "(its policies, e.g. Llama-3.2-1B-Instruct, and RMs, e.g. RM-Gemma-2B). The "
                             "embedded demo uses SmolLM2-135M and MiniLM-L6 RMs trained here, so no row of "
                             "runs/demo matches and none is shown beside it."),
    nbf.v4.new_code_cell(SETUP),
    nbf.v4.new_code_cell("""from IPython.display import Markdown, display
from common.metrics import markdown_table

def load(pattern):
    out = []
    for path in sorted(glob.glob(os.path.join(RUN_DIR, pattern))):
        with open(path) as f:
            out.append(json.load(f))
    return out

sections = {
    "Table 1: HH-RLHF dialogue (reward by the yardstick RM)": [m for m in load("metrics_*.json")
                                                     if not m["generations"].endswith(("tldr.jsonl", "gsm8k.jsonl", "advbench.jsonl"))],
    "Table 2: TL;DR summarization": load("metrics_tldr_*.json"),
    "Table 3: AdvBench": load("metrics_advbench_*.json"),
    "Table 4: GSM8K": load("metrics_gsm8k_*.json"),
}
for title, rows in sections.items():
    if rows:
        display(Markdown(f"### {title}\\n\\n" + markdown_table(rows)))
    else:
        print(f"{title}: no metric files in {RUN_DIR}")"""),
    nbf.v4.new_code_cell("""# Table 5 layout: the held-out accuracy and AR_RM-SC of each trained RM (from 03_train.py eval.json)
rows = []
for name in ("reference", "orm", "prm", "ablation", "filter"):
    path = os.path.join(RUN_DIR, name, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            e = json.load(f)
        ci = e.get("accuracy_ci95")
        acc = f"{e['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        rows.append(f"| {name} | {acc} | " + " | ".join(f"{v:.3f}" for v in e["ar_sc"].values()) + " |")
        header = "| RM | accuracy | " + " | ".join(f"AR t={t}" for t in e["ar_sc"]) + " |"
if rows:
    display(Markdown("\\n".join([header, "|---" * (len(rows[0].split("|")) - 2) + "|"] + rows)))"""),
]

for name, nb in (("figures.ipynb", figures), ("tables.ipynb", tables)):
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, os.path.join(HERE, name))
    print("wrote", name)
