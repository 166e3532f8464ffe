"""reproduce.py's judgement of a claim by its interval, and its choice of the independent yardstick."""
import importlib.util
import os

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "reproduce.py"))
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_verdict_by_interval():
    assert reproduce.verdict([0.01, 0.2]) == "reproduces"
    assert reproduce.verdict([-0.2, -0.01]).startswith("does not reproduce")
    assert reproduce.verdict([-0.1, 0.1]) == "cannot be told apart at this size"
    assert reproduce.verdict([0.0, 0.1]) == "cannot be told apart at this size"  # zero inside: no claim
    # a difference taken the other way round (ORM - SP-PRM for "SP-PRM above the ORM")
    assert reproduce.verdict([-0.2, -0.01], sign=-1) == "reproduces"


def test_a_paired_difference_is_read_by_its_sign():
    """specrej's ORM-rejector minus SP-PRM-rejector: a difference below zero favours the SP-PRM (Best-of-4 there)."""
    assert reproduce.higher([-0.0843, -0.0021], "the ORM-rejector", "the SP-PRM-rejector") == \
        "the SP-PRM-rejector higher"
    assert reproduce.higher([0.01, 0.2], "A", "B") == "A higher"
    assert reproduce.higher([-0.03, 0.05], "A", "B") == "cannot be told apart"


def test_independent_yardstick_skips_the_reference_and_its_parent():
    candidates = {"ORM seed 1": "r/orm_s1", "ORM seed 2": "r/orm_s2", "MiniLM, 2 epochs": "r/ref_2ep"}
    # the reference was trained on from seed 1: seed 2 is the only RM that shaped nothing
    assert reproduce.independent_of(candidates, "r/ref_2ep", {"r/ref_2ep": "r/orm_s1"}) == "r/orm_s2"
    assert reproduce.independent_of(candidates, "r/ref_2ep", {"r/ref_2ep": "r/orm_s2"}) == "r/orm_s1"
    assert reproduce.independent_of(candidates, "r/orm_s1", {"r/ref_2ep": "r/orm_s1"}) == "r/orm_s2"
    assert reproduce.independent_of({"ORM seed 1": "r/orm_s1"}, "r/orm_s1", {}) is None


def test_gpu_scale_runs_end_to_end_at_its_smoke_size(gpu_smoke_run):
    """The gpu scale's stages (a SmolLM2 reference candidate, SST K = 5, every method of Table 1) at a size the
    CPU finishes in minutes, then the speculative-rejection part on the same RMs; each writes its results (the
    run is shared with tests/test_notebooks.py: conftest's gpu_smoke_run)."""
    import json

    out, procs = gpu_smoke_run
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = procs[0].stdout.strip().splitlines()[-5:]  # the run ends saying where to look
    assert last[0].startswith("reproduce --scale gpu-smoke finished in")
    assert last[1].strip() == f"table:     {out}/table.md"
    assert "paired_differences.png" in last[2] and "results.md" in last[3] and "notebooks/tables.ipynb" in last[4]
    results = (out / "results.md").read_text()
    assert "SmolLM2-135M RM" in results and "| SP-PRM |" in results
    assert (out / "agreement_ar_rm_sc.png").exists() and (out / "args_sweep.json").exists()
    specrej = (out / "specrej" / "results_specrej.md").read_text()
    assert "Compute needed to reach Best-of-4's reward" in specrej and "Kendall's tau" in specrej
    kept = [json.loads(line)["stats"]["kept"] for line in open(out / "specrej" / "gen_specrej4_a0.5_orm.jsonl")]
    assert any(kept) and all(k[0] == 2 for k in kept if k)  # ceil(0.5 * 4) go on after the first decision
    for figure in ("specrej_reward_vs_compute.png", "specrej_prefix_consistency.png"):
        assert (out / "specrej" / figure).exists()


def test_tables_part_names_every_table1_row_and_full_scale_is_the_papers_unit():
    s = {"reward_norm": "std", "rm_batch": None, **reproduce.SCALES["cpu"]}
    rows = reproduce.table_methods(s, s["tables"])
    assert [label for _, label, _ in rows] == ["ARGS", "TBS", "CBS", "CARDS", "BoN-4", "BoN-8"]
    flags = {tag: f for tag, _, f in rows}
    assert flags["tbs"][:2] == ["--method", "tbs"] and "--chunk" not in flags["tbs"]
    assert flags["bon8"] == ["--method", "bon", "--n", 8] and "--max-retries" in flags["cards"]
    assert reproduce.rm_batch_flags(s, "encoder") == []
    full = {"reward_norm": "std", "rm_batch": None, **reproduce.SCALES["full"]}
    assert full["reward_norm"] == "none" and full["args_w"] == 1.5  # the paper's w on the raw reward scale
    size, accum = reproduce.rm_batch_flags(full, "encoder")[1::2]
    assert size * accum == 64  # the paper's Table 10 batch (encoder RM)
    size, accum = reproduce.rm_batch_flags(full, "decoder")[1::2]
    assert size * accum == 32  # its Table 11 batch (decoder RM)


@pytest.mark.slow
def test_tables_part_runs_every_row_at_smoke_size(tmp_path):
    """make tables' stages at the smoke size: Table 1 with every method guided by three RMs, Table 3 on AdvBench
    with both ASR measures, Table 4 with GSM8K RMs of its own (13 min on 2 cores)."""
    import subprocess
    import sys

    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--scale", "smoke", "--part", "tables",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "tables" / "results_tables.md").read_text()
    for method in ("ARGS", "TBS", "CBS", "CARDS", "BoN-2", "BoN-3"):
        for rm in ("SP-PRM", "ORM", "Ablation"):
            assert f"| {method} ({rm}) |" in text
    assert "Reward (decoding RM)" in text and "ASR, target opening (%)" in text and "Accuracy (%)" in text
    assert "CARDS (SP-PRM) minus CARDS (Ablation)" in text
    # the notebooks read make tables' layout (tables/table<N>_*)
    from conftest import execute_notebook

    text = execute_notebook("tables.ipynb", out)
    assert "### Table 4 (GSM8K" in text and "| CARDS (Ablation) |" in text and "| CARDS | Ablation-guided |" in text
    execute_notebook("figures.ipynb", out)
    assert (out / "paired_differences.png").stat().st_size > 10000


def test_stages_run_by_their_own_path_from_any_working_folder(tmp_path, monkeypatch):
    """reproduce.py started from another folder runs each stage script from the folder reproduce.py is in (the
    stage commands it records keep the script's name, so a record stays valid when the repository moves)."""
    import subprocess
    import sys

    from common import pipeline

    class FirstStage(Exception):
        pass

    ran = []

    def record(argv, **kwargs):
        ran.append(argv)
        raise FirstStage
    monkeypatch.setattr(pipeline.subprocess, "run", record)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--scale", "demo", "--out", "runs/demo"])
    with pytest.raises(FirstStage):
        reproduce.main()
    python, script, *args = ran[0]
    assert python == sys.executable and script == os.path.join(ROOT, "03_train.py")
    assert args[:2] == ["--input", "hh-rlhf:train"] and "runs/demo/orm_s0" in args
    assert (tmp_path / "runs" / "demo").is_dir()
    # that path starts the stage from here
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "--input" in proc.stdout, proc.stderr[-2000:]
