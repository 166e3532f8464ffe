"""The figures of docs/ are drawn from the numbers of the runs they report (docs/figures/data/), which are the
numbers the results pages quote."""
import json
import os
import re

from conftest import ROOT

from common.figures import draw_docs_figures, split_label

DOCS = os.path.join(ROOT, "docs")


def test_docs_figures_are_drawn_from_the_numbers_the_results_pages_quote(tmp_path):
    data = os.path.join(DOCS, "figures", "data")
    paths = draw_docs_figures(str(tmp_path), data)
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["paired_differences.png", "reproduce_ar_rm_sc.png", "reproduce_reward_gap.png",
         "reproduce_args_reward_vs_w.png", "specrej_reward_vs_compute.png", "specrej_prefix_consistency.png"])
    assert all(os.path.getsize(p) > 20000 for p in paths)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left
    # every paired difference is the one docs/tables-results.md (make tables) and docs/results.md print
    records = json.load(open(os.path.join(data, "paired_differences.json")))["records"]
    tables = open(os.path.join(DOCS, "tables-results.md"), encoding="utf-8").read()
    made_by_tables = [r for r in records if "make tables" in r["table"]]
    assert len(made_by_tables) == 6 * 2 * 2 + 6 * 2 + 6  # Table 1: 6 methods x 2 guides x 2 RMs; 3: x 2 RMs; 4
    for r in made_by_tables:
        key = "reward" if r["yardstick"] == "reference" else "reward_Independent"
        line = f"{r['method']} (SP-PRM) minus {r['method']} ({r['against']}): "
        cell = f"{key} {r['diff']:.4f} [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
        assert any(line in row and cell in row for row in tables.splitlines()), (line, cell)
    results = open(os.path.join(DOCS, "results.md"), encoding="utf-8").read()
    args = next(r for r in records if r["n"] == 192 and r["method"] == "ARGS" and r["yardstick"] == "independent")
    assert re.search(r"\| ARGS \| reward, independent RM .*\| \+0\.132 \[\+0\.060, \+0\.208\] \|", results)
    assert (args["diff"], args["ci95"]) == (0.132, [0.06, 0.208])


def test_labels_split_into_method_and_guide():
    assert split_label("BoN-4 (SP-PRM)") == ("BoN-4", "SP-PRM")
    assert split_label("specrej alpha=0.5, N=4 (ORM)") == ("specrej alpha=0.5, N=4", "ORM")
    assert split_label("Greedy") == ("Greedy", "")
