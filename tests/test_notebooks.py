"""Both notebooks run top to bottom on a tiny fixture run (so they cannot rot)."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT


@pytest.fixture
def fixture_run(tmp_path):
    curve = lambda base: [{"t": t, "ar_rm_sc": base + 0.01 * i, "reward_gap": 0.1 * (i + 1), "n": 10,  # noqa
                           "ar_rm_hp": base, "ar_sc_hp": 0.7, "n_judged": 5} for i, t in enumerate((5, 10, 20))]
    agreement = {"pairs": "x", "n": 10, "prefix_lengths": [5, 10, 20],
                 "rms": {"ORM": {"curve": curve(0.55)}, "SP-PRM": {"curve": curve(0.6)}}}
    (tmp_path / "agreement.json").write_text(json.dumps(agreement))
    for name, label in (("greedy", "Greedy (base)"), ("argsg_prm", "ARGS +Ours (SP-PRM)")):
        m = {"generations": f"gen_{name}.jsonl", "label": label, "reward_mean": 0.1, "reward_std": 0.2,
             "diversity": 0.5, "coherence": 0.4, "length": 30.0}
        if name != "greedy":
            m.update(win_tie=0.6, judge_is_proxy=True)
        (tmp_path / f"metrics_{name}.json").write_text(json.dumps(m))
    sweep = {"rms": {"ORM": [{"w": 0.0, "reward_mean": 0.1, "reward_mean_ci95": [0.0, 0.2]},
                             {"w": 1.5, "reward_mean": 0.3, "reward_mean_ci95": [0.1, 0.5]}]}}
    (tmp_path / "args_sweep.json").write_text(json.dumps(sweep))
    os.makedirs(tmp_path / "orm")
    (tmp_path / "orm" / "eval.json").write_text(json.dumps({"accuracy": 0.6, "ar_sc": {"5": 0.55, "10": 0.57}}))
    return tmp_path


@pytest.mark.parametrize("name", ["figures.ipynb", "tables.ipynb"])
def test_notebook_runs(name, fixture_run, monkeypatch):
    monkeypatch.setenv("SPPRM_RUN_DIR", str(fixture_run))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    text = "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if name == "figures.ipynb":
        assert (fixture_run / "agreement_ar_rm_sc.png").exists() and (fixture_run / "agreement_ar_rm_hp.png").exists()
        assert "SP-PRM" in text and (fixture_run / "args_reward_vs_w.png").exists() and "w=1.5: 0.300" in text
    else:
        assert "ARGS +Ours (SP-PRM)" in text and "| orm | 0.600 |" in text


@pytest.mark.parametrize("name", ["figures.ipynb", "tables.ipynb"])
def test_committed_notebooks_are_source_only(name):
    """The .ipynb files are the source: kept without outputs, so a diff shows the code a researcher changed."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
