"""Both notebooks run top to bottom on the real output of the demo's pipeline (reproduce.py's table1 and specrej
parts at the gpu-smoke size, manifests and all), and on the layout make tables writes, so they cannot rot."""
import json
import os
import shutil

import nbformat
import pytest

from conftest import ROOT, execute_notebook

pytestmark = pytest.mark.e2e  # every test here reads the gpu-smoke run (make test-e2e)


@pytest.fixture(scope="module")
def real_run(gpu_smoke_run):
    out, procs = gpu_smoke_run
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def labels(folder, prefix=""):
    return [json.load(open(p))["label"] for p in sorted(folder.glob(f"{prefix}metrics_*.json"))
            if not p.name.endswith(".manifest.json")]


def test_tables_notebook_on_a_real_run(real_run):
    assert (real_run / "metrics_greedy.json.manifest.json").exists()  # the file that once broke the notebook
    text = execute_notebook("tables.ipynb", real_run)
    assert "### Table 1 (HH-RLHF): the run's decoding" in text
    for label in labels(real_run) + labels(real_run / "specrej"):
        assert f"| {label} |" in text
    assert text.index("| Greedy |") < text.index("| ARGS (ORM) |")  # greedy first, as in the run's table.md
    assert "### Best-of-N against speculative rejection (make specrej)" in text
    for method in ("ARGS", "CBS", "BoN"):  # reproduce.py's paired comparisons, one per method and yardstick
        d = json.load(open(real_run / f"compare_{ {'ARGS': 'argsg', 'CBS': 'cbs', 'BoN': 'bon'}[method]}.json"))
        r = d["metrics"]["reward"]
        assert (f"| Table 1 | {method} | ORM-guided | the reference RM | {r['diff']:+.3f} [{r['diff_ci95'][0]:+.3f}, "
                f"{r['diff_ci95'][1]:+.3f}]") in text
    accuracy = json.load(open(real_run / "orm_s0" / "eval.json"))["accuracy"]
    assert f"| orm_s0 | {accuracy:.3f}" in text


def test_figures_notebook_on_a_real_run(real_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns("*.safetensors"))  # the figures need no weights
    for png in run.rglob("*.png"):  # the notebook draws them again
        png.unlink()
    text = execute_notebook("figures.ipynb", run)
    for name in ("paired_differences.png", "agreement_ar_rm_sc.png", "agreement_reward_gap.png",
                 "args_reward_vs_w.png", "specrej/specrej_reward_vs_compute.png",
                 "specrej/specrej_prefix_consistency.png"):
        assert (run / name).stat().st_size > 10000, name
    sweep = json.load(open(run / "args_sweep.json"))
    w = sweep["rms"]["SP-PRM"][-1]
    assert f"w={w['w']:g}: {w['reward_mean']:.3f}" in text
    bon = json.load(open(run / "compare_bon.json"))["metrics"]["reward"]
    assert f"minus ORM       by the reference    RM: {bon['diff']:+.3f} [{bon['diff_ci95'][0]:+.3f}" in text


def test_both_notebooks_on_the_layout_make_tables_writes(real_run, tmp_path):
    """make tables writes RUN/tables/table<N>_metrics_*.json and table<N>_compare_*.json beside make reproduce's
    own files: the real metric and compare files of the run, laid out so, are read as Tables 1, 3 and 4."""
    run = tmp_path / "reproduce"
    (run / "tables").mkdir(parents=True)
    for path in real_run.glob("*"):
        if path.is_file() and path.name.startswith(("metrics_", "compare_")):
            for table in ("table1", "table3", "table4"):
                shutil.copy(path, run / "tables" / f"{table}_{path.name}")
    for path in (run / "tables").glob("*compare_*.json"):
        if not path.name.endswith(".manifest.json"):  # the compared files, as make tables names them
            c = json.load(open(path))
            table = path.name.split("_")[0]
            c.update(a=f"{table}_{os.path.basename(c['a'])}", b=f"{table}_{os.path.basename(c['b'])}")
            path.write_text(json.dumps(c))
    text = execute_notebook("tables.ipynb", run)
    for title in ("Table 1 (HH-RLHF), every method and +Ablation row", "Table 3 (AdvBench", "Table 4 (GSM8K"):
        assert f"### {title}" in text
    assert "### Table 1 (HH-RLHF): the run's decoding" not in text  # no metric files at the top of this run
    assert text.count("| ARGS | ORM-guided | the reference RM |") == 3  # one a table
    assert execute_notebook("tables.ipynb", run / "tables").count("| ARGS (SP-PRM) |") == 3  # pointed at tables/
    text = execute_notebook("figures.ipynb", run)
    assert (run / "paired_differences.png").exists() and "no agreement.json" in text


@pytest.mark.parametrize("name", ["figures.ipynb", "tables.ipynb"])
def test_committed_notebooks_are_source_only(name):
    """The .ipynb files are the source: kept without outputs, so a diff shows the code a researcher changed."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
